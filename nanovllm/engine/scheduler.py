"""Continuous batching with chunked prefill, prefix caching and preemption.

Each step has one token budget, `max_num_batched_tokens`, and every scheduled
sequence spends from it the number of its tokens that will be computed: a
decode spends 1, a prefill spends its prompt, cut into chunks that fit (so one
long prompt is spread over several steps, each also carrying everyone's
decodes). There is no prefill phase and decode phase, only "tokens not yet
computed" (vLLM v1's model).

`schedule()` fills the budget in this order:
1. running sequences, oldest first: a decode, or the next chunk of a prompt
   still being prefilled. When the pool has no block for one, the most
   recently arrived running sequence is preempted (its blocks freed; it goes
   back to the front of the waiting queue and recomputes its KV later).
2. waiting sequences, first come first served, while there is budget and room
   for `max_num_seqs`: each first looks up its prefix in the cache (hits need
   no computing), then gets a chunk of the rest.

A launched step is settled in two halves. `advance()`, as soon as the step is
on its way, moves the counters on and gives each sequence that samples a
placeholder for its token (sequence.py), so the next step can be scheduled
before this one's tokens arrive (async scheduling, engine.py). `complete()`,
when they arrive, fills the placeholders, hashes newly full blocks, applies the
stop rules and frees the blocks of finished sequences. `postprocess()` is the
two at once. A sequence whose pending token is sure to end it (its max_tokens or
max_model_len) is not scheduled again; one that ends by a stop token or string
ran one step too many, and that step's token is dropped.

A request that could never fit (longer than `max_model_len`, or needing more
blocks than the whole pool) is refused by `check_fits` before it is queued, so
the oldest running sequence can always make progress: no deadlock.
"""
from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence, SequenceStatus


class SampledTokens(Protocol):
    """What postprocess reads from the sampler (nanovllm.runner.sampler.SamplerOutput)."""
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[dict[int, float]] | None


@dataclass
class Batch:
    """One step's work: (sequence, number of its tokens to compute now), in order."""
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)
    sampling_seqs: list[Sequence] = field(default_factory=list)   # whose chunk reaches their last token
    is_prefill: list[bool] = field(default_factory=list)           # per scheduled chunk, decided when scheduled
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    preempted: list[Sequence] = field(default_factory=list)       # preempted while building this batch
    output_indices: list[int] = field(default_factory=list)       # per sampling seq: its token's output index (advance)

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


def is_decode(seq: Sequence, num_new_tokens: int) -> bool:
    """A decode computes the one token sampled last step; anything else is (re)computing a prefix."""
    return num_new_tokens == 1 and seq.num_computed_tokens == seq.num_tokens - 1 >= seq.num_prompt_tokens


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, eos_token_ids: list[int]):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = set(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []      # sorted by arrival: the last one is preempted first
        # Samples 2..n of a request wait here until sample 1 has computed the prompt,
        # then find its blocks in the prefix cache (or share them directly).
        self.held_siblings: dict[int, list[Sequence]] = {}   # leader seq_id -> siblings
        self.leaders: dict[int, Sequence] = {}               # sibling seq_id -> leader
        self.num_preemptions = 0

    # ---- queue ---------------------------------------------------------------------------

    def check_fits(self, seq: Sequence) -> None:
        """Raise ValueError if seq could never run, even alone: its prompt or its KV cannot fit."""
        if seq.num_prompt_tokens > self.max_model_len:
            raise ValueError(f"the prompt has {seq.num_prompt_tokens} tokens but max_model_len is "
                             f"{self.max_model_len}; shorten the prompt or raise max_model_len")
        # Every token but the last sampled one is computed, so needs a slot.
        final_len = min(seq.num_prompt_tokens + seq.max_tokens, max(self.max_model_len, seq.num_prompt_tokens + 1))
        needed = self.block_manager.num_blocks_for(final_len - 1)
        if needed > self.block_manager.num_blocks:
            raise ValueError(f"the request needs {needed} KV blocks ({final_len - 1} tokens) but the pool has "
                             f"{self.block_manager.num_blocks}; lower max_tokens, shorten the prompt or "
                             "give the engine more KV cache memory")

    def add_sequences(self, seqs: list[Sequence]) -> None:
        """Queue a request's samples: the first now, the others once it has computed the prompt."""
        leader, siblings = seqs[0], seqs[1:]
        self.waiting.append(leader)
        if siblings:
            self.held_siblings[leader.seq_id] = siblings
            for sibling in siblings:
                self.leaders[sibling.seq_id] = leader

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.held_siblings)

    def num_held(self) -> int:
        return sum(len(siblings) for siblings in self.held_siblings.values())

    def finish(self, seq: Sequence, status: SequenceStatus, now: float | None = None) -> None:
        """End seq (any state) with a finished status and free its blocks."""
        if seq.is_finished:
            return
        seq.drop_placeholders()
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release_siblings(seq)
        leader = self.leaders.pop(seq.seq_id, None)
        if leader is not None and leader.seq_id in self.held_siblings:
            self.held_siblings[leader.seq_id].remove(seq)
        seq.status = status
        seq.finish_time = time.time() if now is None else now
        self.block_manager.free(seq)
        if seq.detokenize_at_finish and seq.detokenizer is not None:
            seq.output_text = seq.detokenizer.whole_text(seq.output_token_ids)

    # ---- schedule ------------------------------------------------------------------------

    def schedule(self) -> Batch:
        batch = Batch()
        budget = self.max_num_batched_tokens
        now = time.time()

        # 1. Running sequences, oldest first.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_pending and self._ends_with_pending_token(seq):
                i += 1   # the token on its way is its last: complete() will finish it
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.allocate_slots(seq, seq.num_computed_tokens + num_new):
                victim = self.running[-1]
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break   # it preempted itself: it was the newest, nothing after it runs
            self._add_to_batch(batch, seq, num_new)
            budget -= num_new
            i += 1

        # 2. Waiting sequences, first come first served (none if someone was just preempted:
        #    the pool is full, admitting would only preempt again).
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not batch.preempted:
            seq = self.waiting[0]
            shared = self._shared_prefix(seq)
            num_computed = len(shared) * self.block_manager.block_size
            num_new = min(seq.num_tokens - num_computed, budget)
            if not self.block_manager.allocate_slots(seq, num_computed + num_new, shared):
                break
            self.waiting.popleft()
            self.block_manager.record_prefix_lookup(seq.num_tokens, num_computed)
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
                seq.num_cached_tokens = num_computed
            seq.num_computed_tokens = num_computed
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=_arrival_order)
            self._add_to_batch(batch, seq, num_new)
            budget -= num_new
        return batch

    def _add_to_batch(self, batch: Batch, seq: Sequence, num_new: int) -> None:
        batch.scheduled.append((seq, num_new))
        decode = is_decode(seq, num_new)
        batch.is_prefill.append(not decode)
        if decode:
            batch.num_decode_tokens += 1
        else:
            batch.num_prefill_tokens += num_new
        if seq.num_computed_tokens + num_new == seq.num_tokens:
            batch.sampling_seqs.append(seq)

    def _shared_prefix(self, seq: Sequence) -> list[int]:
        """Blocks of seq's prefix that are computed already: prefix-cache hits, or its leader's prompt."""
        if seq.needs_prompt_logprobs:   # the cache holds no logits: the prompt is recomputed
            return []
        shared = self.block_manager.find_cached_prefix(seq)
        leader = self.leaders.get(seq.seq_id)
        if not shared and leader is not None and leader.status is SequenceStatus.RUNNING:
            # Without prefix caching, samples of one request still share the prompt's full blocks.
            num_blocks = min(leader.num_computed_tokens, seq.num_tokens - 1) // self.block_manager.block_size
            shared = leader.block_table[:num_blocks]
        return shared

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.PREEMPTED
        seq.num_computed_tokens = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _release_siblings(self, leader: Sequence) -> None:
        """The leader computed its prompt (or ended): its siblings may run now, ahead of later requests."""
        siblings = self.held_siblings.pop(leader.seq_id, None)
        if siblings:
            self.waiting.extendleft(reversed(siblings))

    # ---- postprocess ---------------------------------------------------------------------

    def _ends_with_pending_token(self, seq: Sequence) -> bool:
        return self._reaches_length_limit(seq, seq.num_output_tokens)

    def _reaches_length_limit(self, seq: Sequence, num_outputs: int) -> bool:
        """Whether a sequence with num_outputs output tokens has reached max_tokens or max_model_len."""
        return num_outputs >= seq.max_tokens or seq.num_prompt_tokens + num_outputs >= self.max_model_len

    def postprocess(self, batch: Batch, sampled: SampledTokens) -> list[Sequence]:
        """Apply one step's results at once (advance, then complete); -> the sequences that finished."""
        self.advance(batch)
        return self.complete(batch, sampled)

    def advance(self, batch: Batch) -> None:
        """What a launched step does, known before its tokens arrive: its tokens are computed, and
        each sampling sequence holds a placeholder for the token on its way."""
        for seq, num_new in batch.scheduled:
            seq.num_computed_tokens += num_new
            if seq.num_computed_tokens >= seq.num_prompt_tokens:
                self._release_siblings(seq)
        batch.output_indices = [seq.add_placeholder(row) for row, seq in enumerate(batch.sampling_seqs)]

    def complete(self, batch: Batch, sampled: SampledTokens) -> list[Sequence]:
        """The advanced step's tokens arrived: fill them in, hash full blocks, apply the stop rules;
        -> the sequences that finished."""
        now = time.time()
        filled = []
        for row, (seq, index) in enumerate(zip(batch.sampling_seqs, batch.output_indices)):
            if seq.is_finished:   # aborted meanwhile, or stopped by the step before (async)
                continue
            top = sampled.top_logprobs[row] if sampled.top_logprobs is not None else None
            seq.fill_token(index, sampled.token_ids[row], sampled.logprobs[row], top, now)
            filled.append((seq, index))
        for seq, _ in batch.scheduled:
            if seq.status is SequenceStatus.RUNNING:
                self.block_manager.cache_full_blocks(seq)
        finished = []
        for seq, index in filled:
            status = self._check_stop(seq, index)
            if status is not None:
                self.finish(seq, status, now)
                finished.append(seq)
        return finished

    def _check_stop(self, seq: Sequence, index: int) -> SequenceStatus | None:
        """The stop rules for output token `index`, in order: stop tokens (after min_tokens), stop
        strings, length."""
        params = seq.sampling_params
        token_id = seq.output_token_ids[index]
        num_outputs = index + 1
        new_text = ""
        if seq.detokenizer is not None and not seq.detokenize_at_finish:
            new_text = seq.detokenizer.add_tokens([token_id])
            seq.output_text += new_text
        if num_outputs >= params.min_tokens:   # the sampler keeps stop tokens out before that
            if token_id in self.eos_token_ids and not params.ignore_eos:
                return SequenceStatus.FINISHED_STOPPED
            if token_id in params.stop_token_ids:
                seq.stop_reason = token_id
                return SequenceStatus.FINISHED_STOPPED
            if params.stop and new_text and _match_stop_string(seq, len(new_text)):
                return SequenceStatus.FINISHED_STOPPED
        if self._reaches_length_limit(seq, num_outputs):
            return SequenceStatus.FINISHED_LENGTH
        return None


def _arrival_order(seq: Sequence) -> tuple[float, int]:
    return seq.arrival_time, seq.seq_id


def _match_stop_string(seq: Sequence, num_new_chars: int) -> bool:
    """If a stop string ends inside the newest text, cut the output there and say so."""
    params = seq.sampling_params
    text = seq.output_text
    best = None   # (cut position, stop string) of the earliest match
    for stop in params.stop:
        # Only a match that ends in the new characters is new.
        search_from = max(len(text) - num_new_chars - len(stop) + 1, 0)
        pos = text.find(stop, search_from)
        if pos != -1 and (best is None or pos < best[0]):
            best = (pos, stop)
    if best is None:
        return False
    pos, stop = best
    seq.output_text = text[:pos + len(stop)] if params.include_stop_str_in_output else text[:pos]
    seq.stop_reason = stop
    return True
