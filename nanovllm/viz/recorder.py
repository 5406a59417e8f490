"""The step observer: what the visualizer knows about a run.

The engine calls `VizRecorder` after every step with a `StepInfo` (which
chunks ran, how many prefill and decode tokens, the KV pool's usage). The
recorder adds one `StepRecord` to its history (the report's time series and
the timeline grid are drawn from it) and can take a `VizState` snapshot at any
moment: every request's state read from its `Sequence`, the blocks each one
holds, and the latest step. The panels are pure functions of that snapshot.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from nanovllm.engine.block_manager import BlockManager, KVCacheUsage
from nanovllm.engine.engine import ScheduledChunk, StepInfo
from nanovllm.engine.sequence import Sequence, SequenceStatus
from nanovllm.viz.attention import AttentionView

# One character per request per step in the timeline (blank: not arrived yet, or finished before).
WAITING, PREEMPTED, PREFILL, DECODE, FINISHED = ".", "x", "P", "D", "F"


@dataclass
class StepRecord:
    step: int
    kv_usage: KVCacheUsage
    num_prefill_tokens: int
    num_decode_tokens: int
    states: dict[str, str]            # request id -> timeline character (requests arrived so far)


@dataclass
class RequestView:
    """One request, as the scheduler panel shows it."""
    request_id: str
    state: str                        # "upcoming" | "waiting" | "preempted" | "prefill" | "decode" | "done"
    arrival_step: int
    num_prompt_tokens: int = 0
    num_computed_tokens: int = 0
    prefill_target: int = 0           # tokens the current prefill (or recomputation) must compute
    num_output_tokens: int = 0
    max_tokens: int = 0
    finish_reason: str | None = None
    text: str = ""
    num_blocks: int = 0
    num_shared_blocks: int = 0        # of those, blocks another live sequence also holds (a shared prefix)


@dataclass
class VizState:
    """Everything the panels draw, at one moment."""
    step: int                         # steps run so far
    kv_policy: str
    max_num_batched_tokens: int
    num_prefill_tokens: int           # in the latest step
    num_decode_tokens: int
    kv_usage: KVCacheUsage
    requests: list[RequestView]
    attention: AttentionView | None = None
    num_layers: int = 0
    kv_cache_dtype: str = ""          # what the pool stores ("float32", "float8_e4m3fn", ...)


@dataclass
class _Tracked:
    request_id: str
    arrival_step: int
    seq: Sequence | None = None       # None until it arrives


@dataclass
class VizRecorder:
    block_manager: BlockManager
    kv_policy: str
    max_num_batched_tokens: int
    kv_cache_dtype: str = ""          # what the pool stores, shown beside its size
    history: list[StepRecord] = field(default_factory=list)
    tracked: dict[str, _Tracked] = field(default_factory=dict)   # in arrival order
    overhead_s: float = 0.0           # seconds spent recording (and in `on_step` callbacks)
    on_step: list[Callable[["VizRecorder"], None]] = field(default_factory=list)   # called after each record

    def expect(self, request_id: str, arrival_step: int) -> None:
        """A request that will arrive at `arrival_step` (shown as upcoming until then)."""
        self.tracked[request_id] = _Tracked(request_id, arrival_step)

    def arrived(self, request_id: str, seq: Sequence, step: int) -> None:
        tracked = self.tracked.setdefault(request_id, _Tracked(request_id, step))
        tracked.arrival_step, tracked.seq = step, seq

    @property
    def request_ids(self) -> list[str]:
        return list(self.tracked)

    def __call__(self, info: StepInfo) -> None:
        start_time = time.perf_counter()
        scheduled = {chunk.request_id: PREFILL if self._is_prefill(chunk) else DECODE for chunk in info.scheduled}
        finished = set(info.finished)
        states = {}
        for request_id, tracked in self.tracked.items():
            seq = tracked.seq
            if seq is None or (seq.is_finished and request_id not in finished):
                continue
            if request_id in finished:
                states[request_id] = FINISHED
            elif request_id in scheduled:
                states[request_id] = scheduled[request_id]
            elif seq.status is SequenceStatus.PREEMPTED:
                states[request_id] = PREEMPTED
            else:
                states[request_id] = WAITING
        self.history.append(StepRecord(info.step, info.kv_usage, info.num_prefill_tokens, info.num_decode_tokens,
                                       states))
        for callback in self.on_step:
            callback(self)
        self.overhead_s += time.perf_counter() - start_time

    def _is_prefill(self, chunk: ScheduledChunk) -> bool:
        """A chunk is prefill if the engine says so or it started inside the prompt. (The sequence is read
        after the step: a one-token last chunk of a prompt looks like a decode by then.)"""
        tracked = self.tracked.get(chunk.request_id)
        if chunk.is_prefill or tracked is None or tracked.seq is None:
            return chunk.is_prefill
        seq = tracked.seq
        return seq.num_computed_tokens - chunk.num_new_tokens < seq.num_prompt_tokens

    def snapshot(self, attention: AttentionView | None = None, num_layers: int = 0) -> VizState:
        last = self.history[-1] if self.history else None
        tables = self.block_manager.block_tables()
        holders: dict[int, int] = {}   # block id -> number of live sequences holding it
        for table in tables.values():
            for block_id in table:
                holders[block_id] = holders.get(block_id, 0) + 1
        requests = [self._request_view(tracked, tables, holders) for tracked in self.tracked.values()]
        return VizState(
            step=len(self.history),
            kv_policy=self.kv_policy,
            max_num_batched_tokens=self.max_num_batched_tokens,
            num_prefill_tokens=last.num_prefill_tokens if last else 0,
            num_decode_tokens=last.num_decode_tokens if last else 0,
            kv_usage=self.block_manager.usage(),
            requests=requests,
            attention=attention,
            num_layers=num_layers,
            kv_cache_dtype=self.kv_cache_dtype,
        )

    @staticmethod
    def _request_view(tracked: _Tracked, tables: dict[int, list[int]], holders: dict[int, int]) -> RequestView:
        seq = tracked.seq
        if seq is None:
            return RequestView(tracked.request_id, "upcoming", tracked.arrival_step)
        table = tables.get(seq.seq_id, [])
        return RequestView(
            request_id=tracked.request_id,
            state=_state_of(seq),
            arrival_step=tracked.arrival_step,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_computed_tokens=seq.num_computed_tokens,
            # A prefill computes the prompt; a recomputation after preemption, everything but the last token.
            prefill_target=seq.num_tokens - 1 if seq.num_output_tokens else seq.num_tokens,
            num_output_tokens=seq.num_output_tokens,
            max_tokens=seq.max_tokens,
            finish_reason=seq.finish_reason,
            text=seq.output_text,
            num_blocks=len(table),
            num_shared_blocks=sum(1 for block_id in table if holders[block_id] > 1),
        )


def _state_of(seq: Sequence) -> str:
    if seq.is_finished:
        return "done"
    if seq.status is SequenceStatus.PREEMPTED:
        return "preempted"
    if seq.status is SequenceStatus.WAITING:
        return "waiting"
    computing_context = seq.num_computed_tokens < (seq.num_tokens - 1 if seq.num_output_tokens else seq.num_tokens)
    return "prefill" if computing_context else "decode"
