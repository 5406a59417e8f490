"""The grammar's token mask: -inf on the logits of tokens a constrained row may not take.

A grammar matcher (nanovllm/structured) answers "which tokens may come next?"
with a bitmask, 32 tokens to an int32 word: token v is allowed when bit
v % 32 of word v // 32 is set. Only the constrained rows of a batch carry one,

    bitmask [R, ceil(V / 32)] int32      rows [R] int64 (which rows of the logits)

so a batch in which few rows are constrained touches only those rows; the others
pay nothing. The mask may be narrower than the logits (ceil(V' / 32) words for the
tokenizer's V' tokens when the LM head is padded wider): a token past its last word is
never allowed. The kernel (bitmask_triton.py) reads each word once per 32 logits.
"""
from __future__ import annotations

import torch

from nanovllm.ops import use_triton


def apply_token_bitmask_torch(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """logits [B, V] (in place): -inf where rows' bitmask [R, W <= ceil(V/32)] int32 has a 0 bit, and
    past its 32 * W tokens."""
    vocab_size, words = logits.shape[1], -(-logits.shape[1] // 32)
    bits = torch.tensor([1 << i for i in range(31)] + [-(1 << 31)], dtype=torch.int32, device=bitmask.device)
    padded = torch.nn.functional.pad(bitmask, (0, words - bitmask.shape[1]))                   # [R, ceil(V/32)]
    disallowed = ((padded[:, :, None] & bits) == 0).flatten(1)[:, :vocab_size]               # [R, V]
    logits[rows] = logits[rows].masked_fill_(disallowed, float("-inf"))


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    if bitmask.shape[0] != rows.shape[0] or bitmask.shape[1] > -(-logits.shape[1] // 32):
        raise ValueError(f"a bitmask of shape {tuple(bitmask.shape)} cannot mask {rows.shape[0]} rows of "
                         f"{logits.shape[1]} logits; it needs one row of at most ceil(V / 32) words per masked row")
    if use_triton(logits):
        from nanovllm.ops.bitmask_triton import apply_token_bitmask_triton
        apply_token_bitmask_triton(logits, bitmask, rows)
        return
    apply_token_bitmask_torch(logits, bitmask, rows)
