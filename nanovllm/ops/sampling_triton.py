"""Triton versions of ops/sampling.py's exponential race: one program per row streams
the vocabulary once, hashing each token's uniform number in registers (the same
32-bit mixer as the torch reference, in uint32 arithmetic that wraps mod 2**32)
and keeping the running winner of scores - log(-log u).

`sample_from_logits_triton` is the sampler's common case in the same single pass:
the winner of logits / temperature (or the argmax, for greedy batches) and, on the
way, the row's log-normalizer (an online logsumexp: a running max and a sum of
exponentials rescaled whenever the max grows). The torch path reads and writes the
[B, V] logits five or six times for the same results. Its rows are split into
chunks, each chunk's winner and (max, sum) found by its own program, and a second
small kernel combines a row's chunks."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanovllm.ops.sampling import _MIX_C1, _MIX_C2, _SALT_TOKEN

_MIX_C1_T = tl.constexpr(_MIX_C1)
_MIX_C2_T = tl.constexpr(_MIX_C2)
_SALT_TOKEN_T = tl.constexpr(_SALT_TOKEN)
BLOCK = 2048             # vocabulary entries a program loads at once


@triton.jit
def _mix32(x):
    """x: uint32 -> uint32; the bijection of ops/sampling.py's _mix32."""
    x = x ^ (x >> 16)
    x = x * _MIX_C1_T
    x = x ^ (x >> 15)
    x = x * _MIX_C2_T
    x = x ^ (x >> 15)
    return x


@triton.jit
def _log_exponential(key, tokens):
    """log E for each token of a block, E = -log u the row's Exponential(1) draw (ops/sampling.py)."""
    bits = _mix32(key ^ _mix32(tokens.to(tl.uint32) ^ _SALT_TOKEN_T))
    uniform = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    return tl.log(-tl.log(uniform))


@triton.jit
def _keep_best(race, start, best_score, best_token):
    """The running winner after one block of race values (the first index wins a tie, as in argmax)."""
    block_best = tl.max(race, axis=0)
    block_token = tl.argmax(race, axis=0).to(tl.int64) + start
    better = block_best > best_score
    return tl.where(better, block_best, best_score), tl.where(better, block_token, best_token)


@triton.jit
def _exponential_race_kernel(scores_ptr, keys_ptr, out_ptr, vocab_size, row_stride,
                             BLOCK: tl.constexpr):
    row = tl.program_id(0)
    key = tl.load(keys_ptr + row).to(tl.uint32)
    best_score = tl.full((), float("-inf"), tl.float32)
    best_token = tl.full((), 0, tl.int64)
    for start in range(0, vocab_size, BLOCK):
        tokens = start + tl.arange(0, BLOCK)
        in_vocab = tokens < vocab_size
        scores = tl.load(scores_ptr + row * row_stride + tokens, mask=in_vocab, other=float("-inf"))
        race = tl.where(in_vocab, scores - _log_exponential(key, tokens), float("-inf"))
        best_score, best_token = _keep_best(race, start, best_score, best_token)
    tl.store(out_ptr + row, best_token)


def exponential_race_triton(scores: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """scores [B, V] float32, keys [B] int64 -> token ids [B] int64 (see ops/sampling.py)."""
    num_rows, vocab_size = scores.shape
    scores = scores.contiguous()
    out = torch.empty(num_rows, dtype=torch.int64, device=scores.device)
    _exponential_race_kernel[(num_rows,)](scores, keys, out, vocab_size, scores.stride(0), BLOCK=BLOCK)
    return out


# The fused pass splits each row's vocabulary into chunks so that a small batch still fills the GPU
# (one program per row would leave a batch-1 step's 128k-token row to a single SM: ~180 us on an H200).
TARGET_PROGRAMS = 264    # about two programs per SM of an H100/H200
MAX_SPLITS = 64          # chunks per row at most (the combine kernel loads them in one block)


@triton.jit(do_not_specialize=["chunk_size", "num_splits"])
def _sample_from_logits_kernel(logits_ptr, keys_ptr, temperature_ptr, score_ptr, token_ptr, max_ptr, sum_ptr,
                               vocab_size, row_stride, chunk_size, num_splits,
                               GREEDY: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row, split): the winner and the online logsumexp of one chunk of one row."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    if not GREEDY:
        key = tl.load(keys_ptr + row).to(tl.uint32)
        temperature = tl.load(temperature_ptr + row)
    best_score = tl.full((), float("-inf"), tl.float32)
    best_token = tl.full((), 0, tl.int64)
    running_max = tl.full((), float("-inf"), tl.float32)
    running_sum = tl.full((), 0.0, tl.float32)
    chunk_start = split * chunk_size                      # chunk_size is a multiple of BLOCK
    chunk_end = tl.minimum(chunk_start + chunk_size, vocab_size)
    for start in range(chunk_start, chunk_end, BLOCK):
        tokens = start + tl.arange(0, BLOCK)
        in_vocab = tokens < vocab_size
        logits = tl.load(logits_ptr + row * row_stride + tokens, mask=in_vocab, other=float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logits, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(logits - new_max), axis=0)
        running_max = new_max
        if GREEDY:
            race = logits
        else:   # IEEE division, as torch's
            race = tl.where(in_vocab, tl.math.div_rn(logits, temperature) - _log_exponential(key, tokens),
                            float("-inf"))
        best_score, best_token = _keep_best(race, start, best_score, best_token)
    slot = row * num_splits + split
    tl.store(score_ptr + slot, best_score)
    tl.store(token_ptr + slot, best_token)
    tl.store(max_ptr + slot, running_max)
    tl.store(sum_ptr + slot, running_sum)


@triton.jit(do_not_specialize=["num_splits"])
def _combine_splits_kernel(score_ptr, token_ptr, max_ptr, sum_ptr, out_ptr, lse_ptr, num_splits,
                           MAX_SPLITS: tl.constexpr):
    """Program row: the row's winner over its chunks (the first chunk wins a tie, so the lowest token
    does, as in argmax) and its log-normalizer from the chunks' (max, sum of exponentials)."""
    row = tl.program_id(0)
    splits = tl.arange(0, MAX_SPLITS)
    valid = splits < num_splits
    slots = row * num_splits + splits
    scores = tl.load(score_ptr + slots, mask=valid, other=float("-inf"))
    tokens = tl.load(token_ptr + slots, mask=valid, other=0)
    winner = tl.argmax(scores, axis=0)
    tl.store(out_ptr + row, tl.sum(tl.where(splits == winner, tokens, 0), axis=0))
    maxes = tl.load(max_ptr + slots, mask=valid, other=float("-inf"))
    sums = tl.load(sum_ptr + slots, mask=valid, other=0.0)
    row_max = tl.max(maxes, axis=0)
    total = tl.sum(tl.where(valid, sums * tl.exp(maxes - row_max), 0.0), axis=0)
    tl.store(lse_ptr + row, row_max + tl.log(total))


def sample_from_logits_triton(logits: torch.Tensor, keys: torch.Tensor | None, temperature: torch.Tensor | None,
                              num_splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] float32 (finite), keys [B] int64 and temperature [B] float32, or both None for the
    argmax -> (token ids [B] int64, log-normalizer [B] float32); see ops/sampling.py.
    num_splits: chunks per row (default: enough for about TARGET_PROGRAMS programs in all)."""
    num_rows, vocab_size = logits.shape
    logits = logits.contiguous()
    num_blocks = triton.cdiv(vocab_size, BLOCK)
    if num_splits is None:
        num_splits = triton.cdiv(TARGET_PROGRAMS, num_rows)
    num_splits = max(1, min(num_splits, MAX_SPLITS, num_blocks))
    chunk_size = triton.cdiv(num_blocks, num_splits) * BLOCK
    num_splits = triton.cdiv(vocab_size, chunk_size)      # no empty chunk
    device = logits.device
    score = torch.empty(num_rows, num_splits, dtype=torch.float32, device=device)   # [B, S] each
    token = torch.empty(num_rows, num_splits, dtype=torch.int64, device=device)
    part_max = torch.empty(num_rows, num_splits, dtype=torch.float32, device=device)
    part_sum = torch.empty(num_rows, num_splits, dtype=torch.float32, device=device)
    greedy = keys is None
    _sample_from_logits_kernel[(num_rows, num_splits)](
        logits, token if greedy else keys, score if greedy else temperature, score, token, part_max, part_sum,
        vocab_size, logits.stride(0), chunk_size, num_splits, GREEDY=greedy, BLOCK=BLOCK)
    out = torch.empty(num_rows, dtype=torch.int64, device=device)
    lse = torch.empty(num_rows, dtype=torch.float32, device=device)
    _combine_splits_kernel[(num_rows,)](score, token, part_max, part_sum, out, lse, num_splits,
                                        MAX_SPLITS=MAX_SPLITS)
    return out, lse
