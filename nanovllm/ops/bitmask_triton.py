"""Triton version of ops/bitmask.py: one program per (masked row, block of the vocabulary)
loads the block's logits and its BLOCK / 32 bitmask words, and writes -inf where a bit is 0 (or
past the mask's last word). Rows that carry no bitmask are never visited."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096   # vocabulary entries per program: 128 bitmask words


@triton.jit
def _apply_token_bitmask_kernel(logits_ptr, bitmask_ptr, rows_ptr, vocab_size, bitmask_width, logits_stride,
                                bitmask_stride, BLOCK: tl.constexpr):
    masked_row = tl.program_id(0).to(tl.int64)
    tokens = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)                       # [BLOCK]
    in_vocab = tokens < vocab_size
    row = tl.load(rows_ptr + masked_row)
    words = tl.load(bitmask_ptr + masked_row * bitmask_stride + tokens // 32,
                    mask=in_vocab & (tokens // 32 < bitmask_width), other=0)
    allowed = ((words >> (tokens % 32)) & 1) != 0
    tl.store(logits_ptr + row * logits_stride + tokens, float("-inf"), mask=in_vocab & ~allowed)


def apply_token_bitmask_triton(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """logits [B, V] (in place, rows contiguous), bitmask [R, W <= ceil(V/32)] int32, rows [R] int64."""
    num_masked, vocab_size = rows.shape[0], logits.shape[1]
    if num_masked == 0:
        return
    if logits.stride(1) != 1 or bitmask.stride(1) != 1:
        raise ValueError("apply_token_bitmask_triton needs logits and bitmask rows that are contiguous")
    grid = (num_masked, triton.cdiv(vocab_size, BLOCK))
    _apply_token_bitmask_kernel[grid](logits, bitmask, rows, vocab_size, bitmask.shape[1], logits.stride(0),
                                      bitmask.stride(0), BLOCK=BLOCK)
