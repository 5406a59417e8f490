"""The stored formats of quantized weights, shared by the torch references (quant_linear.py) and the
Triton kernels (quant_linear_triton.py), which both import from here.

FP8 is e4m3fn with float32 scales; W4A16 packs eight 4-bit codes into each int32 along K, with a
scale and a zero point per group of K.
"""
from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0                    # the largest finite e4m3fn value
FP8_MIN_SCALE = 1e-12 / FP8_MAX    # keeps an all-zero row's scale positive (vLLM's floor)
# Up to this many rows an FP8 product is weight-only (W8A16): the activations are not quantized
FP8_WEIGHT_ONLY_MAX_ROWS = 1
PACK_FACTOR = 8                    # 4-bit codes per int32


def w4a16_block_k(group_size: int) -> int:
    """The largest power of two up to 128 that divides the group (0: none of at least 16, tl.dot's minimum)."""
    block = 128
    while block >= 16 and group_size % block:
        block //= 2
    return block if block >= 16 else 0
