"""The engine core: the scheduler and the model in a busy loop, with no HTTP and no asyncio.

A server does two kinds of work: the engine's (schedule, run the model, sample,
check stops) and the clients' (HTTP, JSON, tokenizing, server-sent events). In
one Python process they share one interpreter lock, and each slows the other:
a step waits while a response is serialized. So the server runs the engine in
a process of its own, the *engine core*, and the HTTP side in one or more *API
processes* (async_engine.py). They talk over ZeroMQ sockets, in messages
encoded by msgspec (typed, compact, no pickle):

    API process ──PUSH──► core input socket    AddRequests, Abort, Shutdown
    API process ◄──PULL── core output socket   one StepOutputs per step: its requests' new
                          (one per API process) tokens (StepDeltas: flat columns, not an object
                                               per request), final outputs, verdicts, stats

The loop, `EngineCore.run_busy_loop`:

    while not told to shut down:
        take every message waiting (block only when there is no work at all)
        add requests (a request the engine refuses is answered alone: `rejected`),
        apply aborts (the blocks are free before the next schedule); send the verdicts
        step the engine (step_with_deltas); send each API process one message with its requests' news

Outputs are deltas (outputs.py): a message's size is the step's new tokens,
not the requests' histories. The same loop runs in a thread with in-process
sockets when the caller hands over an `LLMEngine` object (tests, notebooks).
"""
from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Union

import msgspec
import zmq

from nanovllm.config import EngineConfig
from nanovllm.engine.engine import EngineStats, LLMEngine
from nanovllm.outputs import RequestOutput, StepDeltas
from nanovllm.sampling_params import SamplingParams
from nanovllm.tokenizer import TokenIdTokenizer

logger = logging.getLogger(__name__)

STATS_INTERVAL = 0.5   # seconds between stats snapshots while busy (a snapshot walks every block table)
UNREACHABLE_GRACE = 5.0   # seconds an API process may stay unconnected with messages waiting for it


# ---- messages ------------------------------------------------------------------------------

class EngineRequest(msgspec.Struct, array_like=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float


class AddRequests(msgspec.Struct, tag=True, array_like=True):
    """Requests one caller submits together: all are queued or none (`rejected` names the first fault)."""
    client_index: int                  # which API process sent them: their outputs go back to it
    requests: list[EngineRequest]
    stream: bool                       # False: only final outputs
    delta: bool                        # True: outputs carry only what is new
    detokenize: bool = True            # False: token ids only, the API process decodes them


class Abort(msgspec.Struct, tag=True, array_like=True):
    request_ids: list[str]


class Shutdown(msgspec.Struct, tag=True, array_like=True):
    """Stop the loop (requests still running are dropped: the API side drained them first)."""


CoreInput = Union[AddRequests, Abort, Shutdown]


class StepOutputs(msgspec.Struct, array_like=True):
    """Everything one step did for one API process's requests."""
    outputs: list[RequestOutput]       # final outputs (and those of requests not streamed as deltas)
    deltas: StepDeltas                 # the new tokens of the unfinished delta streams, as columns
    accepted: list[str]                # request ids queued since the last message
    rejected: list[tuple[str, str]]    # (first request id of an AddRequests, why): nothing of it was queued
    num_waiting: int                   # sequences waiting in the engine, for the API's queue bound
    stats: EngineStats | None = None   # a fresh snapshot, at most every STATS_INTERVAL s and when idle


@dataclass
class CoreInfo:
    """What an API process needs to know of the engine it serves, sent once the model is loaded."""
    model: str | None
    tokenizer: str | None
    max_model_len: int
    vocab_size: int
    stats: EngineStats | None          # None only with an error
    error: str | None = None           # the start-up failure, one line: no other field is meaningful then
    load_format: str = "auto"
    token_ids_only: bool = False       # the engine has no tokenizer: the API process must not load one either
    makes_text: bool = True            # False with skip_tokenizer_init: outputs carry token ids and empty text
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    kv_cache_dtype: str = ""           # what the KV pool stores ("bfloat16", "float8_e4m3fn"), for /metrics


@dataclass
class CoreAddresses:
    """The ZeroMQ endpoints of one core: one input socket, one output socket per API process."""
    input: str
    outputs: list[str] = field(default_factory=list)


# ---- the loop -----------------------------------------------------------------------------

class EngineCore:
    def __init__(self, engine: LLMEngine, context: zmq.Context, addresses: CoreAddresses):
        """Binds the sockets at `addresses` (the API processes connect to them)."""
        self.engine = engine
        self.input_socket = context.socket(zmq.PULL)
        self.input_socket.bind(addresses.input)
        self.output_sockets = []
        for address in addresses.outputs:
            socket = context.socket(zmq.PUSH)
            socket.setsockopt(zmq.SNDHWM, 0)   # never full: a send fails only when no API process is there
            socket.bind(address)
            self.output_sockets.append(socket)
        self.decoder = msgspec.msgpack.Decoder(CoreInput)
        self.encoder = msgspec.msgpack.Encoder()
        self.client_of: dict[str, int] = {}              # unfinished request id -> its API process
        self.accepted: list[list[str]] = [[] for _ in self.output_sockets]
        self.rejected: list[list[tuple[str, str]]] = [[] for _ in self.output_sockets]
        self.stats_time = 0.0
        self.backlog: list[list[bytes]] = [[] for _ in self.output_sockets]   # messages not sent yet, per client
        self.unreachable_since: dict[int, float] = {}   # client -> when a send to it first failed
        self.unreachable_grace = UNREACHABLE_GRACE
        self.running = True

    def close(self) -> None:
        self.input_socket.close(linger=0)
        for socket in self.output_sockets:
            socket.close(linger=0)

    def run_busy_loop(self, parent_pid: int | None = None) -> None:
        """Step while there is work, wait for messages when there is none, until Shutdown.
        parent_pid: also stop when that process is gone (the core never outlives its server)."""
        engine = self.engine
        poller = zmq.Poller()
        poller.register(self.input_socket, zmq.POLLIN)
        while self.running:
            idle = not engine.has_unfinished_requests()
            if idle and not self._has_news():
                waiting_messages = any(self.backlog)
                if not poller.poll(timeout=10 if waiting_messages else 1000):
                    if parent_pid is not None and os.getppid() != parent_pid:
                        logger.warning("the server process is gone; the engine core stops")
                        return
                    if waiting_messages:
                        self._send([], StepDeltas())
                    continue
            self._take_inputs()
            if self._has_news():   # verdicts go out before the step: a caller's response may start now
                self._send([], StepDeltas())
            if engine.has_unfinished_requests():
                self._send(*engine.step_with_deltas())

    def _has_news(self) -> bool:
        return any(self.accepted) or any(self.rejected)

    def _take_inputs(self) -> None:
        while True:
            try:
                data = self.input_socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                message = self.decoder.decode(data)
            except msgspec.DecodeError as error:   # not from an API process of this server: serve on
                logger.error("dropped a message the engine core cannot read: %s", error)
                continue
            if isinstance(message, AddRequests):
                self._add(message)
            elif isinstance(message, Abort):
                for request_id in message.request_ids:
                    self.engine.abort_request(request_id)
            else:
                self.running = False
                return

    def _add(self, message: AddRequests) -> None:
        requests = [(r.request_id, r.prompt_token_ids, r.params) for r in message.requests]
        request_ids = [r.request_id for r in message.requests]
        arrival_time = min(r.arrival_time for r in message.requests)
        try:
            self.engine.add_requests(requests, arrival_time, stream=message.stream, delta=message.delta,
                                     detokenize=message.detokenize)
        except Exception as error:   # ValueError: cannot be served; nothing was queued
            self.rejected[message.client_index].append((request_ids[0], str(error)))
            return
        for request_id in request_ids:
            self.client_of[request_id] = message.client_index
        self.accepted[message.client_index].extend(request_ids)

    def _send(self, outputs: list[RequestOutput], deltas: StepDeltas) -> None:
        per_client: list[list[RequestOutput]] = [[] for _ in self.output_sockets]
        for output in outputs:
            client = self.client_of.get(output.request_id)
            if client is None:
                continue
            if output.finished:
                del self.client_of[output.request_id]
            per_client[client].append(output)
        client_deltas = [deltas] if len(self.output_sockets) == 1 else self._split(deltas)
        stats = None
        now = time.monotonic()
        if not self.engine.has_unfinished_requests() or now - self.stats_time >= STATS_INTERVAL:
            stats, self.stats_time = self.engine.get_stats(), now
        num_waiting = self.engine.get_num_waiting()
        for client, socket in enumerate(self.output_sockets):
            news = per_client[client] or client_deltas[client] or self.accepted[client] or self.rejected[client]
            if not news and stats is None:
                continue
            message = self.encoder.encode(StepOutputs(per_client[client], client_deltas[client], self.accepted[client],
                                                      self.rejected[client], num_waiting, stats))
            self.accepted[client], self.rejected[client] = [], []
            if news:
                self.backlog[client].append(message)
            elif not self.backlog[client]:
                try:
                    socket.send(message, copy=False, flags=zmq.NOBLOCK)
                except zmq.Again:   # not connected yet: stats can wait for the next snapshot
                    pass
        for client, backlog in enumerate(self.backlog):
            if backlog:
                self._flush(client, now)

    def _split(self, deltas: StepDeltas) -> list[StepDeltas]:
        """Each API process's rows of `deltas` (a row whose request is unknown here, aborted, is dropped)."""
        parts = [StepDeltas() for _ in self.output_sockets]
        start = 0
        for row, request_id in enumerate(deltas.request_ids):
            end = start + deltas.num_tokens[row]
            client = self.client_of.get(request_id)
            if client is not None:
                logprobs = None if deltas.logprobs is None else deltas.logprobs[row]
                parts[client].add(request_id, deltas.token_ids[start:end], deltas.texts[row],
                                  deltas.cumulative_logprobs[row], logprobs)
            start = end
        return parts

    def _flush(self, client: int, now: float) -> None:
        """Send a client's messages in order, never waiting: one that cannot be sent (the API process
        is not connected) stays queued, and after UNREACHABLE_GRACE seconds the process counts as
        gone and its requests are aborted, so the core goes on for the others."""
        backlog = self.backlog[client]
        while backlog:
            try:
                self.output_sockets[client].send(backlog[0], copy=False, flags=zmq.NOBLOCK)
            except zmq.Again:
                since = self.unreachable_since.setdefault(client, now)
                if now - since >= self.unreachable_grace:
                    self._abort_client(client)
                return
            backlog.pop(0)
        self.unreachable_since.pop(client, None)

    def _abort_client(self, client: int) -> None:
        """An API process vanished with requests in flight: abort them, so that the core goes on for
        the others and their KV blocks are freed."""
        request_ids = [request_id for request_id, owner in self.client_of.items() if owner == client]
        logger.warning("API process %d is gone; aborting its %d request(s)", client, len(request_ids))
        for request_id in request_ids:
            self.engine.abort_request(request_id)
            del self.client_of[request_id]
        self.backlog[client].clear()
        self.unreachable_since.pop(client, None)


def core_info(engine: LLMEngine) -> CoreInfo:
    config = engine.config
    tokenizer = engine.tokenizer
    return CoreInfo(model=config.model, tokenizer=config.tokenizer, max_model_len=config.max_model_len,
                    vocab_size=engine.model_config.vocab_size, stats=engine.get_stats(), load_format=config.load_format,
                    token_ids_only=isinstance(tokenizer, TokenIdTokenizer), eos_token_ids=tokenizer.eos_token_ids,
                    bos_token_id=tokenizer.bos_token_id, makes_text=not config.skip_tokenizer_init,
                    kv_cache_dtype=config.kv_cache_dtype_name)


def run_engine_core(engine_config: EngineConfig, addresses: CoreAddresses, ready: Connection,
                    log_level: int = logging.INFO) -> None:
    """The core process's entry point: load the model, report `CoreInfo` (or the failure, one line)
    through `ready`, then run the busy loop until Shutdown or until the server process is gone.

    Ctrl-C in a terminal, or a service manager's SIGTERM, may reach every process of the group; the
    core ignores both and lets the API process drain the requests, then stop it (or, should the API
    process vanish, stops on its own)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(levelname)s %(asctime)s %(name)s (core): %(message)s")
    parent_pid = os.getppid()
    encoder = msgspec.msgpack.Encoder()
    try:
        engine = LLMEngine(engine_config)
    except Exception as error:
        ready.send_bytes(encoder.encode(CoreInfo(None, None, 0, 0, None, error=f"{type(error).__name__}: {error}")))
        ready.close()
        raise SystemExit(1) from None
    context = zmq.Context()
    core = EngineCore(engine, context, addresses)
    ready.send_bytes(encoder.encode(core_info(engine)))
    ready.close()
    try:
        core.run_busy_loop(parent_pid)
    finally:
        core.close()
        engine.shutdown()
        context.term()

