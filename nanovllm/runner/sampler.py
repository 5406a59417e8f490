"""Sampler: one set of tensor ops turns a batch's logits into one token per row.

Every row of the batch may ask for something different (greedy or not, its own
temperature, top-k, penalties ...). Instead of a Python loop over rows, each
setting becomes a `[B]` tensor (`SamplingBatch`) and every stage runs on the
whole `[B, V]` logits at once; a stage no row uses is skipped. The order is
vLLM's:

    raw logits ─► logit_bias ─► grammar mask ─► penalties ─► min_tokens ─► greedy rows: argmax
                  (repetition on        (EOS and stop_token_ids
                   prompt+output,        at -inf until the row has
                   frequency/presence    min_tokens outputs)
                   on output)
               ─► / temperature ─► top-k, top-p, min-p masks ─► softmax ─► exponential race
                                   (each a per-row threshold;
                                    one topk or sort of the rows)

A batch of greedy and plain temperature rows (no penalties, no
top-k/top-p/min-p) takes one fused pass over the logits (on a GPU, Triton
programs over chunks of each row, then one that combines a row's chunks): the
argmax or the race, and the logsumexp the log-probabilities need.

The returned log-probability is that of the model distribution before the
penalties and filters (log_softmax of the logits), as vLLM returns by default;
logit_bias and a grammar's mask come first, so they shape it.

Structured outputs: each constrained row brings a bitmask of the tokens its
grammar allows next (nanovllm/structured); the masks of the R constrained rows
form one [R, ceil(V / 32)] tensor that sets the other tokens' logits to -inf
(ops/bitmask.py), and logit_bias is a list of (row, token, bias) triples added
in one scatter. A batch without either skips both, and the unconstrained rows
of a batch with them are never read.

Reproducible randomness, whatever the batch
-------------------------------------------
A seeded request must sample the same tokens alone or in any batch, at any row,
on the CPU or a GPU. A shared torch.Generator cannot do that (a row's draws
would depend on how many numbers the rows before it consumed), and one generator
per row means a Python loop. So the random numbers are *counter based*: each is
a hash of where it is used,

    u[b, v] = hash(seed[b], output_len[b], v)  ->  uniform in (0, 1)

where `output_len[b]` (tokens the sequence has generated so far) is the counter
that makes each step's draw fresh. The hash is a 32-bit integer mixer
(xor-shift, multiply, xor-shift, multiply, xor-shift: every input bit flips each
output bit with probability ~1/2), applied first to (seed, output_len) per row,
on the host, then to (row key, v) over the whole [B, V] batch on the device. The
32-bit values live in int64 arrays and the multipliers are below 2**31, so no
product ever overflows: the integer ops give the same bits on every device.

A token is then drawn by the exponential race: with E[v] = -log u[v] an
Exponential(1) variable, argmax_v probs[v] / E[v] is a token drawn with
probability probs[v] (each token's "arrival time" E[v] / probs[v] is
exponential with rate probs[v]; the first to arrive wins with probability
proportional to its rate). It is the Gumbel-max trick in disguise, costs one
argmax, and a token with probability 0 can never win.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from nanovllm.ops.bitmask import apply_token_bitmask
from nanovllm.ops.sampling import (_MASK32, _MASK64, _SALT_SEED, _mix32, exponential_race, log_normalizer_of,
                                   random_uniform, sample_from_logits)
from nanovllm.sampling_params import SamplingParams
from nanovllm.structured.grammar import GrammarState
from nanovllm.structured.grammar_process import GrammarBitmask


def stream_keys(seeds: list[int], output_lens: list[int]) -> np.ndarray:
    """hash(seed, output_len) per row: the key of that row's random numbers this step; int64 [B]."""
    seeds_u64 = np.array([int(seed) & _MASK64 for seed in seeds], dtype=np.uint64)
    seeds_low = (seeds_u64 & np.uint64(_MASK32)).astype(np.int64)
    seeds_high = (seeds_u64 >> np.uint64(32)).astype(np.int64)
    keys = _mix32(seeds_low ^ _SALT_SEED)
    keys = _mix32(keys ^ seeds_high)
    return _mix32(keys ^ (np.array(output_lens, dtype=np.int64) & _MASK32))


@dataclass
class SamplingBatch:
    """The sampling settings of B rows as tensors on one device; None = no row uses it."""
    all_greedy: bool
    all_random: bool
    is_greedy: torch.Tensor | None              # [B] bool (mixed batches only)
    temperature: torch.Tensor | None            # [B] float32, 1.0 on greedy rows
    top_k: torch.Tensor | None                  # [B] int64, 0 where off
    max_top_k: int                              # the largest top_k in use (0: none)
    top_p: torch.Tensor | None                  # [B] float32, inf where off
    top_p_needs_full_sort: bool                 # some top-p row has no top-k to bound its candidates
    min_p: torch.Tensor | None                  # [B] float32, 0 where off
    stream_keys: torch.Tensor | None            # [B] int64, hash(seed, output_len): this step's random stream
    presence_penalty: torch.Tensor | None       # [B] float32
    frequency_penalty: torch.Tensor | None      # [B] float32
    repetition_penalty: torch.Tensor | None     # [B] float32
    output_token_ids: torch.Tensor | None       # [B, max output len] int64, padded with -1
    prompt_token_ids: torch.Tensor | None       # [B, max prompt len] int64, padded with -1 (repetition only)
    suppressed_token_ids: torch.Tensor | None   # [B, S] int64, padded with -1: EOS + stop ids before min_tokens
    num_logprobs: list[int | None]              # per row: how many top log-probabilities it asked for
    max_num_logprobs: int | None                # None when no row asked
    bitmask: torch.Tensor | None = None         # [R, ceil(V/32)] int32: the tokens each constrained row allows
    bitmask_rows: torch.Tensor | None = None    # [R] int64: which rows those are
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None   # rows, token ids, biases [N] each

    @classmethod
    def build(cls, params: list[SamplingParams], seeds: list[int], output_lens: list[int],
              prompt_token_ids: list[list[int]], output_token_ids: list[list[int]],
              eos_token_ids: list[int], device: torch.device | str,
              grammars: list[GrammarState | None] | None = None, grammar_masks: GrammarBitmask | None = None,
              newest_token_ids: list[int] | None = None) -> "SamplingBatch":
        """grammars: per row, the sequence's grammar matcher (None: unconstrained); each is first fed the
        row's output tokens it has not seen, then fills its row of `grammar_masks` (the runner's buffers;
        new ones if None). newest_token_ids: per row, the id behind its last output placeholder when the
        host holds only that (async scheduling), else -1."""
        greedy = [p.is_greedy for p in params]
        all_greedy, all_random = all(greedy), not any(greedy)

        def floats(values: list[float]) -> torch.Tensor:
            return host_to_device(values, torch.float32, device)

        def ints(values: list[int]) -> torch.Tensor:
            return host_to_device(values, torch.int64, device)

        is_greedy = temperature = top_k = top_p = min_p = keys = None
        max_top_k, top_p_needs_full_sort = 0, False
        if not all_greedy:
            is_greedy = None if all_random else host_to_device(greedy, torch.bool, device)
            temperature = floats([1.0 if g else p.temperature for p, g in zip(params, greedy)])
            top_ks = [0 if g else max(p.top_k, 0) for p, g in zip(params, greedy)]
            max_top_k = max(top_ks)
            if max_top_k > 0:
                top_k = ints(top_ks)
            top_ps = [1.0 if g else p.top_p for p, g in zip(params, greedy)]
            if min(top_ps) < 1.0:
                top_p = floats([p if p < 1.0 else float("inf") for p in top_ps])
                top_p_needs_full_sort = any(p < 1.0 and k == 0 for p, k in zip(top_ps, top_ks))
            if any(p.min_p > 0.0 and not g for p, g in zip(params, greedy)):
                min_p = floats([0.0 if g else p.min_p for p, g in zip(params, greedy)])
            keys = host_to_device(stream_keys(seeds, output_lens), torch.int64, device)

        presence = frequency = repetition = output_ids = prompt_ids = None
        if any(p.has_penalties for p in params):
            presence = floats([p.presence_penalty for p in params])
            frequency = floats([p.frequency_penalty for p in params])
            output_ids = _padded(output_token_ids, device)
            if any(p.repetition_penalty != 1.0 for p in params):
                repetition = floats([p.repetition_penalty for p in params])
                prompt_ids = _padded(prompt_token_ids, device)

        suppressed = None
        if any(n < p.min_tokens for p, n in zip(params, output_lens)):
            suppressed = _padded([list(eos_token_ids) + p.stop_token_ids if n < p.min_tokens else []
                                  for p, n in zip(params, output_lens)], device)

        num_logprobs = [p.logprobs for p in params]
        asked = [k for k in num_logprobs if k is not None]
        bitmask, bitmask_rows = (None, None) if grammars is None else _grammar_bitmask(
            grammars, output_token_ids, newest_token_ids, eos_token_ids, device, grammar_masks)
        return cls(all_greedy=all_greedy, all_random=all_random, is_greedy=is_greedy, temperature=temperature,
                   top_k=top_k, max_top_k=max_top_k, top_p=top_p,
                   top_p_needs_full_sort=top_p_needs_full_sort, min_p=min_p, stream_keys=keys,
                   presence_penalty=presence, frequency_penalty=frequency, repetition_penalty=repetition,
                   output_token_ids=output_ids, prompt_token_ids=prompt_ids, suppressed_token_ids=suppressed,
                   num_logprobs=num_logprobs, max_num_logprobs=max(asked) if asked else None,
                   bitmask=bitmask, bitmask_rows=bitmask_rows, logit_bias=_logit_bias(params, device))


    @classmethod
    def plain(cls, num_rows: int, temperature: torch.Tensor | None, stream_keys: torch.Tensor | None,
              all_random: bool) -> "SamplingBatch":
        """Rows that need only the fused pass (SamplingParams.is_plain_or_masked): temperature [B] float32
        (0 on greedy rows) and stream_keys [B] int64 already on the device; both None when every row is
        greedy. What `build` makes of such rows, without a pass over them on the host."""
        return cls(all_greedy=temperature is None, all_random=all_random, is_greedy=None, temperature=temperature,
                   top_k=None, max_top_k=0, top_p=None, top_p_needs_full_sort=False, min_p=None,
                   stream_keys=stream_keys, presence_penalty=None, frequency_penalty=None, repetition_penalty=None,
                   output_token_ids=None, prompt_token_ids=None, suppressed_token_ids=None,
                   num_logprobs=[None] * num_rows, max_num_logprobs=None)


def _grammar_bitmask(grammars: list[GrammarState | None], output_token_ids: list[list[int]],
                     newest_token_ids: list[int] | None, eos_token_ids: list[int], device: torch.device | str,
                     masks: GrammarBitmask | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """-> (bitmask [R, W] int32, rows [R] int64) of the constrained rows; (None, None) if none is."""
    rows = [row for row, grammar in enumerate(grammars) if grammar is not None]
    if not rows:
        return None, None
    if masks is None:   # a grammar process for these rows alone
        masks = GrammarBitmask(len(rows), grammars[rows[0]].compiler, device)
    newest = None if newest_token_ids is None else [newest_token_ids[row] for row in rows]
    return masks.build([grammars[row] for row in rows], [output_token_ids[row] for row in rows], rows, newest)


def _logit_bias(params: list[SamplingParams], device: torch.device | str,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The (row, token id, bias) triples of every row's logit_bias, as three [N] tensors; None if none has one."""
    triples = [(row, token_id, bias) for row, p in enumerate(params) if p.logit_bias
               for token_id, bias in p.logit_bias.items()]
    if not triples:
        return None
    rows, token_ids, biases = zip(*triples)
    return (host_to_device(rows, torch.int64, device), host_to_device(token_ids, torch.int64, device),
            host_to_device(biases, torch.float32, device))


@dataclass
class SamplerOutput:
    token_ids: list[int]                          # [B]
    logprobs: list[float]                         # [B] log-prob of the sampled token, raw distribution
    top_logprobs: list[dict[int, float]] | None   # per row: top `logprobs` tokens + the sampled one

    @classmethod
    def empty(cls) -> "SamplerOutput":
        """A step in which no sequence sampled (only chunks in the middle of prompts)."""
        return cls(token_ids=[], logprobs=[], top_logprobs=None)


class SampleBuffers:
    """Where a step's samples land on the device: one int64 tensor holding the token ids of up to
    `rows` rows, then their float32 log-probabilities packed two to an entry, so that one copy
    brings both to the host. The runner keeps one for good: its token ids are where the next
    decode step's CUDA graph reads the input ids of rows whose token is still pending."""

    def __init__(self, rows: int, device: torch.device | str):
        self.rows = rows
        self.packed = torch.zeros(2 * rows, dtype=torch.int64, device=device)
        self.token_ids = self.packed[:rows]                                   # [rows] int64
        self.logprobs = self.packed[rows:].view(torch.float32)[:rows]         # [rows] float32
        self._views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def first(self, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(token_ids[:num_rows], logprobs[:num_rows]), made once per row count: a step's sampling writes
        into them, and on the CPU each slicing op costs several microseconds after a forward."""
        views = self._views.get(num_rows)
        if views is None:
            views = self._views[num_rows] = (self.token_ids[:num_rows], self.logprobs[:num_rows])
        return views


@dataclass
class DeviceSamples:
    """A step's samples still on the device (the kernels may still be running), with their copy to
    the host under way; `result()` waits for that copy only."""
    num_rows: int                                 # B
    host: torch.Tensor                            # SampleBuffers.packed on the host (pinned), or a copy
    top: list[torch.Tensor] | None                # top log-probabilities [B, k] and their ids, on the host
    num_logprobs: list[int | None]
    copied: torch.cuda.Event | None               # recorded after the copies (None on the CPU)
    # How `result` waits for `copied`: its synchronize(), or with tensor parallelism a poll that watches the
    # other ranks (an NCCL collective whose peer died never completes, and a sync on it never returns)
    wait: Callable[[torch.cuda.Event], None] | None = None

    @classmethod
    def start_copy(cls, buffers: SampleBuffers, num_rows: int, top: list[torch.Tensor] | None,
                   num_logprobs: list[int | None]) -> "DeviceSamples":
        """Copy the packed buffer (and the top log-probabilities, if asked for) to the host, without waiting."""
        if buffers.packed.device.type != "cuda":   # the buffers are reused next step: keep this step's values
            return cls(num_rows, buffers.packed.clone(), top, num_logprobs, None)
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                for t in [buffers.packed] + (top or [])]
        copied = torch.cuda.Event()
        copied.record()
        return cls(num_rows, host[0], host[1:] or None, num_logprobs, copied)

    def result(self) -> SamplerOutput:
        if self.copied is not None:
            (self.wait or torch.cuda.Event.synchronize)(self.copied)
        rows, n = self.host.shape[0] // 2, self.num_rows
        token_list = self.host[:n].tolist()
        logprob_list = self.host[rows:].view(torch.float32)[:n].tolist()
        top = None
        if self.top is not None:
            top = _top_logprobs(self.top[0].tolist(), self.top[1].tolist(), token_list, logprob_list,
                                self.num_logprobs)
        return SamplerOutput(token_ids=token_list, logprobs=logprob_list, top_logprobs=top)


class DeferredSamples:
    """A step whose sampling waits for its grammar masks: its forward is queued, the masks are being
    filled by the grammar process (GrammarBitmask.start), and `finish` queues the masked sampling -> the step's
    DeviceSamples. The runner finishes it at the start of the next launch (nothing of that step may
    reach the device before these tokens), or `result` does."""

    def __init__(self, queue_sampling: Callable[[], DeviceSamples]):
        self._queue_sampling: Callable[[], DeviceSamples] | None = queue_sampling
        self._samples: DeviceSamples | None = None
        self._error: Exception | None = None

    def finish(self) -> DeviceSamples | None:
        """Queue the sampling (once) -> its DeviceSamples; None if that failed (`result` raises why)."""
        if self._queue_sampling is not None:
            queue_sampling, self._queue_sampling = self._queue_sampling, None
            try:
                self._samples = queue_sampling()
            except Exception as error:   # this step's fault: its own result raises it, not the next launch
                self._error = error
        return self._samples

    def result(self) -> SamplerOutput:
        samples = self.finish()
        if samples is None:
            raise self._error
        return samples.result()


class Sampler:
    """logits [B, V] (the model's dtype) + SamplingBatch -> one token per row (see the module docstring).

    batch_invariant: a row's log-probabilities must not depend on the batch size: the log-normalizer
    comes from the fused pass with a fixed cut of the vocabulary, never from torch's reduction, whose
    split of a row follows the number of rows."""

    def __init__(self, batch_invariant: bool = False):
        self.batch_invariant = batch_invariant

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        return self.sample(logits, batch).result()

    def sample(self, logits: torch.Tensor, batch: SamplingBatch, out: SampleBuffers | None = None) -> DeviceSamples:
        """The same without waiting: the tokens stay on the device (in `out`, or in new buffers), their
        copy to the host starts."""
        num_rows = logits.shape[0]
        if out is None:
            out = SampleBuffers(num_rows, logits.device)
        out_tokens, out_logprobs = out.first(num_rows)
        # Both are written in place: the model's logits are not read again.
        if batch.logit_bias is not None:
            logits = logits.float()   # a bias added in bfloat16 would round
            rows, token_ids, biases = batch.logit_bias
            logits.index_put_((rows, token_ids), biases, accumulate=True)
        if batch.bitmask is not None:   # -inf is exact in any dtype: no float32 copy of [B, V]
            apply_token_bitmask(logits, batch.bitmask, batch.bitmask_rows)
        plain = (batch.output_token_ids is None and batch.suppressed_token_ids is None and batch.top_k is None
                 and batch.top_p is None and batch.min_p is None)
        if plain:   # greedy or plain temperature rows: one fused pass over the logits as they are
            keys, temperature = (None, None) if batch.all_greedy else (batch.stream_keys, batch.temperature)
            if batch.is_greedy is not None:   # a mixed batch: temperature 0 makes a row greedy in the pass
                temperature = torch.where(batch.is_greedy, 0.0, temperature)
            _, _, log_normalizer = sample_from_logits(logits, keys, temperature, out=(out_tokens, out_logprobs),
                                                      batch_invariant=self.batch_invariant)
            if batch.max_num_logprobs is not None:
                logits = logits.float()
        else:
            logits = logits.float()
            processed = apply_penalties(logits, batch)
            if batch.suppressed_token_ids is not None:
                processed = processed.masked_fill(_token_counts(batch.suppressed_token_ids, logits.shape[1]) > 0,
                                                  float("-inf"))
            if self.batch_invariant and logits.is_cuda:   # the greedy pass finds it on its way
                log_normalizer = sample_from_logits(logits, None, None, batch_invariant=True)[2]   # [B]
            else:
                log_normalizer = log_normalizer_of(logits)                                     # [B]
            token_ids = processed.argmax(dim=-1) if batch.all_greedy else _sample(processed, batch)   # [B]
            out_tokens.copy_(token_ids)
            torch.sub(logits.gather(1, token_ids[:, None]).squeeze(1), log_normalizer, out=out_logprobs)   # [B]
        top = None
        if batch.max_num_logprobs is not None:
            values, ids = logits.topk(min(batch.max_num_logprobs, logits.shape[1]), dim=-1)    # [B, k] each
            top = [values - log_normalizer[:, None], ids]
        return DeviceSamples.start_copy(out, num_rows, top, batch.num_logprobs)


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """vLLM's penalties: repetition on prompt+output tokens, then frequency and presence on output."""
    if batch.output_token_ids is None:
        return logits
    vocab_size = logits.shape[1]
    output_counts = _token_counts(batch.output_token_ids, vocab_size)     # [B, V]
    output_seen = output_counts > 0                                       # [B, V]
    if batch.repetition_penalty is not None:
        seen = output_seen | (_token_counts(batch.prompt_token_ids, vocab_size) > 0)
        penalty = torch.where(seen, batch.repetition_penalty[:, None], 1.0)   # [B, V]
        logits = torch.where(logits > 0, logits / penalty, logits * penalty)
    return (logits - batch.frequency_penalty[:, None] * output_counts
            - batch.presence_penalty[:, None] * output_seen)


def _token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """token_ids [B, L] padded with -1 -> float32 [B, V]: how often each token occurs per row."""
    num_rows = token_ids.shape[0]
    # Padding (and any id outside the vocabulary) is counted in one extra column, then dropped.
    index = torch.where((token_ids < 0) | (token_ids >= vocab_size), vocab_size, token_ids)
    counts = torch.zeros(num_rows, vocab_size + 1, dtype=torch.float32, device=token_ids.device)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float32))
    return counts[:, :vocab_size]


def _sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Token ids [B]: argmax on greedy rows, a seeded draw on the others."""
    scaled = logits * (1.0 / batch.temperature)[:, None]                  # [B, V], as the fused pass scales
    if batch.top_k is not None or batch.top_p is not None:
        scaled = scaled.masked_fill(scaled < _top_k_top_p_threshold(scaled, batch), float("-inf"))
    if batch.min_p is not None:
        # Keep tokens with prob >= min_p * max prob, i.e. logit >= max logit + log(min_p).
        threshold = scaled.max(dim=-1, keepdim=True).values + torch.log(batch.min_p)[:, None]
        scaled = scaled.masked_fill(scaled < threshold, float("-inf"))
    random_tokens = exponential_race(scaled, batch.stream_keys)           # [B]
    if batch.all_random:
        return random_tokens
    return torch.where(batch.is_greedy, logits.argmax(dim=-1), random_tokens)


def _top_k_top_p_threshold(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """[B, 1]: the smallest logit each row keeps after top-k then top-p; -inf where both are off.

    Both filters keep a prefix of the row sorted in descending order, so only that
    order is needed: one sort of the rows, or just the `max_top_k` largest values
    when every top-p row also has a top-k (top-p then renormalizes over those).
    """
    if batch.top_p is not None and batch.top_p_needs_full_sort:
        descending = logits.sort(dim=-1, descending=True).values         # [B, V]
    else:
        descending = logits.topk(min(batch.max_top_k, logits.shape[1]), dim=-1).values   # [B, max_top_k]
    filtered = torch.zeros(logits.shape[0], 1, dtype=torch.bool, device=logits.device)   # [B, 1]
    if batch.top_k is not None:
        # Below the k-th largest value goes (ties at it stay, as in vLLM); rows with top_k 0 keep all.
        uses_top_k = batch.top_k[:, None] > 0                             # [B, 1]
        index = (batch.top_k - 1).clamp(0, descending.shape[1] - 1)[:, None]
        kth_largest = torch.where(uses_top_k, descending.gather(1, index), float("-inf"))
        descending = descending.masked_fill(descending < kth_largest, float("-inf"))
        filtered |= uses_top_k
    if batch.top_p is not None:
        # Drop a token once the more likely tokens before it already sum to top_p:
        # the smallest prefix whose probability reaches top_p. The first token always stays.
        probs = torch.softmax(descending, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        descending = descending.masked_fill(mass_before >= batch.top_p[:, None], float("-inf"))
        filtered |= batch.top_p[:, None] < 1.0
    num_kept = (descending > float("-inf")).sum(dim=-1, keepdim=True).clamp(min=1)   # [B, 1]
    return torch.where(filtered, descending.gather(1, num_kept - 1), float("-inf"))


def _top_logprobs(values: list[list[float]], ids: list[list[int]], token_ids: list[int],
                  sampled_logprobs: list[float], num_logprobs: list[int | None]) -> list[dict[int, float]]:
    """Per row that asked: its `logprobs` most likely tokens under the raw distribution, plus the sampled one."""
    rows: list[dict[int, float]] = []
    for row, num in enumerate(num_logprobs):
        if num is None:
            rows.append({})
            continue
        top = dict(zip(ids[row][:num], values[row][:num]))
        top[token_ids[row]] = sampled_logprobs[row]
        rows.append(top)
    return rows


def _padded(rows: list[list[int]], device: torch.device | str) -> torch.Tensor:
    """Token id lists -> int64 [len(rows), longest row], padded with -1."""
    padded = np.full((len(rows), max((len(r) for r in rows), default=0)), -1, dtype=np.int64)
    for i, row in enumerate(rows):
        padded[i, :len(row)] = row
    return host_to_device(padded, torch.int64, device)


HOST_LIST_VIA_NUMPY = 64     # longer lists of host values are made tensors through numpy


def host_to_device(values: list | np.ndarray, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Host values -> a tensor on `device`, without waiting for the device. On CUDA a plain copy from
    pageable memory waits for every kernel queued before it; async scheduling needs the host to run
    ahead, so the values go through pinned memory and an asynchronous copy. A long list goes through
    numpy, which reads Python ints about three times as fast as torch (8,192 of them: 0.24 against
    0.77 ms); a short one straight to torch, one call fewer."""
    if isinstance(values, list) and len(values) > HOST_LIST_VIA_NUMPY:
        # int64 for integer tensors: an int beyond it raises, as torch's own conversion does
        values = np.asarray(values, dtype=np.int64 if not dtype.is_floating_point and dtype != torch.bool else None)
    tensor = torch.as_tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)
