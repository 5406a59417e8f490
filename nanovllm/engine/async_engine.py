"""AsyncLLMEngine: the synchronous engine inside an asyncio server.

`LLMEngine.step()` runs one batch and returns. A server has many clients
arriving at any moment, each waiting on its own request. This module joins the
two worlds:

- One background task (the step loop) steps the engine while any request is
  unfinished and sleeps when none is. The step itself, the model's forward
  pass, runs in a worker thread, so the event loop keeps accepting connections
  and streaming tokens while the model computes.
- The event loop never touches the engine while a step runs. New requests and
  aborts are queued and applied by the step loop between two steps.
- The requests one caller submits together get an `OutputStream`, which the
  step loop fills with their `RequestOutput`s. Every caller's
  requests share the same steps: continuous batching, seen from the server.
- A caller that goes away (a client that disconnects) closes its stream; that
  aborts its requests, and their KV blocks are free by the next step.
- The waiting queue is bounded: when `max_waiting` sequences already wait
  for their turn (counted at the last step boundary, plus those queued since),
  a new request is refused with `QueueFullError` (the server's 503) instead
  of piling up without end.
- `drain(timeout)` refuses new requests, lets those in flight finish for up to
  `timeout` seconds, then aborts the rest: a graceful shutdown.

`stats`, the engine's counters and KV usage, is a snapshot taken between steps
(at most every `stats_interval` seconds while busy, and whenever the engine
goes idle), because computing it walks every block table.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from nanovllm.engine.engine import EngineStats, LLMEngine, Prompt
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

RequestSpec = tuple[str, Prompt, SamplingParams]   # (request id, prompt, sampling params)


class QueueFullError(RuntimeError):
    """Too many sequences are waiting; the caller should retry later."""


class EngineNotRunningError(RuntimeError):
    """The engine is shutting down, stopped, or its step loop failed."""


class OutputStream:
    """The outputs of the requests one caller submitted together, as the steps produce them.

    Each RequestOutput carries the whole state of its request so far, so the
    stream keeps only the latest one per request: a caller that falls behind
    (a slow client) skips the outputs it missed instead of replaying them, and
    its memory stays bounded however long it stalls.
    """

    def __init__(self, engine: AsyncLLMEngine, request_ids: list[str]):
        self._engine = engine
        self._latest: dict[str, RequestOutput] = {}   # request id -> its newest output not yet read
        self._error: BaseException | None = None
        self._ready = asyncio.Event()
        self.request_ids = request_ids
        self.unfinished = set(request_ids)

    @property
    def finished(self) -> bool:
        return not self.unfinished

    def put(self, output: RequestOutput) -> None:
        self._latest[output.request_id] = output
        self._ready.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._ready.set()

    async def get(self) -> list[RequestOutput]:
        """Wait for news: the latest output of each request that progressed since the last call.
        Raises EngineNotRunningError if the step loop failed."""
        await self._ready.wait()
        self._ready.clear()
        if self._error is not None:
            raise self._error
        outputs, self._latest = list(self._latest.values()), {}
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
        if self.unfinished:
            self._engine.abort(sorted(self.unfinished))


@dataclass
class _PendingAdd:
    requests: list[RequestSpec]
    stream: bool
    num_seqs: int
    done: asyncio.Future[None]   # the engine's verdict: None, or the ValueError of add_requests


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int = 1024, stats_interval: float = 0.5,
                 on_finished: Callable[[RequestOutput], None] | None = None):
        """engine: an LLMEngine no one else steps. max_waiting: the most sequences that may wait for
        their turn before new requests are refused. on_finished: called with each request's final output."""
        if isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 1:
            raise ValueError(f"max_waiting must be a positive integer, got {max_waiting!r}")
        self.engine = engine
        self.max_waiting = max_waiting
        self.stats_interval = stats_interval
        self.on_finished = on_finished
        self.stats: EngineStats = engine.get_stats()
        self._stats_time = time.monotonic()
        self.num_waiting = 0                   # engine.get_num_waiting() at the last step boundary
        self._num_pending_seqs = 0             # sequences of the pending adds
        self._streams: dict[str, OutputStream] = {}   # unfinished request id -> its caller's stream
        self._pending_adds: list[_PendingAdd] = []
        self._pending_aborts: list[str] = []
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nanovllm-step")
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False
        self.accepting = True
        self.error: BaseException | None = None   # why the step loop died, if it did

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the step loop on the running event loop."""
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="nanovllm-step-loop")

    async def stop(self) -> None:
        """Refuse new requests, abort those in flight (their streams end with "abort"), end the step loop."""
        self.accepting = False
        self._fail_pending_adds(EngineNotRunningError("the engine is stopping"))
        self.abort(list(self._streams))
        self._stopping = True
        self._wakeup.set()
        if self._loop_task is not None:
            await self._loop_task
        self._executor.shutdown(wait=False)
        self.engine.shutdown()   # tensor-parallel workers, if any

    async def drain(self, timeout: float) -> None:
        """Refuse new requests; give those in flight `timeout` seconds to finish, then abort them."""
        self.accepting = False
        deadline = time.monotonic() + timeout
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._streams:
            logger.warning("shutdown grace period over: aborting %d unfinished request(s)", len(self._streams))
            self.abort(list(self._streams))

    @property
    def is_running(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done() and self.error is None

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._streams)

    # ---- requests ------------------------------------------------------------------------

    async def add_requests(self, requests: list[RequestSpec], stream: bool = True) -> OutputStream:
        """Queue requests (all or none) and return the stream of their outputs.

        stream=False: only final outputs. Raises ValueError if the engine rejects
        one (nothing is queued then), QueueFullError if too many sequences wait,
        EngineNotRunningError while shutting down.
        """
        if not self.is_running:
            raise EngineNotRunningError(f"the engine's step loop is not running ({self.error or 'stopped'})")
        if not self.accepting:
            raise EngineNotRunningError("the server is shutting down and takes no new requests")
        request_ids = [request_id for request_id, _, _ in requests]
        if any(request_id in self._streams for request_id in request_ids):
            raise ValueError("a request id is already in use by an unfinished request; pick unique ids")
        num_seqs = sum(params.n for _, _, params in requests)
        num_waiting = self.num_waiting + self._num_pending_seqs
        if num_waiting + num_seqs > self.max_waiting:
            raise QueueFullError(f"{num_waiting} sequences are already waiting (max_waiting={self.max_waiting}); "
                                 "retry later")
        outputs = OutputStream(self, request_ids)
        for request_id in request_ids:
            self._streams[request_id] = outputs
        add = _PendingAdd(requests, stream, num_seqs, asyncio.get_running_loop().create_future())
        self._pending_adds.append(add)
        self._num_pending_seqs += num_seqs
        self._wakeup.set()
        try:
            await add.done
        except asyncio.CancelledError:
            if add.done.cancelled():   # never reached the engine
                self._forget(request_ids)
            else:                      # queued just as the caller left
                self.abort(request_ids)
            raise
        except BaseException:
            self._forget(request_ids)
            raise
        return outputs

    async def generate(self, request_id: str, prompt: Prompt, params: SamplingParams,
                       stream: bool = True) -> AsyncIterator[RequestOutput]:
        """One request's outputs as they come; leaving the loop early aborts it."""
        outputs = await self.add_requests([(request_id, prompt, params)], stream)
        try:
            async for output in outputs:
                yield output
        finally:
            outputs.close()

    def abort(self, request_ids: list[str]) -> None:
        """Abort unfinished requests at the next step boundary; their streams end with finish_reason "abort"."""
        known = [request_id for request_id in request_ids if request_id in self._streams]
        if known:
            self._pending_aborts.extend(known)
            self._wakeup.set()

    def _forget(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._streams.pop(request_id, None)

    # ---- the step loop -------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        engine = self.engine
        try:
            while True:
                if not (self._pending_adds or self._pending_aborts or engine.has_unfinished_requests()):
                    self._refresh_stats()
                    if self._stopping:
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                self._apply_pending()
                outputs = await loop.run_in_executor(self._executor, engine.step)
                self.num_waiting = engine.get_num_waiting()
                self._dispatch(outputs)
                if time.monotonic() - self._stats_time >= self.stats_interval:
                    self._refresh_stats()
        except Exception as error:
            logger.exception("the engine's step loop failed; every request in flight ends with an error")
            self.error = error
            failure = EngineNotRunningError(f"the engine's step loop failed: {type(error).__name__}: {error}")
            self._fail_pending_adds(failure)
            for outputs in set(self._streams.values()):
                outputs.fail(failure)
            self._streams.clear()

    def _fail_pending_adds(self, error: Exception) -> None:
        for add in self._pending_adds:
            self._forget([request_id for request_id, _, _ in add.requests])
            if not add.done.done():
                add.done.set_exception(error)
        self._pending_adds.clear()
        self._num_pending_seqs = 0

    def _apply_pending(self) -> None:
        """Hand queued requests and aborts to the engine; called only between steps."""
        adds, self._pending_adds = self._pending_adds, []
        self._num_pending_seqs = 0
        for add in adds:
            if add.done.cancelled():   # the caller left before its turn
                continue
            try:
                self.engine.add_requests(add.requests, stream=add.stream)
            except Exception as error:   # ValueError: the request cannot be served; nothing was queued
                self._forget([request_id for request_id, _, _ in add.requests])
                add.done.set_exception(error)
                continue
            add.done.set_result(None)
        aborts, self._pending_aborts = self._pending_aborts, []
        for request_id in aborts:
            self.engine.abort_request(request_id)
        self.num_waiting = self.engine.get_num_waiting()

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if output.finished:
                self._streams.pop(output.request_id, None)
                if self.on_finished is not None:
                    try:
                        self.on_finished(output)
                    except Exception:
                        logger.exception("on_finished failed; the engine goes on")
            if stream is not None:
                stream.put(output)

    def _refresh_stats(self) -> None:
        self.stats = self.engine.get_stats()
        self._stats_time = time.monotonic()
