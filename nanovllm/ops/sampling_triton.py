"""Triton version of ops/sampling.py's exponential race: one program per row streams
the vocabulary once, hashing each token's uniform number in registers (the same
32-bit mixer as the torch reference, in uint32 arithmetic that wraps mod 2**32)
and keeping the running winner of scores - log(-log u)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanovllm.ops.sampling import _MIX_C1, _MIX_C2, _SALT_TOKEN

_MIX_C1_T = tl.constexpr(_MIX_C1)
_MIX_C2_T = tl.constexpr(_MIX_C2)
_SALT_TOKEN_T = tl.constexpr(_SALT_TOKEN)


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
        bits = _mix32(key ^ _mix32(tokens.to(tl.uint32) ^ _SALT_TOKEN_T))
        uniform = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        race = scores - tl.log(-tl.log(uniform))
        race = tl.where(in_vocab, race, float("-inf"))
        block_best = tl.max(race, axis=0)
        block_token = tl.argmax(race, axis=0).to(tl.int64) + start
        better = block_best > best_score
        best_token = tl.where(better, block_token, best_token)
        best_score = tl.where(better, block_best, best_score)
    tl.store(out_ptr + row, best_token)


def exponential_race_triton(scores: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """scores [B, V] float32, keys [B] int64 -> token ids [B] int64 (see ops/sampling.py)."""
    num_rows, vocab_size = scores.shape
    scores = scores.contiguous()
    out = torch.empty(num_rows, dtype=torch.int64, device=scores.device)
    _exponential_race_kernel[(num_rows,)](scores, keys, out, vocab_size, scores.stride(0), BLOCK=2048)
    return out
