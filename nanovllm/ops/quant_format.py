"""The stored formats of quantized weights, shared by the torch references (quant_linear.py) and the
Triton kernels (quant_linear_triton.py), which both import from here.

FP8 is e4m3fn with float32 scales (the activations' one a row: `quantize_fp8_per_token_torch`);
W4A16 packs eight 4-bit codes into each int32 along K, with a scale and a zero point per group of K.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0                    # the largest finite e4m3fn value
FP8_MIN_SCALE = 1e-12 / FP8_MAX    # keeps an all-zero row's scale positive (vLLM's floor)
# Up to this many rows an FP8 product is weight-only (W8A16): the activations are not quantized
FP8_WEIGHT_ONLY_MAX_ROWS = 1
PACK_FACTOR = 8                    # 4-bit codes per int32


class Fp8Rows(NamedTuple):
    """Activations already quantized per row for an FP8 W8A8 product, by the kernel that computed
    them (an RMSNorm, SiLU-and-mul), so that the product needs no quantization kernel of its own:
    codes [M, K] float8_e4m3fn, scale [M] float32 (x ~ codes * scale[:, None]), and dtype, the
    dtype x had and the product's output takes."""
    codes: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    # as the unquantized rows' (the kernels' wrappers size their outputs by them)
    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def device(self) -> torch.device:
        return self.codes.device


def quantize_fp8_per_token_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (xq [M, K] float8_e4m3fn, scale [M] float32), x ~ xq * scale[:, None]."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1) / FP8_MAX).clamp(min=FP8_MIN_SCALE)                   # [M]
    xq = (xf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)                     # [M, K]
    return xq, scale


def quantize_fp8_rows_torch(x: torch.Tensor) -> Fp8Rows:
    """x [M, K] -> its rows quantized for an FP8 W8A8 product (quantize_fp8_per_token_torch)."""
    return Fp8Rows(*quantize_fp8_per_token_torch(x), x.dtype)


def power_of_two_dividing(n: int, at_most: int) -> int:
    """The largest power of two up to `at_most` (a power of two) that divides n."""
    power = at_most
    while n % power:
        power //= 2
    return power


def step_holds_groups(step: int, group_size: int) -> bool:
    """Whether a K step of a grouped layout holds whole groups or lies inside one."""
    return step % group_size == 0 or group_size % step == 0


def w4a16_block_k(group_size: int) -> int:
    """The largest power of two up to 128 that divides the group (0: none of at least 16, tl.dot's minimum)."""
    block = power_of_two_dividing(group_size, 128)
    return block if block >= 16 else 0


def as_product_rows(out: torch.Tensor, fp8: bool) -> torch.Tensor | Fp8Rows:
    """The rows a kernel computed, as the product after it asked for them (the torch references of
    the kernels that write Fp8Rows themselves on the GPU)."""
    return quantize_fp8_rows_torch(out) if fp8 else out
