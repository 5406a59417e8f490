"""AsyncLLMEngine: the API process's handle on an engine core (core.py).

A server has many clients, arriving at any moment, each waiting on its own
request. The engine core steps them all together in another process; this
module is the asyncio side of the pipe:

- `add_requests` sends the requests to the core and waits for its verdict
  (queued, or refused with a sentence: a ValueError, nothing queued). The
  caller gets an `OutputStream` that the reader task fills.
- One reader task receives the core's per-step messages and hands each
  request's delta to its caller's stream. A stream joins the deltas a slow
  caller has not read yet into one, so nothing is lost and nothing is copied
  per step.
- A caller that goes away (a client that disconnects) closes its stream; that
  sends an abort, and the request's KV blocks are free by the core's next step.
- The waiting queue is bounded: when `max_waiting` sequences already wait
  (as of the core's last message, plus those sent since), a new request is
  refused with `QueueFullError` (the server's 503); a request larger than the
  whole queue could ever hold is a ValueError (a 400) instead.
- `drain(timeout)` refuses new requests, lets those in flight finish for up to
  `timeout` seconds, then aborts the rest: a graceful shutdown.
- A core that dies (killed, out of memory, a crash) fails every open stream
  with `EngineDeadError` at once and calls `on_dead`: the server then exits
  non-zero instead of hanging.

`launch(config)` starts the core in a process of its own and waits for its
model to load (a failure comes back as one line: `EngineStartupError`);
`from_engine(engine)` runs the same core loop in a thread of this process, for
tests and notebooks that hold an `LLMEngine` object.
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import tempfile
import threading
import time
import uuid
from typing import AsyncIterator, Callable

import msgspec
import zmq
import zmq.asyncio

from nanovllm.config import EngineConfig
from nanovllm.engine.core import (
    Abort, AddRequests, CoreAddresses, CoreInfo, EngineCore, EngineRequest, Shutdown, StepOutputs, core_info,
    run_engine_core,
)
from nanovllm.engine.engine import EngineStats, LLMEngine
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

RequestSpec = tuple[str, list[int], SamplingParams]   # (request id, prompt token ids, sampling params)
PEER_STOP_TIMEOUT = 120   # seconds the first API process waits for the others to drain at shutdown
MAX_MESSAGES_PER_TURN = 16   # core messages dispatched before the callers' tasks get their turn


class QueueFullError(RuntimeError):
    """Too many sequences are waiting; the caller should retry later."""


class EngineNotRunningError(RuntimeError):
    """The engine is shutting down, stopped, or its core is gone."""


class EngineDeadError(EngineNotRunningError):
    """The engine core stopped without being asked to (killed, out of memory, a crash)."""


class EngineStartupError(RuntimeError):
    """The engine core could not start; the message is the reason, in one line."""


class OutputStream:
    """The outputs of the requests one caller submitted together, as the steps produce them.

    Outputs are deltas (or one final output each): the stream keeps, per
    request, the deltas not yet read joined into one, so a caller that falls
    behind gets one larger piece instead of a backlog, and loses nothing.
    """

    def __init__(self, engine: AsyncLLMEngine, request_ids: list[str]):
        self._engine = engine
        self._unread: dict[str, RequestOutput] = {}   # request id -> what arrived since the last read
        self._error: BaseException | None = None
        self._ready = asyncio.Event()
        self.request_ids = request_ids
        self.unfinished = set(request_ids)

    @property
    def finished(self) -> bool:
        return not self.unfinished

    def put(self, output: RequestOutput) -> None:
        unread = self._unread.get(output.request_id)
        if unread is None:
            self._unread[output.request_id] = output
        else:
            unread.merge(output)
        self._ready.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._ready.set()

    async def get(self) -> list[RequestOutput]:
        """Wait for news: per request that progressed since the last call, what it gained.
        Raises EngineNotRunningError if the engine core is gone."""
        await self._ready.wait()
        self._ready.clear()
        if self._error is not None:
            raise self._error
        outputs, self._unread = list(self._unread.values()), {}
        for output in outputs:
            if output.finished:
                self.unfinished.discard(output.request_id)
        return outputs

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            for output in await self.get():
                yield output

    def close(self) -> None:
        """Abort whatever is still unfinished (the caller is gone). Safe to call twice."""
        if self.unfinished and self._error is None:
            self._engine.abort(sorted(self.unfinished))


class _CoreThread:
    """The core loop over a given LLMEngine, in a thread of this process."""

    def __init__(self, engine: LLMEngine, addresses: CoreAddresses):
        self.engine = engine
        self.addresses = addresses
        self.context = zmq.Context()
        self.on_exit: Callable[[BaseException | None], None] = lambda error: None
        self.thread = threading.Thread(target=self._run, name="nanovllm-engine-core", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        core = EngineCore(self.engine, self.context, self.addresses)
        error = None
        try:
            core.run_busy_loop()
        except Exception as failure:
            logger.exception("the engine core failed")
            error = failure
        finally:
            core.close()
        self.on_exit(error)

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        self.context.term()


class AsyncLLMEngine:
    def __init__(self, info: CoreInfo, addresses: CoreAddresses, max_waiting: int = 1024, *,
                 process: multiprocessing.Process | None = None, thread: _CoreThread | None = None,
                 client_index: int = 0, on_finished: Callable[[RequestOutput], None] | None = None):
        """A handle on a running core (use `launch` or `from_engine`). max_waiting: the most sequences
        that may wait for their turn before new requests are refused. on_finished: called with each
        request's final output."""
        if isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 1:
            raise ValueError(f"max_waiting must be a positive integer, got {max_waiting!r}")
        self.info = info
        self.addresses = addresses
        self.max_waiting = max_waiting
        self.process = process
        self.thread = thread
        self.client_index = client_index
        self.on_finished = on_finished
        self.on_dead: Callable[[], None] | None = None   # called once if the core dies unasked
        self.peers: list[multiprocessing.Process] = []   # other API processes of this core (client 0 waits for them)
        self.stats: EngineStats = info.stats
        self.num_waiting = 0                   # the core's waiting sequences, as of its last message
        self._num_sent_seqs = 0                # sequences sent since, not yet acknowledged
        self._streams: dict[str, OutputStream] = {}   # unfinished request id -> its caller's stream
        self._pending_adds: dict[str, tuple[asyncio.Future[None], int]] = {}   # first id -> (verdict, seqs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._context: zmq.asyncio.Context | None = None
        self._input: zmq.asyncio.Socket | None = None
        self._encoder = msgspec.msgpack.Encoder()
        self._reader: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._stopping = False
        self.accepting = True
        self.error: BaseException | None = None   # why the core is gone, if it died

    # ---- starting ------------------------------------------------------------------------

    @classmethod
    def launch(cls, config: EngineConfig, max_waiting: int = 1024, num_clients: int = 1) -> AsyncLLMEngine:
        """Start an engine core process for `config` and wait until its model is loaded.
        Raises EngineStartupError with the core's reason (a bad model file, no GPU) if it cannot start.
        num_clients: how many API processes will connect (this handle is client 0; see `for_client`)."""
        addresses = _new_addresses(num_clients)
        context = multiprocessing.get_context("spawn")
        receive, send = context.Pipe(duplex=False)
        process = context.Process(target=run_engine_core, name="nanovllm-engine-core",
                                  args=(config, addresses, send, logging.getLogger().getEffectiveLevel()))
        process.start()
        send.close()
        try:
            message = receive.recv_bytes()
        except EOFError:
            process.join()
            raise EngineStartupError(f"the engine core exited with code {process.exitcode} before it was ready; "
                                     "its log above says why") from None
        info = msgspec.msgpack.decode(message, type=CoreInfo)
        if info.error is not None:
            process.join()
            raise EngineStartupError(info.error)
        logger.info("engine core process %d is ready", process.pid)
        return cls(info, addresses, max_waiting, process=process)

    @classmethod
    def from_engine(cls, engine: LLMEngine, max_waiting: int = 1024) -> AsyncLLMEngine:
        """Serve `engine` (which no one else steps) from a core loop in a thread of this process."""
        addresses = _new_addresses(1)
        thread = _CoreThread(engine, addresses)
        handle = cls(core_info(engine), addresses, max_waiting, thread=thread)
        thread.on_exit = handle._on_core_thread_exit
        thread.start()
        return handle

    def start(self) -> None:
        """Connect to the core and start reading its messages, on the running event loop."""
        if self._reader is not None:
            return
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._context = zmq.asyncio.Context()
        self._input = self._context.socket(zmq.PUSH)
        self._input.connect(self.addresses.input)
        output = self._context.socket(zmq.PULL)
        output.connect(self.addresses.outputs[self.client_index])
        self._reader = loop.create_task(self._read(output), name="nanovllm-core-reader")
        if self.process is not None:
            loop.add_reader(self.process.sentinel, self._on_process_exit)
        elif self.thread is None:   # another API process owns the core: its socket closing is the sign
            self._watcher = loop.create_task(self._watch_core(output.get_monitor_socket(zmq.EVENT_DISCONNECTED)))

    async def stop(self) -> None:
        """Refuse new requests, abort those in flight, stop the core and wait for it to exit."""
        self.accepting = False
        self._stopping = True
        self._fail_pending_adds(EngineNotRunningError("the engine is stopping"))
        for peer in self.peers:   # they drain their own requests first (or, with the core gone, fail them)
            timeout = PEER_STOP_TIMEOUT if self.error is None else 2.0
            await asyncio.get_running_loop().run_in_executor(None, peer.join, timeout)
            if peer.exitcode is None:
                logger.warning("API process %d did not stop in %d s; killing it", peer.pid, PEER_STOP_TIMEOUT)
                peer.kill()
        if self.error is None and self._input is not None:
            self.abort(list(self._streams))
            if self.process is not None or self.thread is not None:   # the owner stops the core
                await self._input.send(self._encoder.encode(Shutdown()))
        if self.process is not None:
            self._loop.remove_reader(self.process.sentinel)
            await asyncio.get_running_loop().run_in_executor(None, self.process.join, 30)
            if self.process.exitcode is None:
                logger.warning("the engine core did not stop in 30 s; killing it")
                self.process.kill()
                self.process.join()
        if self.thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.thread.join, 30)
        for task in (self._reader, self._watcher):
            if task is not None:
                task.cancel()
        if self._context is not None:
            self._context.destroy(linger=0)
        _remove_ipc_files(self.addresses)

    def kill_processes(self) -> None:
        """Kill the core and API processes this handle started that are still alive (after `stop`,
        none are): the last resort of a server that failed, so that nothing outlives it."""
        for process in [*self.peers, *([self.process] if self.process is not None else [])]:
            if process.is_alive():
                process.kill()
                process.join()

    async def drain(self, timeout: float) -> None:
        """Refuse new requests; give those in flight `timeout` seconds to finish, then abort them."""
        self.accepting = False
        deadline = time.monotonic() + timeout
        while self._streams and time.monotonic() < deadline and self.error is None:
            await asyncio.sleep(0.05)
        if self._streams and self.error is None:
            logger.warning("shutdown grace period over: aborting %d unfinished request(s)", len(self._streams))
            self.abort(list(self._streams))

    @property
    def is_running(self) -> bool:
        return self._reader is not None and self.error is None and not self._stopping

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._streams)

    # ---- requests ------------------------------------------------------------------------

    async def add_requests(self, requests: list[RequestSpec], stream: bool = True,
                           detokenize: bool = True) -> OutputStream:
        """Queue requests (all or none) and return the stream of their outputs: deltas when stream,
        else one final output each. detokenize=False: token ids only, no text (the caller decodes).

        Raises ValueError if the engine rejects one (nothing is queued then), QueueFullError if
        too many sequences wait, EngineNotRunningError while shutting down or with the core gone.
        """
        if not self.is_running:
            raise EngineNotRunningError(f"the engine is not running ({self.error or 'stopped'})")
        if not self.accepting:
            raise EngineNotRunningError("the server is shutting down and takes no new requests")
        request_ids = [request_id for request_id, _, _ in requests]
        if len(set(request_ids)) != len(request_ids) or any(rid in self._streams for rid in request_ids):
            raise ValueError("a request id is already in use by an unfinished request; pick unique ids")
        num_seqs = sum(params.n for _, _, params in requests)
        if num_seqs > self.max_waiting:
            raise ValueError(f"the request has {num_seqs} sequences (prompts times n) but at most "
                             f"{self.max_waiting} may ever wait (max_waiting); send fewer at once")
        num_waiting = self.num_waiting + self._num_sent_seqs
        if num_waiting + num_seqs > self.max_waiting:
            raise QueueFullError(f"{num_waiting} sequences are already waiting (max_waiting={self.max_waiting}); "
                                 "retry later")
        outputs = OutputStream(self, request_ids)
        for request_id in request_ids:
            self._streams[request_id] = outputs
        verdict: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending_adds[request_ids[0]] = (verdict, num_seqs)
        self._num_sent_seqs += num_seqs
        now = time.time()
        message = AddRequests(self.client_index, [EngineRequest(rid, list(ids), params, now)
                                                  for rid, ids, params in requests], stream=stream, delta=stream,
                               detokenize=detokenize)
        await self._input.send(self._encoder.encode(message))
        try:
            await verdict
        except asyncio.CancelledError:   # the caller left: abort what may have been queued
            self.abort(request_ids)
            self._forget(request_ids)
            raise
        except BaseException:
            self._forget(request_ids)
            raise
        return outputs

    async def generate(self, request_id: str, prompt: list[int], params: SamplingParams,
                       stream: bool = True) -> AsyncIterator[RequestOutput]:
        """One request's outputs as they come; leaving the loop early aborts it."""
        outputs = await self.add_requests([(request_id, prompt, params)], stream)
        try:
            async for output in outputs:
                yield output
        finally:
            outputs.close()

    def abort(self, request_ids: list[str]) -> None:
        """Abort unfinished requests at the core's next step; their streams end with finish_reason "abort"."""
        known = [request_id for request_id in request_ids if request_id in self._streams]
        if known and self._input is not None and self.error is None:
            self._input.send(self._encoder.encode(Abort(known)))

    def _forget(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._streams.pop(request_id, None)

    # ---- the core's messages -------------------------------------------------------------

    async def _read(self, socket: zmq.asyncio.Socket) -> None:
        """Dispatch the core's messages: those waiting at once (their deltas join in the streams), then
        let the callers' tasks run. Awaiting a message already there does not yield to the event loop,
        so a reader that did not yield here would starve every stream for as long as the core is busy."""
        decoder = msgspec.msgpack.Decoder(StepOutputs)
        while True:
            self._dispatch(decoder.decode(await socket.recv()))
            for _ in range(MAX_MESSAGES_PER_TURN - 1):
                if not socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    break
                self._dispatch(decoder.decode(await socket.recv()))
            await asyncio.sleep(0)

    def _dispatch(self, message: StepOutputs) -> None:
        for request_id, reason in message.rejected:
            self._settle(request_id, ValueError(reason))
        for request_id in message.accepted:
            self._settle(request_id, None)
        self.num_waiting = message.num_waiting
        if message.stats is not None:
            self.stats = message.stats
        for output in message.deltas.outputs():
            stream = self._streams.get(output.request_id)
            if stream is not None:
                stream.put(output)
        for output in message.outputs:
            stream = self._streams.get(output.request_id)
            if output.finished:
                self._streams.pop(output.request_id, None)
                if self.on_finished is not None:
                    try:
                        self.on_finished(output)
                    except Exception:
                        logger.exception("on_finished failed; the server goes on")
            if stream is not None:
                stream.put(output)

    def _settle(self, request_id: str, error: Exception | None) -> None:
        pending = self._pending_adds.pop(request_id, None)
        if pending is None:
            return
        verdict, num_seqs = pending
        self._num_sent_seqs -= num_seqs
        if verdict.done():
            return
        if error is None:
            verdict.set_result(None)
        else:
            verdict.set_exception(error)

    def _fail_pending_adds(self, error: Exception) -> None:
        for verdict, _ in self._pending_adds.values():
            if not verdict.done():
                verdict.set_exception(error)
        self._pending_adds.clear()
        self._num_sent_seqs = 0

    # ---- a core that dies ----------------------------------------------------------------

    async def _watch_core(self, monitor: zmq.asyncio.Socket) -> None:
        await monitor.recv_multipart()   # the one event asked for: the core's end of the socket closed
        self._core_died("the engine core went away")

    def _on_process_exit(self) -> None:
        self._loop.remove_reader(self.process.sentinel)
        self.process.join()
        self._core_died(f"the engine core process exited with code {self.process.exitcode}")

    def _on_core_thread_exit(self, error: BaseException | None) -> None:
        if error is not None and self._loop is not None:
            reason = f"the engine core failed: {type(error).__name__}: {error}"
            self._loop.call_soon_threadsafe(self._core_died, reason)

    def _core_died(self, reason: str) -> None:
        if self._stopping or self.error is not None:
            return
        logger.error("%s; every request in flight ends with an error", reason)
        self.error = failure = EngineDeadError(reason)
        self._fail_pending_adds(failure)
        for stream in set(self._streams.values()):
            stream.fail(failure)
        self._streams.clear()
        if self.on_dead is not None:
            self.on_dead()


def _new_addresses(num_clients: int) -> CoreAddresses:
    base = os.path.join(tempfile.gettempdir(), f"nanovllm-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    return CoreAddresses(input=f"ipc://{base}-in", outputs=[f"ipc://{base}-out{i}" for i in range(num_clients)])


def _remove_ipc_files(addresses: CoreAddresses) -> None:
    for address in [addresses.input, *addresses.outputs]:
        try:
            os.unlink(address.removeprefix("ipc://"))
        except OSError:
            pass
