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


# The W4A16 GEMV multiplies x 2^(W4_EXP_X - 4 j') by code j of a word read as the subnormal float
# q 2^(4 j' - 149), j' = j % 5 (codes 5 to 7 from the word shifted down by 20): quant_linear_triton.py
W4_EXP_X = 88


def w4_plane_scales(device: torch.device | None = None) -> torch.Tensor:
    """[8] float32 on device: the power of two that code j's x is multiplied by, 2^(W4_EXP_X - 4 (j % 5)),
    made from its bits there (no copy from the host, which a CUDA graph being captured refuses)."""
    j = torch.arange(PACK_FACTOR, dtype=torch.int32, device=device)
    return ((127 + W4_EXP_X - 4 * (j % 5)) << 23).view(torch.float32)


class W4Rows(NamedTuple):
    """Activations laid out for the W4A16 GEMV by the kernel that computed them (an RMSNorm,
    SiLU-and-mul, the attention's merge), so that the GEMV neither shuffles nor scales x. planes [M, 9, K / 8] float32:
    planes[m, j, w] = x[m, 8 w + j] 2^(W4_EXP_X - 4 (j % 5)) for j < 8 (plane j holds the x values
    that code j of each word meets, contiguous along the words), and plane 8 each word's sum of x,
    ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7)), for its zero point; dtype, the rows' own (x is
    rounded to it first, and the product's output takes it)."""
    planes: torch.Tensor
    dtype: torch.dtype

    # as the rows' own (the kernels' wrappers size their outputs by them)
    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.planes.shape[0], PACK_FACTOR * self.planes.shape[2]))

    @property
    def device(self) -> torch.device:
        return self.planes.device

    def rows(self) -> torch.Tensor:
        """x [M, K] in dtype, exactly (the planes are x times powers of two)."""
        scales = w4_plane_scales(self.planes.device)[None, :, None]                        # [1, 8, 1]
        return (self.planes[:, :PACK_FACTOR] / scales).transpose(1, 2).reshape(self.shape).to(self.dtype)


def w4_word_sums(xf: torch.Tensor) -> torch.Tensor:
    """xf [M, K / 8, 8] float32 -> [M, K / 8]: each word's x summed in the W4A16 GEMV's order."""
    x = xf.unbind(-1)
    return ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7]))


def w4_rows_torch(x: torch.Tensor) -> W4Rows:
    """x [M, K] (K a multiple of 8) -> its W4Rows."""
    num_rows, features = x.shape
    xf = x.float().reshape(num_rows, features // PACK_FACTOR, PACK_FACTOR)                  # [M, K / 8, 8]
    planes = (xf * w4_plane_scales(x.device)).transpose(1, 2)                              # [M, 8, K / 8]
    return W4Rows(torch.cat([planes, w4_word_sums(xf)[:, None]], dim=1), x.dtype)          # [M, 9, K / 8]


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


def as_product_rows(out: torch.Tensor, fp8: bool, w4: bool) -> torch.Tensor | Fp8Rows | W4Rows:
    """The rows a kernel computed, as the product after it asked for them (the torch references of
    the kernels that write Fp8Rows and W4Rows themselves on the GPU)."""
    return quantize_fp8_rows_torch(out) if fp8 else w4_rows_torch(out) if w4 else out
