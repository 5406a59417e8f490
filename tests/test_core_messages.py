"""The engine core's protocol (core.py) and the API process's side of it (async_engine.py), in one process.

The core is driven through fake sockets (a `FakeContext` hands `EngineCore` sockets that keep what
is sent and serve what a test queued) over a `FakeEngine` that yields one token a step, so each test
runs in milliseconds, starts no process and loads no model. The API side talks to a `FakeCore`: real
ZeroMQ sockets on ipc files under the test's temporary folder, where the test plays the core and
decides what each message says. The multi-process tests (test_server*.py) cover the real processes.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import tempfile
from types import SimpleNamespace

import msgspec
import pytest
import zmq
import zmq.asyncio

from nanovllm.engine import async_engine as async_module
from nanovllm.engine import core as core_module
from nanovllm.engine.async_engine import (
    AsyncLLMEngine, EngineDeadError, EngineNotRunningError, OutputStream, QueueFullError, _new_addresses,
    _remove_ipc_files,
)
from nanovllm.engine.block_manager import KVCacheUsage
from nanovllm.engine.core import (
    Abort, AddRequests, CoreAddresses, CoreInfo, EngineCore, EngineRequest, Shutdown, StepOutputs, core_info,
)
from nanovllm.engine.engine import EngineStats
from nanovllm.outputs import CompletionOutput, RequestMetrics, RequestOutput, StepDeltas
from nanovllm.sampling_params import SamplingParams
from nanovllm.tokenizer import TokenIdTokenizer


def stats(num_steps: int = 0) -> EngineStats:
    usage = KVCacheUsage(num_blocks=8, block_size=16, used_slots=0, fragmentation_slots=0, free_slots=128,
                         free_blocks=8, cached_free_blocks=0, prefix_cache_queries=0, prefix_cache_hits=0)
    return EngineStats(num_running=0, num_waiting=0, num_preemptions=0, kv_usage=usage, num_steps=num_steps,
                       num_requests_finished=0, prompt_tokens_total=0, generation_tokens_total=0,
                       prefill_tokens_total=0, decode_tokens_total=0)


def final(request_id: str, token_ids: list[int], reason: str = "length", n: int = 1) -> RequestOutput:
    completions = [CompletionOutput(index, "", list(token_ids), 0.0, None, reason) for index in range(n)]
    return RequestOutput(request_id, None, [1, 2], completions, True, RequestMetrics(arrival_time=0.0))


def logged(caplog, module: str) -> list[str]:
    """The messages logged by nanovllm.engine.`module` (not asyncio's notes about other tests' leftovers)."""
    return [record.getMessage() for record in caplog.records if record.name == f"nanovllm.engine.{module}"]


# ---- the core side: fake sockets, a fake engine ---------------------------------------------------

class FakeSocket:
    """What EngineCore does with a ZeroMQ socket, recorded. `connected = False`: sends fail as they do
    while no API process is connected (zmq.Again)."""

    def __init__(self, kind: int):
        self.kind = kind
        self.address: str | None = None
        self.options: dict[int, int] = {}
        self.inbox: list[bytes] = []     # what recv returns, in order
        self.sent: list[bytes] = []
        self.connected = True
        self.closed_with_linger: int | None = None

    def bind(self, address: str) -> None:
        self.address = address

    def setsockopt(self, option: int, value: int) -> None:
        self.options[option] = value

    def recv(self, flags: int = 0) -> bytes:
        assert flags == zmq.NOBLOCK, "the core must never block on a receive"
        if not self.inbox:
            raise zmq.Again()
        return self.inbox.pop(0)

    def send(self, data, copy: bool = True, flags: int = 0) -> None:
        assert flags == zmq.NOBLOCK, "the core must never block on a send"
        assert copy is False, "the core hands its encoded messages to ZeroMQ without a copy"
        if not self.connected:
            raise zmq.Again()
        self.sent.append(bytes(data))

    def close(self, linger: int | None = None) -> None:
        self.closed_with_linger = linger


class FakeContext:
    def __init__(self):
        self.sockets: list[FakeSocket] = []

    def socket(self, kind: int) -> FakeSocket:
        self.sockets.append(FakeSocket(kind))
        return self.sockets[-1]


class FakePoller:
    """Stands in for zmq.Poller over a FakeSocket: `poll` reports whether the inbox holds a message.
    An idle poll (nothing waiting) queues the next of `on_idle`'s messages, and Shutdown when none is
    left, so that a loop under test always ends."""

    def __init__(self, on_idle: list[bytes]):
        self.on_idle = on_idle
        self.socket: FakeSocket | None = None
        self.timeouts: list[int] = []

    def register(self, socket: FakeSocket, flags: int) -> None:
        assert flags == zmq.POLLIN
        self.socket = socket

    def poll(self, timeout: int) -> list:
        self.timeouts.append(timeout)
        if self.socket.inbox:
            return [(self.socket, zmq.POLLIN)]
        self.socket.inbox.append(self.on_idle.pop(0) if self.on_idle else encode(Shutdown()))
        return []


class FakeEngine:
    """The methods EngineCore calls. Each request gains token k at its k-th step (one row per sample
    for a delta stream) and finishes with max_tokens (a delta stream's final output holds its last
    token, a quiet request's all of them); an abort ends it at the next step. A prompt
    holding token 0 is refused with a ValueError, as the engine refuses what it cannot serve."""

    def __init__(self, num_waiting: int = 0):
        self.requests: dict[str, list] = {}   # id -> [params, tokens so far, delta]
        self.pending: list[RequestOutput] = []   # aborts' final outputs, for the next step
        self.calls: list[tuple] = []
        self.num_steps = 0
        self.num_waiting = num_waiting

    def add_requests(self, requests, arrival_time, stream=True, delta=False, detokenize=True) -> None:
        self.calls.append(("add", [r[0] for r in requests], arrival_time, stream, delta, detokenize))
        for request_id, prompt, _ in requests:
            if 0 in prompt:
                raise ValueError(f"request {request_id} holds token 0, which this engine refuses")
        for request_id, _, params in requests:
            self.requests[request_id] = [params, [], delta]

    def abort_request(self, request_id: str) -> None:
        self.calls.append(("abort", request_id))
        request = self.requests.pop(request_id, None)
        if request is not None:
            self.pending.append(final(request_id, request[1], "abort", request[0].n))

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self.pending)

    def step_with_deltas(self) -> tuple[list[RequestOutput], StepDeltas]:
        self.num_steps += 1
        outputs, self.pending = self.pending, []
        deltas = StepDeltas()
        for request_id, (params, tokens, delta) in list(self.requests.items()):
            tokens.append(len(tokens))
            if len(tokens) == params.max_tokens:
                del self.requests[request_id]
                outputs.append(final(request_id, tokens[-1:] if delta else tokens, n=params.n))
            elif delta:
                for _ in range(params.n):
                    deltas.add(request_id, tokens[-1:], f"t{tokens[-1]}", -0.5 * len(tokens), None)
        return outputs, deltas

    def get_stats(self) -> EngineStats:
        return stats(self.num_steps)

    def get_num_waiting(self) -> int:
        return self.num_waiting


encode = msgspec.msgpack.encode
decode_outputs = msgspec.msgpack.Decoder(StepOutputs).decode


def greedy(max_tokens: int, n: int = 1) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, n=n)


def add(client: int, *request_ids: str, max_tokens: int = 2, n: int = 1, prompt: list[int] | None = None,
        arrival_time: float = 100.0, stream: bool = True, detokenize: bool = True) -> bytes:
    """An AddRequests message (encoded): request i arrives at arrival_time + i."""
    requests = [EngineRequest(request_id, prompt or [1, 2], greedy(max_tokens, n), arrival_time + i)
                for i, request_id in enumerate(request_ids)]
    return encode(AddRequests(client, requests, stream=stream, delta=stream, detokenize=detokenize))


def make_core(num_clients: int = 1, engine: FakeEngine | None = None) -> EngineCore:
    addresses = CoreAddresses("ipc://in", [f"ipc://out{i}" for i in range(num_clients)])
    return EngineCore(engine or FakeEngine(), FakeContext(), addresses)


def received(core: EngineCore, client: int = 0) -> list[StepOutputs]:
    """The messages the core sent to `client` so far (and forgets them)."""
    socket = core.output_sockets[client]
    messages, socket.sent = [decode_outputs(data) for data in socket.sent], []
    return messages


def run_loop(core: EngineCore, *messages: bytes, on_idle: tuple[bytes, ...] = (), parent_pid: int | None = None,
             monkeypatch) -> FakePoller:
    """Queue `messages`, then run the busy loop until a Shutdown (queued at the first idle poll after
    `on_idle`'s messages) stops it."""
    poller = FakePoller(list(on_idle))
    monkeypatch.setattr(core_module.zmq, "Poller", lambda: poller)
    core.input_socket.inbox.extend(messages)
    core.run_busy_loop(parent_pid)
    return poller


def tokens_by_request(messages: list[StepOutputs]) -> dict[str, list[int]]:
    """Every token each request received, deltas and final outputs joined in order (sample 0)."""
    tokens: dict[str, list[int]] = {}
    for message in messages:
        for output in message.deltas.outputs() + message.outputs:
            tokens.setdefault(output.request_id, []).extend(output.outputs[0].token_ids)
    return tokens


def test_the_core_pulls_from_one_input_and_pushes_to_one_never_full_socket_per_api_process():
    context = FakeContext()
    core = EngineCore(FakeEngine(), context, CoreAddresses("ipc://in", ["ipc://out0", "ipc://out1"]))
    assert [(s.kind, s.address) for s in context.sockets] == [
        (zmq.PULL, "ipc://in"), (zmq.PUSH, "ipc://out0"), (zmq.PUSH, "ipc://out1")]
    assert core.input_socket is context.sockets[0] and core.output_sockets == context.sockets[1:]
    assert [s.options for s in core.output_sockets] == [{zmq.SNDHWM: 0}] * 2
    assert core.running and core.unreachable_grace == core_module.UNREACHABLE_GRACE
    core.close()
    assert [s.closed_with_linger for s in context.sockets] == [0, 0, 0]


def test_requests_are_accepted_in_a_message_of_their_own_before_the_step_that_runs_them(monkeypatch):
    core = make_core()
    run_loop(core, add(0, "a", "b", max_tokens=3), monkeypatch=monkeypatch)
    verdict, *steps = received(core)
    assert verdict.accepted == ["a", "b"] and verdict.rejected == [] and verdict.outputs == []
    assert len(verdict.deltas) == 0
    assert [len(message.deltas) for message in steps] == [2, 2, 0]   # two delta rows a step, then the finals
    assert [output.request_id for output in steps[-1].outputs] == ["a", "b"]
    assert all(message.accepted == [] for message in steps)
    assert tokens_by_request(steps) == {"a": [0, 1, 2], "b": [0, 1, 2]}
    assert not core.running and core.client_of == {}


def test_add_requests_passes_the_engine_the_earliest_arrival_and_the_callers_options(monkeypatch):
    engine = FakeEngine()
    core = make_core(engine=engine)
    run_loop(core, add(0, "a", "b", arrival_time=7.0, stream=False, detokenize=False), add(0, "c"),
             monkeypatch=monkeypatch)
    assert engine.calls == [("add", ["a", "b"], 7.0, False, False, False), ("add", ["c"], 100.0, True, True, True)]
    assert tokens_by_request(received(core)) == {"a": [0, 1], "b": [0, 1], "c": [0, 1]}


def test_a_refused_add_is_answered_alone_with_its_first_id_and_the_engines_sentence(monkeypatch):
    core = make_core(num_clients=2)
    run_loop(core, add(1, "x", "bad", prompt=[0]), add(1, "ok"), monkeypatch=monkeypatch)
    verdict, *steps = received(core, 1)
    assert verdict.rejected == [("x", "request x holds token 0, which this engine refuses")]
    assert verdict.accepted == ["ok"]
    assert tokens_by_request(steps) == {"ok": [0, 1]}
    assert all(message.rejected == [] for message in steps)
    assert all(message.rejected == [] and message.accepted == [] for message in received(core, 0))


def test_each_api_process_gets_the_outputs_and_delta_rows_of_its_own_requests_only(monkeypatch):
    core = make_core(num_clients=2)
    run_loop(core, add(0, "a0", max_tokens=3, n=2), add(1, "a1", "b1", max_tokens=4),
             add(0, "q0", max_tokens=2, stream=False), monkeypatch=monkeypatch)
    to_0, to_1 = received(core, 0), received(core, 1)
    assert to_0[0].accepted == ["a0", "q0"] and to_1[0].accepted == ["a1", "b1"]
    rows_0 = [list(zip(m.deltas.request_ids, m.deltas.num_tokens, m.deltas.texts, m.deltas.cumulative_logprobs))
              for m in to_0 if len(m.deltas)]
    assert rows_0 == [[("a0", 1, "t0", -0.5)] * 2, [("a0", 1, "t1", -1.0)] * 2]
    assert [m.deltas.token_ids for m in to_0 if len(m.deltas)] == [[0, 0], [1, 1]]
    assert tokens_by_request(to_0) == {"a0": [0, 1, 2], "q0": [0, 1]}
    assert tokens_by_request(to_1) == {"a1": [0, 1, 2, 3], "b1": [0, 1, 2, 3]}
    assert [output.outputs[1].token_ids for m in to_0 for output in m.outputs if output.request_id == "a0"] == [[2]]


def test_split_keeps_each_rows_tokens_and_logprobs_and_drops_rows_of_unknown_requests():
    core = make_core(num_clients=2)
    core.client_of = {"a": 0, "b": 1, "c": 0}
    deltas = StepDeltas()
    deltas.add("gone", [9, 9, 9], "x", -9.0, None)   # aborted, or never known here
    deltas.add("a", [1, 2], "ab", -1.0, None)
    deltas.add("b", [3], "c", -2.0, [{3: -2.0}])
    deltas.add("c", [], "", -3.0, None)
    deltas.add("c", [4, 5, 6], "def", -4.0, [{4: -1.0}, {5: -1.5}, {6: -1.5}])
    part_0, part_1 = core._split(deltas)
    assert part_0 == StepDeltas(["a", "c", "c"], [2, 0, 3], [1, 2, 4, 5, 6], ["ab", "", "def"], [-1.0, -3.0, -4.0],
                                [None, None, [{4: -1.0}, {5: -1.5}, {6: -1.5}]])
    assert part_1 == StepDeltas(["b"], [1], [3], ["c"], [-2.0], [[{3: -2.0}]])


def test_a_finished_request_is_forgotten_and_outputs_of_unknown_requests_are_dropped():
    core = make_core()
    core.client_of = {"a": 0, "b": 0}
    running = RequestOutput("b", None, [], [CompletionOutput(0, "", [5], 0.0, None)], False, None)
    core._send([final("a", [1]), final("stranger", [2]), running], StepDeltas())
    (message,) = received(core)
    assert [(output.request_id, output.finished) for output in message.outputs] == [("a", True), ("b", False)]
    assert core.client_of == {"b": 0}


def test_aborts_reach_the_engine_in_order_even_for_unknown_ids_and_the_aborted_end_with_abort(monkeypatch):
    engine = FakeEngine()
    core = make_core(engine=engine)
    run_loop(core, add(0, "a", "b", max_tokens=50), encode(Abort(["nobody", "b"])), encode(Abort(["a"])),
             monkeypatch=monkeypatch)
    assert [call for call in engine.calls if call[0] == "abort"] == [("abort", "nobody"), ("abort", "b"),
                                                                      ("abort", "a")]
    outputs = [output for message in received(core) for output in message.outputs]
    assert [(output.request_id, output.outputs[0].finish_reason) for output in outputs] == [("b", "abort"),
                                                                                           ("a", "abort")]
    assert engine.num_steps == 1 and not engine.has_unfinished_requests()


def test_shutdown_stops_the_loop_and_leaves_the_messages_after_it_unread(monkeypatch):
    engine = FakeEngine()
    core = make_core(engine=engine)
    poller = run_loop(core, encode(Shutdown()), add(0, "late"), monkeypatch=monkeypatch)
    assert engine.calls == [] and not core.running
    assert len(core.input_socket.inbox) == 1 and poller.timeouts == [1000]


def test_an_unreadable_message_is_dropped_with_a_log_and_the_loop_serves_on(monkeypatch, caplog):
    core = make_core()
    unreadable = [b"\x93not msgpack", encode(["Abort", "not a list"])]
    errors = []
    for data in unreadable:
        with pytest.raises(msgspec.DecodeError) as error:
            msgspec.msgpack.Decoder(core_module.CoreInput).decode(data)
        errors.append(str(error.value))
    with caplog.at_level(logging.ERROR, logger="nanovllm.engine.core"):
        run_loop(core, *unreadable, add(0, "a"), monkeypatch=monkeypatch)
    assert tokens_by_request(received(core)) == {"a": [0, 1]}
    assert logged(caplog, "core") == [f"dropped a message the engine core cannot read: {error}" for error in errors]


def test_one_turn_takes_every_message_waiting_past_an_unreadable_one():
    core = make_core()
    core.input_socket.inbox.extend([add(0, "a"), b"\xc1", add(0, "b")])   # 0xc1: never valid msgpack
    core._take_inputs()
    assert core.accepted == [["a", "b"]] and core.input_socket.inbox == []


def test_the_idle_core_waits_a_second_for_input_or_10_ms_while_messages_wait_to_be_sent(monkeypatch):
    core = make_core(num_clients=2)
    core.output_sockets[0].connected = False   # API process 0 has not connected yet; 1 has
    poller = FakePoller([])
    polls = []

    def poll(timeout):
        polls.append(timeout)
        if len(polls) == 3:
            core.output_sockets[0].connected = True
        if len(polls) == 5:
            core.input_socket.inbox.append(encode(Shutdown()))
        return [(core.input_socket, zmq.POLLIN)] if core.input_socket.inbox else []

    poller.poll = poll
    monkeypatch.setattr(core_module.zmq, "Poller", lambda: poller)
    core.input_socket.inbox.append(add(0, "a", max_tokens=1))
    core.run_busy_loop()
    assert polls == [1000, 10, 10, 1000, 1000]   # the third poll's retry sends the backlog
    assert [m.accepted for m in received(core, 0)] == [["a"], []]
    idle_stats = received(core, 1)   # each retry also brings client 1 a fresh snapshot
    assert len(idle_stats) == 4 and all(m.stats is not None and len(m.deltas) == 0 for m in idle_stats)
    assert core.backlog == [[], []]


def test_the_loop_stops_when_its_parent_process_is_gone_and_not_before(monkeypatch, caplog):
    core = make_core()
    with caplog.at_level(logging.WARNING, logger="nanovllm.engine.core"):
        run_loop(core, parent_pid=os.getppid(), monkeypatch=monkeypatch)   # its parent is alive: Shutdown stops it
        assert not core.running and logged(caplog, "core") == []
        core.running = True
        run_loop(core, parent_pid=-1, monkeypatch=monkeypatch)   # no process has that id: gone
    assert core.running   # it returned at the idle poll, before reading the Shutdown queued there
    assert logged(caplog, "core") == ["the server process is gone; the engine core stops"]


def test_stats_go_out_when_idle_and_at_most_every_interval_while_busy(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(core_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    engine = FakeEngine(num_waiting=3)
    core = make_core(engine=engine)
    engine.add_requests([("a", [1], greedy(10))], 0.0, delta=True)
    core.client_of["a"] = 0
    sent_stats = []
    for step in range(6):
        clock[0] += core_module.STATS_INTERVAL / 2
        core._send(*engine.step_with_deltas())
        sent_stats.append(received(core)[0].stats)
    assert [s is not None and s.num_steps for s in sent_stats] == [1, False, 3, False, 5, False]
    engine.requests.clear()   # idle: a snapshot with every message
    clock[0] += 0.001
    core._send([], StepDeltas())
    (message,) = received(core)
    assert message.stats.num_steps == 6 and message.num_waiting == 3


def test_a_message_with_nothing_in_it_is_not_sent(monkeypatch):
    monkeypatch.setattr(core_module, "time", SimpleNamespace(monotonic=lambda: 0.0))   # no snapshot due
    engine = FakeEngine()
    core = make_core(engine=engine)
    engine.requests["busy"] = [greedy(5), [], False]
    core._send([], StepDeltas())
    assert received(core) == []


def test_messages_for_an_unconnected_api_process_wait_in_order_and_stats_alone_are_not_queued(monkeypatch):
    clock = [50.0]
    monkeypatch.setattr(core_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    engine = FakeEngine()
    core = make_core(num_clients=2, engine=engine)
    socket_1 = core.output_sockets[1]
    socket_1.connected = False
    core._add(decode_add(add(1, "a", max_tokens=3)))
    core._add(decode_add(add(0, "z", max_tokens=3)))
    core._send([], StepDeltas())            # the verdicts
    core._send(*engine.step_with_deltas())  # a step
    clock[0] += core_module.STATS_INTERVAL
    core._send([], StepDeltas())            # stats only: sent to client 0, not queued for client 1
    assert len(core.backlog[1]) == 2 and core.unreachable_since == {1: 50.0}
    assert len(core.output_sockets[0].sent) == 3   # client 0 is not held up
    assert received(core, 0)[-1].stats is not None
    clock[0] += core.unreachable_grace - 1.0
    socket_1.connected = True
    core._send(*engine.step_with_deltas())
    messages = received(core, 1)
    assert [m.accepted for m in messages] == [["a"], [], []]
    assert [m.deltas.token_ids for m in messages] == [[], [0], [1]]
    assert core.backlog == [[], []] and core.unreachable_since == {}


def decode_add(data: bytes) -> AddRequests:
    return msgspec.msgpack.decode(data, type=AddRequests)


def test_an_api_process_unreachable_for_the_grace_period_is_gone_and_its_requests_are_aborted(monkeypatch,
                                                                                                caplog):
    clock = [0.0]
    monkeypatch.setattr(core_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    engine = FakeEngine()
    core = make_core(num_clients=2, engine=engine)
    core.output_sockets[1].connected = False
    core._add(decode_add(add(1, "a", "b", max_tokens=9)))
    core._add(decode_add(add(0, "kept", max_tokens=9)))
    core._send([], StepDeltas())
    clock[0] = core.unreachable_grace - 0.01
    core._send(*engine.step_with_deltas())
    assert engine.calls[-1][0] == "add" and core.unreachable_since == {1: 0.0}   # not gone yet
    clock[0] = core.unreachable_grace
    with caplog.at_level(logging.WARNING, logger="nanovllm.engine.core"):
        core._send(*engine.step_with_deltas())
    assert engine.calls[-2:] == [("abort", "a"), ("abort", "b")]
    assert logged(caplog, "core") == ["API process 1 is gone; aborting its 2 request(s)"]
    assert core.client_of == {"kept": 0} and core.backlog == [[], []] and core.unreachable_since == {}
    core._send(*engine.step_with_deltas())   # the aborts' final outputs are for no one now
    assert core.backlog == [[], []] and len(received(core, 0)) == 4


def test_core_info_tells_the_api_process_what_it_needs_of_the_engine():
    engine = SimpleNamespace(
        config=SimpleNamespace(model="m", tokenizer="t", max_model_len=64, load_format="gguf",
                               skip_tokenizer_init=True, kv_cache_dtype_name="float8_e4m3fn"),
        tokenizer=SimpleNamespace(eos_token_ids=[2, 7], bos_token_id=1),
        model_config=SimpleNamespace(vocab_size=320), get_stats=lambda: stats(4))
    assert core_info(engine) == CoreInfo("m", "t", 64, 320, stats(4), load_format="gguf", token_ids_only=False,
                                         makes_text=False, eos_token_ids=[2, 7], bos_token_id=1,
                                         kv_cache_dtype="float8_e4m3fn")
    engine.tokenizer = TokenIdTokenizer(320, [2, 7], 1)
    engine.config.skip_tokenizer_init = False
    info = core_info(engine)
    assert info.token_ids_only and info.makes_text


# ---- the API side: AsyncLLMEngine against a core played by the test --------------------------------

INFO = CoreInfo(model="m", tokenizer=None, max_model_len=64, vocab_size=320, stats=stats(0))


class FakeCore:
    """The core's end of the sockets (real ZeroMQ, ipc files): the test reads what the API process
    sends and decides what the core answers. `serve(handle)` starts the handle; `send` then returns
    once the handle has dispatched the message."""

    def __init__(self, num_clients: int = 1):
        self.num_sent = 0
        self.num_dispatched = 0
        self.addresses = _new_addresses(num_clients)
        self.context = zmq.asyncio.Context()
        self.input = self.context.socket(zmq.PULL)
        self.input.bind(self.addresses.input)
        self.outputs = []
        for address in self.addresses.outputs:
            self.outputs.append(self.context.socket(zmq.PUSH))
            self.outputs[-1].bind(address)
        self.decoder = msgspec.msgpack.Decoder(core_module.CoreInput)

    def serve(self, handle: AsyncLLMEngine) -> None:
        dispatch = handle._dispatch

        def counted(message: StepOutputs) -> None:
            dispatch(message)
            self.num_dispatched += 1

        handle._dispatch = counted
        handle.start()

    async def receive(self):
        return self.decoder.decode(await asyncio.wait_for(self.input.recv(), 1))

    async def nothing_received(self) -> bool:
        await asyncio.sleep(0.02)
        return not await self.input.poll(timeout=0)

    async def send(self, outputs=(), deltas: StepDeltas | None = None, accepted=(), rejected=(), num_waiting=0,
                   stats: EngineStats | None = None, client: int = 0) -> None:
        message = StepOutputs(list(outputs), deltas or StepDeltas(), list(accepted), list(rejected), num_waiting,
                              stats)
        await self.outputs[client].send(encode(message))
        self.num_sent += 1
        async with asyncio.timeout(2):   # the reader dispatches it
            while self.num_dispatched < self.num_sent:
                await asyncio.sleep(0.002)

    def close(self) -> None:
        self.context.destroy(linger=0)
        _remove_ipc_files(self.addresses)


def delta(*rows: tuple[str, list[int]]) -> StepDeltas:
    deltas = StepDeltas()
    for request_id, token_ids in rows:
        deltas.add(request_id, token_ids, "".join(f"<{t}>" for t in token_ids), -1.0, None)
    return deltas


def against_core(body, **engine_args):
    """Run `body(core, handle)` with an AsyncLLMEngine connected to a FakeCore, then stop both."""
    async def main():
        core = FakeCore()
        handle = AsyncLLMEngine(INFO, core.addresses, **engine_args)
        core.serve(handle)
        try:
            return await asyncio.wait_for(body(core, handle), 3)
        finally:
            await handle.stop()
            core.close()
    return asyncio.run(main())


async def added(core: FakeCore, handle: AsyncLLMEngine, requests, **options) -> OutputStream:
    """add_requests, with the core accepting them."""
    task = asyncio.create_task(handle.add_requests(requests, **options))
    message = await core.receive()
    await core.send(accepted=[r.request_id for r in message.requests])
    return await task


def test_add_requests_sends_one_message_and_returns_once_the_core_accepts():
    async def body(core, handle):
        task = asyncio.create_task(handle.add_requests([("a", [1, 2], greedy(3)), ("b", [3], greedy(2, n=2))],
                                                       stream=False, detokenize=False))
        message = await core.receive()
        assert not task.done()   # no verdict yet
        await core.send(accepted=["a", "b"])
        return message, await task

    message, stream = against_core(body)
    assert isinstance(message, AddRequests) and message.client_index == 0
    assert [(r.request_id, r.prompt_token_ids, r.params) for r in message.requests] == [
        ("a", [1, 2], greedy(3)), ("b", [3], greedy(2, n=2))]
    assert (message.stream, message.delta, message.detokenize) == (False, False, False)
    assert message.requests[0].arrival_time == message.requests[1].arrival_time > 1e9   # time.time()
    assert stream.request_ids == ["a", "b"] and stream.unfinished == {"a", "b"} and not stream.finished


def test_add_requests_streams_deltas_and_detokenizes_by_default_and_says_which_api_process_it_is():
    async def body(core, handle):
        task = asyncio.create_task(handle.add_requests([("a", [1], greedy(3))]))
        message = await core.receive()
        task.cancel()
        return message

    async def main():
        core = FakeCore(num_clients=2)
        handle = AsyncLLMEngine(INFO, core.addresses, client_index=1)
        handle.start()
        try:
            return await body(core, handle)
        finally:
            await handle.stop()
            core.close()

    message = asyncio.run(main())
    assert (message.client_index, message.stream, message.delta, message.detokenize) == (1, True, True, True)


def test_a_request_the_core_rejects_raises_its_sentence_and_leaves_its_id_free():
    async def body(core, handle):
        task = asyncio.create_task(handle.add_requests([("a", [1], greedy(3)), ("b", [1], greedy(3))]))
        await core.receive()
        await core.send(rejected=[("a", "prompt b is too long")])
        with pytest.raises(ValueError, match=r"^prompt b is too long$"):
            await task
        assert handle.num_unfinished_requests == 0
        return await added(core, handle, [("b", [1], greedy(3))])

    assert against_core(body).request_ids == ["b"]


def test_request_ids_in_use_are_refused_before_anything_is_sent():
    sentence = r"^a request id is already in use by an unfinished request; pick unique ids$"

    async def body(core, handle):
        with pytest.raises(ValueError, match=sentence):
            await handle.add_requests([("a", [1], greedy(3)), ("a", [2], greedy(3))])
        await added(core, handle, [("a", [1], greedy(3))])
        with pytest.raises(ValueError, match=sentence):
            await handle.add_requests([("b", [1], greedy(3)), ("a", [2], greedy(3))])
        return await core.nothing_received()

    assert against_core(body)


def test_the_waiting_queue_counts_the_cores_waiting_and_the_sequences_sent_since():
    async def body(core, handle):
        with pytest.raises(ValueError, match=r"^the request has 5 sequences \(prompts times n\) but at most 4 may "
                                             r"ever wait \(max_waiting\); send fewer at once$"):
            await handle.add_requests([("a", [1], greedy(3, n=2)), ("b", [1], greedy(3, n=3))])
        first = asyncio.create_task(handle.add_requests([("a", [1], greedy(3, n=3))]))
        await core.receive()   # three sequences sent, not yet acknowledged
        with pytest.raises(QueueFullError, match=r"^3 sequences are already waiting \(max_waiting=4\); retry later$"):
            await handle.add_requests([("b", [1], greedy(3, n=2))])
        second = asyncio.create_task(handle.add_requests([("b", [1], greedy(3))]))   # exactly full
        await core.receive()
        with pytest.raises(QueueFullError, match=r"^4 sequences are already waiting"):
            await handle.add_requests([("b2", [1], greedy(3))])
        await core.send(accepted=["a"], rejected=[("b", "no")], num_waiting=1)
        await first
        with pytest.raises(ValueError):
            await second
        third = asyncio.create_task(handle.add_requests([("c", [1], greedy(3, n=3))]))   # 1 waiting + 3
        await core.receive()
        await core.send(accepted=["c"], num_waiting=2)
        await third
        with pytest.raises(QueueFullError, match=r"^2 sequences"):
            await handle.add_requests([("d", [1], greedy(3, n=3))])
        return handle.num_waiting

    assert against_core(body, max_waiting=4) == 2


def test_a_request_of_exactly_max_waiting_sequences_fits_an_empty_queue():
    async def body(core, handle):
        return (await added(core, handle, [("a", [1], greedy(3, n=2))])).request_ids

    assert against_core(body, max_waiting=2) == ["a"]


@pytest.mark.parametrize("max_waiting", [0, -1, True, 2.0, "8"])
def test_max_waiting_must_be_a_positive_integer(max_waiting):
    with pytest.raises(ValueError, match=rf"^max_waiting must be a positive integer, got {max_waiting!r}$"):
        AsyncLLMEngine(INFO, CoreAddresses("ipc://in", ["ipc://out"]), max_waiting)


def test_a_handle_starts_from_what_the_core_reported():
    handle = AsyncLLMEngine(INFO, CoreAddresses("ipc://in", ["ipc://out"]), 1)
    assert handle.stats is INFO.stats and handle.info is INFO and handle.max_waiting == 1
    assert handle.num_waiting == 0 and handle.num_unfinished_requests == 0
    assert handle.accepting and not handle.is_running and handle.error is None
    assert AsyncLLMEngine(INFO, handle.addresses).max_waiting == 1024


def test_a_handle_never_started_stops_quietly_and_ignores_a_core_threads_end():
    handle = AsyncLLMEngine(INFO, _new_addresses(1))
    handle._on_core_thread_exit(RuntimeError("no loop to tell yet"))
    asyncio.run(handle.stop())
    assert handle.error is None and not handle.is_running


def test_each_stream_gets_its_own_deltas_joined_until_read_and_its_final_output_ends_it():
    finished = []

    async def body(core, handle):
        ab = await added(core, handle, [("a", [1], greedy(3)), ("b", [1], greedy(3))])
        c = await added(core, handle, [("c", [1], greedy(3))])
        await core.send(deltas=delta(("a", [5]), ("c", [7]), ("stranger", [1])))
        await core.send(deltas=delta(("a", [6]), ("b", [8, 9])), outputs=[final("nobody", [1])])
        first = {output.request_id: output.outputs[0].token_ids for output in await ab.get()}
        texts = [output.outputs[0].text for output in c._unread.values()]
        await core.send(outputs=[final("a", [4])])
        a_final = await ab.get()
        assert ab.unfinished == {"b"} and handle.num_unfinished_requests == 2
        await core.send(outputs=[final("b", [3]), final("c", [2])])
        rest = [output async for output in ab]
        return first, texts, a_final, rest, [output async for output in c]

    first, texts, a_final, rest, c_outputs = against_core(body, on_finished=finished.append)
    assert first == {"a": [5, 6], "b": [8, 9]} and texts == ["<7>"]
    assert [(o.request_id, o.finished, o.outputs[0].token_ids) for o in a_final] == [("a", True, [4])]
    assert [(o.request_id, o.outputs[0].token_ids) for o in rest] == [("b", [3])]
    assert [o.outputs[0].token_ids for o in c_outputs] == [[7, 2]]
    assert [output.request_id for output in finished] == ["nobody", "a", "b", "c"]


def test_a_failing_on_finished_is_logged_and_the_outputs_still_arrive(caplog):
    def on_finished(output):
        raise RuntimeError("metrics broke")

    async def body(core, handle):
        stream = await added(core, handle, [("a", [1], greedy(3)), ("b", [1], greedy(3))])
        with caplog.at_level(logging.ERROR, logger="nanovllm.engine.async_engine"):
            await core.send(outputs=[final("a", [4]), final("b", [5])])
        return [output.request_id async for output in stream], handle.num_unfinished_requests

    assert against_core(body, on_finished=on_finished) == (["a", "b"], 0)
    assert logged(caplog, "async_engine") == ["on_finished failed; the server goes on"] * 2


def test_stats_and_the_waiting_count_follow_the_cores_last_message():
    async def body(core, handle):
        await core.send(num_waiting=5, stats=stats(3))
        seen = (handle.num_waiting, handle.stats.num_steps)
        await core.send(num_waiting=0)   # no snapshot in this one: the last stays
        return seen, (handle.num_waiting, handle.stats.num_steps)

    assert against_core(body) == ((5, 3), (0, 3))


def test_closing_a_stream_aborts_its_unfinished_requests_only_and_unknown_ids_send_nothing():
    async def body(core, handle):
        stream = await added(core, handle, [("b", [1], greedy(3)), ("a", [1], greedy(3)), ("c", [1], greedy(3))])
        await core.send(outputs=[final("c", [1])])
        await stream.get()
        stream.close()
        abort = await core.receive()
        handle.abort(["nobody", "stranger"])
        nothing = await core.nothing_received()
        await core.send(outputs=[final("a", [1], "abort"), final("b", [1], "abort")])
        outputs = await stream.get()
        stream.close()   # all finished: nothing more to abort
        return abort, nothing, outputs, await core.nothing_received()

    abort, nothing, outputs, nothing_after = against_core(body)
    assert abort == Abort(["a", "b"]) and nothing and nothing_after
    assert sorted(o.outputs[0].finish_reason for o in outputs) == ["abort", "abort"]


def test_leaving_generate_early_aborts_its_request():
    async def main():
        core = FakeCore()
        handle = AsyncLLMEngine(INFO, core.addresses)
        core.serve(handle)
        try:
            generator = handle.generate("g", [1], greedy(9))
            step = asyncio.create_task(generator.__anext__())
            add = await core.receive()
            await core.send(accepted=["g"])
            await core.send(deltas=delta(("g", [4])))
            first = await step
            await generator.aclose()
            return add, first, await core.receive()
        finally:
            await handle.stop()
            core.close()

    add, first, abort = asyncio.run(main())
    assert add.stream and add.delta   # generate streams deltas unless told otherwise
    assert first.outputs[0].token_ids == [4] and abort == Abort(["g"])


def test_generate_without_streaming_asks_for_the_final_output_only():
    async def body(core, handle):
        waiting = asyncio.create_task(handle.generate("q", [1], greedy(9), stream=False).__anext__())
        message = await core.receive()
        waiting.cancel()
        return message.stream, message.delta

    assert against_core(body) == (False, False)


def test_a_caller_cancelled_while_waiting_for_the_verdict_aborts_and_forgets_its_requests():
    async def body(core, handle):
        task = asyncio.create_task(handle.add_requests([("a", [1], greedy(3)), ("b", [1], greedy(3))]))
        await core.receive()
        task.cancel()
        abort = await core.receive()
        await core.send(accepted=["a"])   # the verdict comes late: no one waits for it
        return abort, handle.num_unfinished_requests, task.cancelled(), await added(core, handle, [("a", [1],
                                                                                                   greedy(3))])

    abort, unfinished, cancelled, again = against_core(body)
    assert abort == Abort(["a", "b"]) and unfinished == 0 and cancelled and again.request_ids == ["a"]


def test_a_core_that_goes_away_fails_every_stream_and_waiting_caller_at_once_and_calls_on_dead_once(caplog):
    dead = []

    async def body(core, handle):
        handle.on_dead = lambda: dead.append(True)
        stream = await added(core, handle, [("a", [1], greedy(3))])
        waiting = asyncio.create_task(handle.add_requests([("b", [1], greedy(3))]))
        await core.receive()
        with caplog.at_level(logging.ERROR, logger="nanovllm.engine.async_engine"):
            core.outputs[0].close(linger=0)   # the core's end closes: the process is gone
            await asyncio.sleep(0.1)
        with pytest.raises(EngineDeadError, match=r"^the engine core went away$"):
            await stream.get()
        with pytest.raises(EngineDeadError, match=r"^the engine core went away$"):
            await waiting
        with pytest.raises(EngineNotRunningError, match=r"^the engine is not running \(the engine core went away\)$"):
            await handle.add_requests([("c", [1], greedy(3))])
        stream.close()   # nothing to abort on a dead core
        handle.abort(["a", "b"])
        handle._core_died("again")   # a second sign of the same death changes nothing
        return await core.nothing_received(), handle.is_running, handle.num_unfinished_requests, str(handle.error)

    assert against_core(body) == (True, False, 0, "the engine core went away")
    assert dead == [True]
    assert logged(caplog, "async_engine") == ["the engine core went away; every request in flight ends with an error"]


def test_a_core_thread_that_fails_ends_the_callers_with_its_error_and_one_that_returns_does_not():
    failed_callbacks = []

    async def body(core, handle):
        asyncio.get_running_loop().set_exception_handler(
            lambda loop, context: failed_callbacks.append(context["message"])
            if context["message"].startswith("Exception in callback") else None)
        stream = await added(core, handle, [("a", [1], greedy(3))])
        assert handle._reader.get_name() == "nanovllm-core-reader"
        handle._on_core_thread_exit(None)
        await asyncio.sleep(0.02)
        alive = handle.is_running
        handle._on_core_thread_exit(RuntimeError("scheduler bug"))
        with pytest.raises(EngineDeadError, match=r"^the engine core failed: RuntimeError: scheduler bug$"):
            await stream.get()
        await asyncio.sleep(0.02)
        return alive, handle.is_running

    assert against_core(body) == (True, False)
    assert failed_callbacks == []   # no on_dead was set: the death is reported without one


def test_stop_fails_waiting_callers_aborts_the_requests_in_flight_and_refuses_new_ones():
    async def main():
        core = FakeCore()
        handle = AsyncLLMEngine(INFO, core.addresses)
        core.serve(handle)
        stream = await added(core, handle, [("a", [1], greedy(3)), ("b", [1], greedy(3))])
        waiting = asyncio.create_task(handle.add_requests([("c", [1], greedy(3))]))
        await core.receive()
        await handle.stop()
        with pytest.raises(EngineNotRunningError, match=r"^the engine is stopping$"):
            await waiting
        with pytest.raises(EngineNotRunningError, match=r"^the engine is not running \(stopped\)$"):
            await handle.add_requests([("d", [1], greedy(3))])
        handle._core_died("the core exits after a stop")   # expected: not a death
        abort = await core.receive()
        more = await core.input.poll(timeout=100)   # a Shutdown is the owner's to send: this handle has none
        core.close()
        return abort, more, stream, handle

    abort, more, stream, handle = asyncio.run(main())
    assert abort == Abort(["a", "b", "c"]) and not more and not handle.accepting and not handle.is_running
    assert handle.error is None and stream._error is None
    assert not any(os.path.exists(a.removeprefix("ipc://")) for a in [handle.addresses.input,
                                                                      *handle.addresses.outputs])


def test_drain_waits_for_the_requests_in_flight_then_aborts_the_rest(caplog):
    async def body(core, handle):
        quick = await added(core, handle, [("quick", [1], greedy(3))])
        drain = asyncio.create_task(handle.drain(timeout=10))
        await asyncio.sleep(0.1)
        with pytest.raises(EngineNotRunningError, match=r"^the server is shutting down and takes no new requests$"):
            await handle.add_requests([("late", [1], greedy(3))])
        assert not drain.done()
        await core.send(outputs=[final("quick", [1])])
        await asyncio.wait_for(drain, 0.5)   # done soon after nothing is in flight
        assert [o.finished async for o in quick] == [True] and await core.nothing_received()
        handle.accepting = True
        slow = await added(core, handle, [("slow", [1], greedy(3))])
        with caplog.at_level(logging.WARNING, logger="nanovllm.engine.async_engine"):
            await handle.drain(timeout=0.05)
        return await core.receive(), slow.unfinished

    assert against_core(body) == (Abort(["slow"]), {"slow"})
    assert logged(caplog, "async_engine") == ["shutdown grace period over: aborting 1 unfinished request(s)"]


def test_the_reader_hands_streams_at_most_a_turns_worth_of_messages_at_a_time():
    async def body(core, handle):
        stream = await added(core, handle, [("r", [1], greedy(3))])
        num_messages = 3 * async_module.MAX_MESSAGES_PER_TURN
        for step in range(num_messages):   # a busy core: every message waits before the reader runs
            core.outputs[0].send(encode(StepOutputs([], delta(("r", [step])), [], [], 0)))
        await asyncio.sleep(0)
        import time
        time.sleep(0.3)   # all delivered to the reader's socket, without yielding to the event loop
        reads = []
        while sum(reads) < num_messages:
            reads.append(sum(len(output.outputs[0].token_ids) for output in await stream.get()))
        return reads

    reads = against_core(body)
    assert reads[0] == async_module.MAX_MESSAGES_PER_TURN and max(reads) == async_module.MAX_MESSAGES_PER_TURN


def test_new_addresses_name_one_input_and_one_output_per_api_process_and_stop_removes_their_files():
    addresses = _new_addresses(3)
    base = addresses.input.removesuffix("-in")
    assert re.fullmatch(f"ipc://{re.escape(tempfile.gettempdir())}/nanovllm-{os.getpid()}-[0-9a-f]{{8}}", base)
    assert addresses.outputs == [f"{base}-out0", f"{base}-out1", f"{base}-out2"]
    assert _new_addresses(1).input != addresses.input
    for address in [addresses.input, *addresses.outputs[:2]]:
        open(address.removeprefix("ipc://"), "w").close()
    _remove_ipc_files(addresses)   # the third was never made: ignored
    assert not any(os.path.exists(a.removeprefix("ipc://")) for a in [addresses.input, *addresses.outputs])


class ServedEngine(FakeEngine):
    """A FakeEngine with what `core_info` reads, for `AsyncLLMEngine.from_engine`."""
    config = SimpleNamespace(model="m", tokenizer=None, max_model_len=64, load_format="auto",
                             skip_tokenizer_init=False, kv_cache_dtype_name="bfloat16")
    tokenizer = SimpleNamespace(eos_token_ids=[2], bos_token_id=None)
    model_config = SimpleNamespace(vocab_size=320)


def test_from_engine_serves_the_engine_from_a_core_thread_and_stop_ends_it():
    engine = ServedEngine()

    async def main():
        handle = AsyncLLMEngine.from_engine(engine, max_waiting=5)
        handle.start()
        try:
            streams = [sum([o.outputs[0].token_ids async for o in handle.generate(request_id, [1], greedy(3))], [])
                       for request_id in ("a", "b")]
        finally:
            await handle.stop()
        return handle, streams

    handle, streams = asyncio.run(main())
    assert streams == [[0, 1, 2]] * 2 and handle.max_waiting == 5 and handle.info.vocab_size == 320
    assert len(handle.addresses.outputs) == 1 and handle.client_index == 0
    assert handle.thread.thread.name == "nanovllm-engine-core" and handle.thread.thread.daemon
    assert not handle.thread.thread.is_alive()   # stopped by Shutdown


def test_a_core_thread_whose_engine_fails_ends_its_callers_with_the_error(caplog):
    engine = ServedEngine()

    def broken_step():
        raise RuntimeError("scheduler bug")

    engine.step_with_deltas = broken_step

    async def main():
        handle = AsyncLLMEngine.from_engine(engine)
        handle.start()
        try:
            with pytest.raises(EngineNotRunningError, match="^the engine core failed: RuntimeError: scheduler bug$"):
                stream = await handle.add_requests([("a", [1], greedy(3))])
                await asyncio.wait_for(stream.get(), 3)
        finally:
            await handle.stop()
        return handle

    with caplog.at_level(logging.ERROR, logger="nanovllm.engine.async_engine"):
        handle = asyncio.run(main())
    assert not handle.is_running and not handle.thread.thread.is_alive() and handle.max_waiting == 1024
    assert logged(caplog, "async_engine")[0] == "the engine core failed"
    assert "scheduler bug" in caplog.text   # the traceback is logged with it
