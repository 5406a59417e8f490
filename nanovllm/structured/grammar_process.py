"""The grammar process: the matchers of the constrained sequences, off the engine's interpreter.

Each step every constrained row's matcher takes the token it sampled last and fills its row of
the step's token mask (grammar.py's MaskFiller). xgrammar does both in C++ and lets go of the GIL
meanwhile, but every call must take it back; on a thread of the engine's process, beside the
engine's own Python (scheduling, detokenizing), each of those waits its turn, and a step of 128
constrained rows spent more time waiting for the GIL than working (on the host of an H200: accept
and fill ~2 ms a step against ~0.3 ms alone). So one process of its own (spawned: the engine's
has CUDA) owns the matchers, and the engine talks to it through shared memory:

    header   [10] int64         the request number, the number done, rows, fill?, ready, error, pids,
                                the process's time spent accepting and filling (ns, cumulative)
    slots    [max_rows] int64   per row of the request: its matcher's id (GrammarState.slot)
    counts   [max_rows] int64   how many new tokens the row brings (at most MAX_TOKENS_PER_ROW) ...
    tokens   [max_rows, K] int64  ... and which
    status   [max_rows] int64   per row, after the request: 0 running, TERMINATED, FAILED
    bitmask  [max_rows, W] int32  row r <- the tokens row r's matcher allows next (W = ceil(V / 32))

A step (`GrammarBitmask.start`) writes the rows, then publishes the request by writing its number
(after a memory fence); the process, polling that number, has its matchers take the tokens (one
batched xgrammar call per token position), fills the bitmask rows on several threads, writes the
status, and publishes the number as done. `finish` waits for that number and queues the copy of
the rows to the device (on CUDA the segment is registered as pinned memory, so the copy is
asynchronous). Nothing is pickled per step. Which matcher a slot is (a new sequence's grammar
key, a finished sequence's slot to forget) goes over a pipe, sent before the request that needs
it; the process reads the pipe before each request.

Both sides wait by polling: spinning for a millisecond, then sleeping between polls
(runner/shm_queue.py's Waiter). The engine checks that the process lives while it waits, and the
process that the engine does; a dead grammar process fails the steps with constrained rows with
a RuntimeError that says so, never a hang. The process ends with the engine (`close`, or when
the GrammarBitmask is collected).
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
import traceback
import weakref
from multiprocessing import shared_memory
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

from nanovllm.runner.shm_queue import Waiter, memory_fence, process_alive
from nanovllm.structured.grammar import PENDING, GrammarCompiler, GrammarState, MaskFiller, _known

logger = logging.getLogger(__name__)

MAX_TOKENS_PER_ROW = 4   # new tokens a row brings in one request (a longer backlog takes several)
STEP_TIMEOUT_S = 60.0    # a request the living process has not answered by then is an error
# Polling without sleeping: the engine for up to ENGINE_SPIN_S (its wait is on the step's critical path),
# the process for PROCESS_SPIN_S after each request (the next one comes a step later); sleeping polls after.
ENGINE_SPIN_S = 0.02
PROCESS_SPIN_S = 0.005
PAGE = 4096
TERMINATED, FAILED = 1, 2   # status codes

# header fields
REQUEST, DONE, NUM_ROWS, FILL, READY, ERROR, PARENT_PID, WORKER_PID, ACCEPT_NS, FILL_NS = range(10)
HEADER_SIZE = 10


class _Views:
    """The segment's parts (see the module docstring), the same on both sides."""

    def __init__(self, buf: memoryview, max_rows: int, width: int):
        offset = 0

        def take(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
            nonlocal offset
            array = np.ndarray(shape, dtype, buf, offset)
            offset += array.nbytes
            return array
        self.header = take((HEADER_SIZE,), np.int64)                        # [HEADER_SIZE]
        self.slots = take((max_rows,), np.int64)                            # [max_rows]
        self.counts = take((max_rows,), np.int64)                           # [max_rows]
        self.tokens = take((max_rows, MAX_TOKENS_PER_ROW), np.int64)        # [max_rows, K]
        self.status = take((max_rows,), np.int64)                           # [max_rows]
        offset = -(-offset // PAGE) * PAGE   # page-aligned: the CUDA driver pins whole pages
        self.bitmask = torch.frombuffer(buf, dtype=torch.int32, offset=offset,
                                        count=max_rows * width).view(max_rows, width)   # [max_rows, W]

    @staticmethod
    def nbytes(max_rows: int, width: int) -> int:
        return -(-8 * (HEADER_SIZE + max_rows * (3 + MAX_TOKENS_PER_ROW)) // PAGE) * PAGE + 4 * max_rows * width


class GrammarProcessError(RuntimeError):
    """The grammar process died or failed a request: the constrained rows of the step get no masks."""


class GrammarBitmask:
    """The engine's end of the grammar process: the masks of a step's constrained rows.

        host      [max_rows, W] int32    the shared segment's bitmask (pinned on CUDA)
        bitmask   [max_rows, W] int32    the same on the device: one asynchronous copy a step
        rows      [max_rows] int64       which row of the batch's logits each mask row masks

    `start` sends the step's new tokens, `finish` waits for the masks and queues their copy
    (`build` does both). The host rows are written again only once the last copy out of them is
    done (an event).
    """

    def __init__(self, max_rows: int, compiler: GrammarCompiler, device: torch.device | str,
                 threads: int | None = None):
        self.max_rows = max_rows
        self.compiler = compiler
        self.device = torch.device(device)
        width = -(-compiler.vocab_size // 32)
        self.memory = shared_memory.SharedMemory(create=True, size=_Views.nbytes(max_rows, width))
        self.views = _Views(self.memory.buf, max_rows, width)
        self.views.header[PARENT_PID] = os.getpid()
        # The compiler's tokenizer (megabytes of JSON) goes through a segment of its own: spawn writes a
        # process's arguments into a pipe and waits until the child has read them all, forever if it died.
        spec = json.dumps(compiler.spec()).encode()
        self.spec_memory = shared_memory.SharedMemory(create=True, size=len(spec))
        self.spec_memory.buf[:len(spec)] = spec
        context = multiprocessing.get_context("spawn")
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=serve, name="grammar-masks", daemon=True,
                                       args=(self.memory.name, max_rows, width, self.spec_memory.name, len(spec),
                                             threads, child_conn))
        self.process.start()
        child_conn.close()
        self.host = self.views.bitmask                                                          # [max_rows, W]
        pin = self.device.type == "cuda"
        registered = pin and _register_pinned(self.host)
        self._finalizer = weakref.finalize(self, _shut_down, self.process, self.conn, [self.memory, self.spec_memory],
                                           self.host.data_ptr() if registered else None)
        self.host_rows = torch.zeros(max_rows, dtype=torch.int64, pin_memory=pin)                # [max_rows]
        self.bitmask = torch.zeros_like(self.host, device=self.device) if pin else self.host     # [max_rows, W]
        self.rows = torch.zeros_like(self.host_rows, device=self.device) if pin else self.host_rows
        self.copied: torch.cuda.Event | None = None   # the last copy out of the host buffers
        self.next_slot = 0
        self.grammar_ids: dict[tuple[str, str], int] = {}   # grammar keys the process knows, by id
        self.released: list[int] = []   # slots of collected GrammarStates, to forget (weakref callbacks)
        self.num_requests = 0
        self.in_flight: list[GrammarState] | None = None     # the states of the request not yet finished
        # While a batch keeps its rows (most steps), no state needs its slot told and the logits rows
        # the masks go to are on the device already.
        self.published_states: list[GrammarState] = []        # the states of the last request, in order
        self.copied_rows: list[int] = []                      # the logits rows self.rows holds

    def build(self, states: list[GrammarState], output_token_ids: list[list[int]], rows: list[int],
              newest_token_ids: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """states[r] (the grammar of logits row rows[r]) takes its unseen tokens, then -> (bitmask [R, W]
        int32, rows [R] int64) on the device, their copy queued."""
        return self.finish(self.start(states, output_token_ids, newest_token_ids), rows)

    def start(self, states: list[GrammarState], output_token_ids: list[list[int]],
              newest_token_ids: list[int] | None = None) -> int:
        """Send each state's unseen output tokens (up to the first placeholder; newest_token_ids[r],
        unless PENDING, is the id behind a last placeholder) and ask for the masks -> the request's
        number, for `finish`. Returns without waiting for the process."""
        num_rows = len(states)
        if num_rows > self.max_rows:
            raise ValueError(f"{num_rows} constrained rows in one step; the grammar masks hold {self.max_rows}")
        if self.in_flight is not None:   # a request whose masks no one took (its step failed): drop them
            self._wait(self.num_requests)
        self._check_alive()
        if states != self.published_states:   # a new state's slot (or a released one) goes before the request
            self._send_lifecycle(states)
        elif self.released:
            self._send_lifecycle([])
        if (newest_token_ids is not None and PENDING not in newest_token_ids
                and all(len(ids) == state.num_accepted + 1 for state, ids in zip(states, output_token_ids))):
            # The steady state: each row's one unseen token is its newest, a placeholder here.
            return self._publish_newest(states, newest_token_ids)
        newest = newest_token_ids or [PENDING] * num_rows
        tokens = [_known(state.unseen_tokens(ids), newest_id)
                  for state, ids, newest_id in zip(states, output_token_ids, newest)]
        while max(map(len, tokens), default=0) > MAX_TOKENS_PER_ROW:   # a long backlog: accept-only rounds
            self._publish(states, [row[:MAX_TOKENS_PER_ROW] for row in tokens], fill=False)
            self._wait(self.num_requests)
            tokens = [row[MAX_TOKENS_PER_ROW:] for row in tokens]
        return self._publish(states, tokens, fill=True)

    def finish(self, started: int, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Wait for request `started` (GrammarProcessError if the process failed it or died) -> the
        masks of its rows on the device, (bitmask [R, W], rows [R]), their copy queued."""
        if started != self.num_requests or self.in_flight is None:
            raise RuntimeError(f"grammar masks of request {started} were asked for, but the last one sent is "
                               f"{self.num_requests}; finish each start before the next")
        self._wait(started)
        return self.to_device(rows)

    def to_device(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Queue the copy of the filled rows and of the logits rows they mask (unless the device holds
        them from the last call) -> (bitmask [R, W], rows [R]) on the device."""
        num_rows = len(rows)
        if self.device.type != "cuda":   # a copy: the shared rows are rewritten next step, and unmapped at close
            return self.host[:num_rows].clone(), torch.tensor(rows, dtype=torch.int64)
        self.bitmask[:num_rows].copy_(self.host[:num_rows], non_blocking=True)
        if rows != self.copied_rows:
            self.host_rows[:num_rows] = torch.as_tensor(rows, dtype=torch.int64)
            self.rows[:num_rows].copy_(self.host_rows[:num_rows], non_blocking=True)
            self.copied_rows = list(rows)
        self.copied = torch.cuda.Event()
        self.copied.record()
        return self.bitmask[:num_rows], self.rows[:num_rows]

    def busy_seconds(self) -> tuple[float, float]:
        """The grammar process's time so far accepting tokens and filling masks (seconds)."""
        header = self.views.header
        return header[ACCEPT_NS] * 1e-9, header[FILL_NS] * 1e-9

    def close(self) -> None:
        """End the grammar process and remove the shared segment."""
        self._finalizer()

    def _send_lifecycle(self, states: list[GrammarState]) -> None:
        """Tell the process about the states it has not seen (a slot each, and their grammar's key the
        first time) and the slots of collected ones: one message, before the request that needs it."""
        new_grammars, added = [], []
        for state in states:
            if state.slot is not None:
                continue
            if state.compiler is not self.compiler:
                raise ValueError("a grammar compiled by another GrammarCompiler than these masks' was given; "
                                 "one engine has one compiler")
            grammar_id = self.grammar_ids.get(state.key)
            if grammar_id is None:
                grammar_id = self.grammar_ids[state.key] = len(self.grammar_ids)
                new_grammars.append((grammar_id, state.key))
            state.slot, self.next_slot = self.next_slot, self.next_slot + 1
            weakref.finalize(state, self.released.append, state.slot)
            added.append((state.slot, grammar_id))
        released, self.released[:] = list(self.released), []
        if new_grammars or added or released:
            try:
                self.conn.send((new_grammars, added, released))
            except OSError:
                self._check_alive()
                raise

    def _publish(self, states: list[GrammarState], tokens: list[list[int]], fill: bool) -> int:
        """Write the request's rows (states[r] takes tokens[r]) and publish it -> its number."""
        views, num_rows = self.views, len(states)
        self._write_slots(states)
        counts = [len(row) for row in tokens]
        views.counts[:num_rows] = counts
        width = max(counts, default=0)
        if width:
            views.tokens[:num_rows, :width] = [row + [0] * (width - len(row)) for row in tokens]
        for state, count in zip(states, counts):
            state.num_accepted += count
        return self._request(states, fill)

    def _publish_newest(self, states: list[GrammarState], newest_token_ids: list[int]) -> int:
        """`_publish` where states[r] takes the one token newest_token_ids[r] (the steady state): one
        column of the token rows, no list per row."""
        views, num_rows = self.views, len(states)
        self._write_slots(states)
        views.counts[:num_rows] = 1
        views.tokens[:num_rows, 0] = newest_token_ids
        for state in states:
            state.num_accepted += 1
        return self._request(states, fill=True)

    def _write_slots(self, states: list[GrammarState]) -> None:
        """The rows' matcher slots into the segment, once the last copy out of the segment's mask rows
        is done (they are rewritten next)."""
        if self.copied is not None:
            self.copied.synchronize()
        self.views.slots[:len(states)] = [state.slot for state in states]
        if states != self.published_states:
            self.published_states = list(states)

    def _request(self, states: list[GrammarState], fill: bool) -> int:
        """Publish the request whose rows are written -> its number."""
        views = self.views
        views.header[NUM_ROWS] = len(states)
        views.header[FILL] = fill
        self.num_requests += 1
        self.in_flight = states
        memory_fence()                 # the rows before the number that publishes them
        views.header[REQUEST] = self.num_requests
        return self.num_requests

    def _wait(self, number: int) -> None:
        """Until the process has done request `number`; then mirror each row's status into its state."""
        header, states = self.views.header, self.in_flight
        self.in_flight = None
        if header[DONE] < number:
            waiter = None
            while header[DONE] < number:
                if waiter is None or (header[READY] and waiter.deadline is None):   # the timeout once it runs
                    waiter = Waiter(STEP_TIMEOUT_S if header[READY] else None,
                                    f"the engine waited for the grammar masks of request {number}", ENGINE_SPIN_S)
                waiter.pause(self._check_alive)
        memory_fence()                 # the number before the rows it publishes
        if header[ERROR] == number:
            message = self.conn.recv() if self.conn.poll(1.0) else "no message"
            raise GrammarProcessError(f"the grammar process failed on request {number}: {message}")
        for state, code in zip(states, self.views.status[:len(states)].tolist()):
            if not code or (state.terminated if code == TERMINATED else state.failed):
                continue   # running, or its end mirrored already (a finished grammar reports it every step)
            if code == FAILED:
                logger.warning("a constrained sequence took a token its grammar rejects; it is ended")
            state.failed, state.terminated = code == FAILED, code == TERMINATED

    def _check_alive(self) -> None:
        if not self.process.is_alive():
            raise GrammarProcessError(f"the grammar process exited (exit code {self.process.exitcode}); requests "
                                      "with structured outputs cannot be served until the engine restarts")


def _register_pinned(host: torch.Tensor) -> bool:
    """Page-lock the shared bitmask rows for the CUDA copy engine (as pin_memory does for torch's own
    buffers) -> whether that worked; a copy out of pageable memory waits for itself instead."""
    code = torch.cuda.cudart().cudaHostRegister(host.data_ptr(), host.numel() * host.element_size(), 0)
    if int(code) != 0:
        logger.warning("cudaHostRegister of the grammar masks failed (error %s); their copies wait", int(code))
        return False
    return True


def _shut_down(process: multiprocessing.Process, conn: Connection, segments: list[shared_memory.SharedMemory],
               registered: int | None) -> None:
    try:
        conn.send(None)   # stop
    except OSError:
        pass
    process.join(timeout=5.0)
    if process.is_alive():
        process.terminate()
        process.join(timeout=2.0)
    conn.close()
    if registered is not None:
        torch.cuda.cudart().cudaHostUnregister(registered)
    for memory in segments:
        try:
            memory.unlink()
        except FileNotFoundError:
            pass


# ---- the grammar process ---------------------------------------------------------------------

def serve(name: str, max_rows: int, width: int, spec_name: str, spec_size: int, threads: int | None,
          conn: Connection) -> None:
    """The process's main: `_serve`, then exit at once (os._exit): nothing of it needs tearing down
    (the engine removes the segments), and the interpreter's teardown of torch takes a second."""
    code = 0
    try:
        _serve(name, max_rows, width, spec_name, spec_size, threads, conn)
    except SystemExit:
        pass
    except BaseException:
        traceback.print_exc()
        code = 1
    os._exit(code)


def _serve(name: str, max_rows: int, width: int, spec_name: str, spec_size: int, threads: int | None,
           conn: Connection) -> None:
    """The process's loop: keep the matchers (lifecycle messages on conn), answer each request."""
    spec_memory = shared_memory.SharedMemory(name=spec_name)
    compiler_spec = json.loads(bytes(spec_memory.buf[:spec_size]))
    spec_memory.close()
    memory = shared_memory.SharedMemory(name=name)
    views = _Views(memory.buf, max_rows, width)
    header = views.header
    parent_pid = int(header[PARENT_PID])
    compiler = GrammarCompiler.from_spec(compiler_spec)
    filler = MaskFiller(compiler.vocab_size, compiler.stop_token_ids, threads)
    grammars: dict[int, tuple[str, str]] = {}
    matchers: dict[int, Any] = {}

    def read_messages() -> bool:
        """Apply the lifecycle messages waiting on the pipe -> False once told to stop."""
        while conn.poll():
            message = conn.recv()
            if message is None:
                return False
            new_grammars, added, released = message
            grammars.update(new_grammars)
            for slot in released:
                matchers.pop(slot, None)
            for slot, grammar_id in added:
                matchers[slot] = compiler.new_matcher(grammars[grammar_id])
        return True

    def check_parent() -> None:
        if not process_alive(parent_pid):
            raise SystemExit(0)

    header[WORKER_PID] = os.getpid()
    header[READY] = 1
    done = int(header[DONE])
    while True:
        waiter = Waiter(None, "the grammar process waited for a request", PROCESS_SPIN_S)
        while header[REQUEST] <= done:
            if not read_messages():
                return
            waiter.pause(check_parent)
        number = int(header[REQUEST])
        memory_fence()             # the number before the rows it publishes
        try:
            if not read_messages():   # the messages sent before this request are all on the pipe now
                return
            _answer(views, matchers, filler)
        except Exception as error:   # the traceback to the process's stderr, the error to the engine
            traceback.print_exc()
            conn.send(f"{type(error).__name__}: {error}")
            header[ERROR] = number
        memory_fence()             # the rows and status before the number
        header[DONE] = done = number


def _answer(views: _Views, matchers: dict[int, Any], filler: MaskFiller) -> None:
    """One request: the rows' matchers take their tokens, then (if asked) fill their mask rows."""
    num_rows = int(views.header[NUM_ROWS])
    states = [matchers[slot] for slot in views.slots[:num_rows].tolist()]
    counts = views.counts[:num_rows].tolist()
    tokens = [row[:count] for row, count in zip(views.tokens[:num_rows].tolist(), counts)]
    start = time.perf_counter_ns()
    filler.accept(states, tokens)
    accepted = time.perf_counter_ns()
    if views.header[FILL]:
        filler.fill(states, views.bitmask)
    views.header[ACCEPT_NS] += accepted - start
    views.header[FILL_NS] += time.perf_counter_ns() - accepted
    views.status[:num_rows] = [FAILED if state.failed else TERMINATED if state.terminated else 0
                               for state in states]
