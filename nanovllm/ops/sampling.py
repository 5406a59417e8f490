"""The random half of sampling: counter-based uniform numbers and the exponential race.

u[b, v] = hash(key[b], v) is a uniform number in (0, 1) computed from where it
is used, not drawn from a generator's state: the same on every device and for a
row wherever it sits in the batch (runner/sampler.py explains the keys). With
E[v] = -log u[v] an Exponential(1) variable, argmax_v probs[v] / E[v] draws
token v with probability probs[v]. In log space that is

    argmax_v  scores[v] - log E[v]        (scores = logits / temperature, masked)

which needs no softmax: the normalizer is the same for every v of a row. On a
GPU Triton programs stream the vocabulary once, hashing, racing and keeping the
running winner, instead of a dozen [B, V] int64 passes.
"""
from __future__ import annotations

import functools
from typing import TypeVar

import numpy as np
import torch

from nanovllm.ops import use_numba, use_triton
from nanovllm.ops.sampling_hash import _MASK32, _MASK64, _MIX_C1, _MIX_C2, _SALT_SEED, _SALT_TOKEN

_LARGEST_BELOW_ONE = 1.0 - 2.0 ** -24   # float32's largest value below 1

IntArray = TypeVar("IntArray", torch.Tensor, np.ndarray)


def _mix32(x: IntArray) -> IntArray:
    """A bijection of 32-bit values with full avalanche; x: int64 tensor or array in [0, 2**32).

    Every product is below 2**32 * 2**31 = 2**63, so int64 never overflows.
    """
    x = x ^ (x >> 16)
    x *= _MIX_C1
    x &= _MASK32
    x ^= x >> 15
    x *= _MIX_C2
    x &= _MASK32
    x ^= x >> 15
    return x


@functools.lru_cache(maxsize=8)
def _token_keys(vocab_size: int, device: torch.device) -> torch.Tensor:
    """hash(v) for every token id; int64 [V], made once per vocabulary and device."""
    return _mix32(torch.arange(vocab_size, device=device, dtype=torch.int64) ^ _SALT_TOKEN)


def random_uniform(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """u[b, v] = hash(keys[b], v), uniform in (0, 1); keys: int64 [B] from `stream_keys` -> float32 [B, V]."""
    bits = _mix32(keys[:, None] ^ _token_keys(vocab_size, keys.device)[None, :])   # [B, V], 32 random bits
    # The top 24 of the 32 bits, centred in their interval: never 0. Above 2**23 float32 has no room
    # for the half, and the largest value rounds up to 1, where log(-log u) = -inf would make the token
    # win the race even if it is masked out: it is clamped to the largest float32 below 1.
    bits >>= 8
    uniform = bits.to(torch.float32)
    uniform += 0.5
    uniform *= 1.0 / (1 << 24)
    return uniform.clamp_(max=_LARGEST_BELOW_ONE)


def first_argmax(x: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """x [B, V] -> int64 [B]: what `x.argmax(dim=-1)` returns (the first index of each row's maximum).
    On the CPU torch's argmax of a vocabulary-sized row takes about ten times as long as its amax:
    float32 and float64 rows go to numpy's argmax (the same first index; 7 us for a 49,152-wide row on
    one core against torch's 70), other CPU rows through chunk maxima. Elsewhere, and for rows that
    do not cut into chunks, it is argmax itself."""
    num_rows, size = x.shape
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not x.requires_grad:
        return torch.from_numpy(x.numpy().argmax(axis=1))
    if x.device.type != "cpu" or size % chunk or size < 4 * chunk:
        return x.argmax(dim=-1)
    chunks = x.view(num_rows, size // chunk, chunk)                            # [B, V / c, c]
    chunk_max = chunks.amax(dim=-1)                                            # [B, V / c]
    row_max = chunk_max.amax(dim=-1, keepdim=True)                             # [B, 1]
    first_chunk = (chunk_max == row_max).to(torch.uint8).argmax(dim=-1)        # [B]: the first chunk holding it
    candidates = chunks[torch.arange(num_rows), first_chunk]                   # [B, c]
    return first_chunk * chunk + (candidates == row_max).to(torch.uint8).argmax(dim=-1)


def exponential_race_torch(scores: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """scores [B, V] float32 (log-probabilities up to a per-row constant, -inf = excluded),
    keys [B] int64 -> token ids [B] int64."""
    # E = -log u is at least 2**-25 for the largest u; CPU log rounds some of those to E = 0, and log E = -inf
    # would turn an excluded token's -inf score into NaN, which wins every argmax.
    log_exponentials = random_uniform(keys, scores.shape[1]).log_().neg_().clamp_(min=2.0 ** -25).log_()   # [B, V]
    return first_argmax(scores - log_exponentials)


def _numba_rows(logits: torch.Tensor) -> bool:
    """Whether sampling_numba's kernels take these logits: float32 CPU rows [B, V], V > 0."""
    return use_numba(logits) and logits.dim() == 2 and logits.shape[1] > 0


def log_normalizer_of(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> [B] float32: log sum_v exp(logits), torch's `logsumexp` in float32, or for float32
    CPU logits the numba kernel of sampling_numba.py (at [16, 49152] 0.26 ms against 0.4-1.5 ms)."""
    if _numba_rows(logits):
        from nanovllm.ops.sampling_numba import log_normalizer_numba
        return log_normalizer_numba(logits)
    return torch.logsumexp(logits.float(), dim=-1)


def sample_from_logits_torch(logits: torch.Tensor, keys: torch.Tensor | None, temperature: torch.Tensor | None,
                             out: tuple[torch.Tensor, torch.Tensor] | None = None,
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sampler's common case in one call: logits [B, V] (any float dtype, computed on in float32)
    -> (token ids [B] int64: the argmax when keys is None, else the race over logits * (1 / temperature [B])
    (a row of temperature 0 takes the argmax); their log-probabilities [B]; the log-normalizer [B] of
    the logits). out: tensors to write the token ids and log-probabilities into (and return), e.g.
    views of the runner's SampleBuffers."""
    if keys is None and _numba_rows(logits):
        from nanovllm.ops.sampling_numba import greedy_sample_numba
        return greedy_sample_numba(logits, out)     # the same values in one compiled call
    logits = logits.float()
    log_normalizer = log_normalizer_of(logits)
    if keys is None:
        token_ids = first_argmax(logits)
    else:
        greedy = temperature == 0
        token_ids = exponential_race_torch(logits * torch.where(greedy, 1.0, 1.0 / temperature)[:, None], keys)
        if greedy.any():
            token_ids = torch.where(greedy, first_argmax(logits), token_ids)
    logprobs = logits.gather(1, token_ids[:, None]).squeeze(1) - log_normalizer
    if out is not None:
        token_ids, logprobs = out[0].copy_(token_ids), out[1].copy_(logprobs)
    return token_ids, logprobs, log_normalizer


def sample_from_logits(logits: torch.Tensor, keys: torch.Tensor | None, temperature: torch.Tensor | None,
                       out: tuple[torch.Tensor, torch.Tensor] | None = None, batch_invariant: bool = False,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """batch_invariant: on CUDA, cut every row into the same chunks whatever the batch size, so that a
    row's log-normalizer (and log-probabilities) has the same bits alone or batched."""
    if use_triton(logits):   # one pass over the [B, V] logits instead of five or six
        from nanovllm.ops.sampling_triton import BATCH_INVARIANT_SPLITS, sample_from_logits_triton
        return sample_from_logits_triton(logits, keys, temperature, out=out,
                                         num_splits=BATCH_INVARIANT_SPLITS if batch_invariant else None)
    return sample_from_logits_torch(logits, keys, temperature, out=out)


def exponential_race(scores: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    if use_triton(scores):
        from nanovllm.ops.sampling_triton import exponential_race_triton
        return exponential_race_triton(scores, keys)
    return exponential_race_torch(scores, keys)
