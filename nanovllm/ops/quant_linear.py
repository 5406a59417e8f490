"""Matmuls with quantized weights, as checkpoints store them: FP8 W8A8, 4-bit W4A16 and 8-bit W8A16.

A decode step reads every weight once, so its time is the weight bytes over the memory
bandwidth. Storing a weight in 8 or 4 bits reads a half or a quarter of bfloat16's bytes.

- **FP8 W8A8** (float8 e4m3, as `compressed-tensors` FP8-dynamic checkpoints and vLLM's
  online `fp8` store it): weight [N, K] e4m3 with one float32 scale per output channel;
  each row of the activations is quantized on the fly to e4m3 with its own scale
  (amax / 448, 448 being e4m3's largest value). The product of the two fp8 matrices is
  accumulated in float32 and scaled by scale_x[m] * scale_w[n] afterwards:
  out[m, n] = scale_x[m] * scale_w[n] * sum_k xq[m, k] * wq[n, k].
  A product of one row (FP8_WEIGHT_ONLY_MAX_ROWS: a decode step of one sequence) is
  weight-only instead (W8A16): out[n] = scale_w[n] * sum_k x[k] * wq[n, k], x unrounded. It
  reads the same weight bytes, needs no quantization of x (on the GPU: no kernel launch before
  each product, which at one row reads the weight in a few microseconds), and loses less: the
  e4m3 rounding of the activations is most of FP8's error (docs/reference/quantization.md).
- **W4A16** (`compressed-tensors` pack-quantized, GPTQ and AWQ all end here after loading):
  codes q in 0..15, eight to an int32 along K (code k of a row in bits 4 (k % 8) .. of
  word k // 8, the low nibble first), with a scale and an integer zero point per group of
  `group_size` weights along K: w[n, k] = (q[n, k] - zero[n, g]) * scale[n, g], g = k // group_size.
  A symmetric checkpoint has zero 8 (as has GGUF's Q4_0). The activations stay in 16 bits.
  GGUF's Q4_1 and Q4_K blocks (w = d * q - m) need a float offset instead of an integer zero point: with
  `zeros` float32 the weight is w[n, k] = q[n, k] * scale[n, g] - offset[n, g] (the format follows
  from zeros' dtype).
- **W8A16** (GGUF's 8-, 6-, 5-, 3- and 2-bit blocks after loading, model/quantization/gguf.py): int8
  codes [N, K] with a float32 scale per group of `group_size` along K (Q8_0: 32, Q6_K: 16), and optionally a
  float32 offset per group: w[n, k] = q[n, k] * scale[n, g] - offset[n, g].

Each function here is the torch reference (the CPU path, and the oracle of the Triton
kernels in quant_linear_triton.py, which take the same arguments); `fp8_linear`,
`w4a16_linear` and `w8a16_linear` pick the kernel by the device of their input. `*_linear_or_partials` may
instead return float32 partial products [S, M, N] over slices of K (the kernels split K at a
few rows), for a consumer that adds them up (ops/linear.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nanovllm.ops import use_triton
from nanovllm.ops.activation import silu_and_mul
from nanovllm.ops.quant_format import (FP8_DTYPE, FP8_WEIGHT_ONLY_MAX_ROWS, PACK_FACTOR, Fp8Rows,  # noqa: F401
                                       quantize_fp8_per_token_torch, quantize_fp8_rows_torch, w4a16_block_k)



# ---- FP8 -------------------------------------------------------------------------------------

# The kernel that writes an FP8 W8A8 product's input (RMSNorm, SiLU-and-mul) quantizes it too, when
# the layer asks for Fp8Rows (takes_fp8_rows): one kernel launch and one pass over x fewer a product.
FP8_ROWS_FROM_PRODUCER = True


def takes_fp8_rows(layer, num_rows: int) -> bool:
    """Whether `layer` at num_rows rows would quantize its input per row (an Fp8Linear's W8A8 product),
    so that the kernel before it should hand it Fp8Rows instead of 16-bit rows."""
    wants = getattr(layer, "takes_fp8_rows", None)
    return FP8_ROWS_FROM_PRODUCER and wants is not None and wants(num_rows)


def quantize_fp8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] float -> (wq [N, K] float8_e4m3fn, scale [N] float32): the online `fp8` format."""
    return quantize_fp8_per_token_torch(weight)


def fp8_linear_torch(x: torch.Tensor | Fp8Rows, weight: torch.Tensor, weight_scale: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (16 or 32 bits), weight [N, K] float8_e4m3fn, weight_scale [N] float32,
    bias [N] or None -> [M, N] in x's dtype. x is quantized per row to e4m3 first (W8A8), except
    at up to FP8_WEIGHT_ONLY_MAX_ROWS rows (a decode step of one sequence), where the weight
    multiplies x as it is (W8A16, fp8_weight_only_linear_torch). x may come quantized (Fp8Rows)."""
    if isinstance(x, Fp8Rows):
        return fp8_rows_linear_torch(x, weight, weight_scale, bias)
    if x.shape[0] <= FP8_WEIGHT_ONLY_MAX_ROWS:
        return fp8_weight_only_linear_torch(x, weight, weight_scale, bias)
    return fp8_w8a8_linear_torch(x, weight, weight_scale, bias)


def fp8_w8a8_linear_torch(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """As fp8_linear_torch at any number of rows: x quantized per row to e4m3 (W8A8)."""
    return fp8_rows_linear_torch(quantize_fp8_rows_torch(x), weight, weight_scale, bias)


def fp8_rows_linear_torch(rows: Fp8Rows, weight: torch.Tensor, weight_scale: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """The W8A8 product of rows already quantized: [M, N] in the rows' dtype."""
    out = rows.codes.float() @ weight.float().T * rows.scale[:, None] * weight_scale.float()[None, :]   # [M, N]
    if bias is not None:
        out = out + bias.float()
    return out.to(rows.dtype)


def fp8_weight_only_linear_torch(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """As fp8_linear_torch, but x is not quantized: out = x @ (e4m3 weight * scale)^T in float32."""
    out = x.float() @ weight.float().T * weight_scale.float()[None, :]                      # [M, N]
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def _rows_data(x: torch.Tensor | Fp8Rows) -> torch.Tensor:
    """The tensor whose device picks the kernel: x, or an Fp8Rows' codes."""
    return x.codes if isinstance(x, Fp8Rows) else x


def fp8_linear(x: torch.Tensor | Fp8Rows, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    if use_triton(_rows_data(x)):
        from nanovllm.ops.quant_linear_triton import fp8_linear_triton
        return fp8_linear_triton(x, weight, weight_scale, bias)
    return fp8_linear_torch(x, weight, weight_scale, bias)


def fp8_linear_or_partials(x: torch.Tensor | Fp8Rows, weight: torch.Tensor, weight_scale: torch.Tensor,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp8_linear [M, N], or on the GPU at a few rows its float32 partials [S, M, N]."""
    if use_triton(_rows_data(x)):
        from nanovllm.ops.quant_linear_triton import fp8_linear_partials_triton
        return fp8_linear_partials_triton(x, weight, weight_scale, bias)
    return fp8_linear_torch(x, weight, weight_scale, bias)


def fp8_linear_silu_and_mul(x: torch.Tensor | Fp8Rows, weight: torch.Tensor, weight_scale: torch.Tensor,
                            bias: torch.Tensor | None = None, fp8: bool = False) -> torch.Tensor | Fp8Rows:
    """silu_and_mul(fp8_linear(x, ...), fp8) for gate_up_proj's [gate | up] weight: [M, 2 I] -> [M, I];
    on the GPU at one row in one kernel (quant_linear_triton.py)."""
    if use_triton(_rows_data(x)):
        from nanovllm.ops.quant_linear_triton import fp8_linear_silu_and_mul_triton
        return fp8_linear_silu_and_mul_triton(x, weight, weight_scale, bias, fp8)
    return silu_and_mul(fp8_linear_torch(x, weight, weight_scale, bias), fp8)


# ---- W4A16 -----------------------------------------------------------------------------------

def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] integers in 0..15 (K a multiple of 8) -> [N, K / 8] int32, code k in bits 4 (k % 8)."""
    num_rows, in_features = codes.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=codes.device)                # [8]
    words = (codes.to(torch.int64).view(num_rows, in_features // PACK_FACTOR, PACK_FACTOR) << shifts).sum(-1)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)   # the same 32 bits, signed


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[N, K / 8] int32 -> codes [N, K] uint8 in 0..15 (the inverse of pack_int4)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)               # [8]
    codes = (packed[..., None] >> shifts) & 0xF                                             # [N, K / 8, 8]
    return codes.reshape(packed.shape[0], -1).to(torch.uint8)


def dequantize_w4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """qweight [N, K / 8] int32, scales [N, G], zeros [N, G] uint8 (zero points) or float32
    (offsets) -> w [N, K] float32."""
    codes = unpack_int4(qweight).float()                                                    # [N, K]
    group_size = codes.shape[1] // scales.shape[1]
    zero = zeros.float().repeat_interleave(group_size, dim=1)                               # [N, K]
    scale = scales.float().repeat_interleave(group_size, dim=1)                             # [N, K]
    if zeros.is_floating_point():
        return codes * scale - zero
    return (codes - zero) * scale


def w4a16_linear_torch(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K], qweight [N, K / 8] int32, scales [N, K / group] float32, zeros [N, K / group]
    uint8 (or float32 offsets), bias [N] or None -> [M, N] in x's dtype. The weight is rounded to x's dtype once dequantized,
    as the tensor-core kernel's product needs (the GPU's few-row kernel multiplies it in float32, as
    this does given float32 x); the products add up in float32."""
    weight = dequantize_w4(qweight, scales, zeros).to(x.dtype)                              # [N, K]
    out = F.linear(x.float(), weight.float())                                               # [M, N]
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def _w4a16_tiles_fit(x: torch.Tensor, scales: torch.Tensor) -> bool:
    """Whether the Triton kernels take this weight: its group splits into tiles of at least 16 along K
    (a group of an odd size, one group a row with K not a multiple of 16, stays on the reference)."""
    return w4a16_block_k(x.shape[-1] // scales.shape[-1]) > 0


def w4a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    if use_triton(x) and _w4a16_tiles_fit(x, scales):
        from nanovllm.ops.quant_linear_triton import w4a16_linear_triton
        return w4a16_linear_triton(x, qweight, scales, zeros, bias)
    return w4a16_linear_torch(x, qweight, scales, zeros, bias)


def w4a16_linear_or_partials(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                             zeros: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """w4a16_linear [M, N], or on the GPU at a few rows its float32 partials [S, M, N]."""
    if use_triton(x) and _w4a16_tiles_fit(x, scales):
        from nanovllm.ops.quant_linear_triton import w4a16_linear_partials_triton
        return w4a16_linear_partials_triton(x, qweight, scales, zeros, bias)
    return w4a16_linear_torch(x, qweight, scales, zeros, bias)


def w4a16_linear_silu_and_mul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                              zeros: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """silu_and_mul(w4a16_linear(x, ...)) for gate_up_proj's [gate | up] weight in one kernel: [1, I] on
    the GPU where the one-row GEMV takes x and the layer unsplit (quant_linear_triton.py); else None."""
    if not (use_triton(x) and _w4a16_tiles_fit(x, scales)):
        return None
    from nanovllm.ops.quant_linear_triton import w4a16_linear_silu_and_mul_triton
    return w4a16_linear_silu_and_mul_triton(x, qweight, scales, zeros, bias)


# ---- W8A16 -----------------------------------------------------------------------------------

def dequantize_w8(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """qweight [N, K] int8, scales [N, G] float32, offsets [N, G] float32 or None -> w [N, K] float32."""
    group_size = qweight.shape[1] // scales.shape[1]
    weight = qweight.float() * scales.float().repeat_interleave(group_size, dim=1)          # [N, K]
    if offsets is not None:
        weight = weight - offsets.float().repeat_interleave(group_size, dim=1)
    return weight


def w8a16_linear_torch(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                       offsets: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K], qweight [N, K] int8, scales [N, K / group] float32, offsets as scales or None,
    bias [N] or None -> [M, N] in x's dtype. As w4a16_linear_torch: the weight is rounded to x's
    dtype once dequantized, and the products add up in float32."""
    weight = dequantize_w8(qweight, scales, offsets).to(x.dtype)                            # [N, K]
    out = F.linear(x.float(), weight.float())                                               # [M, N]
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def w8a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 offsets: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    if use_triton(x):
        from nanovllm.ops.quant_linear_triton import w8a16_linear_triton
        return w8a16_linear_triton(x, qweight, scales, offsets, bias)
    return w8a16_linear_torch(x, qweight, scales, offsets, bias)


def w8a16_linear_or_partials(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                             offsets: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """w8a16_linear [M, N], or on the GPU at a few rows its float32 partials [S, M, N]."""
    if use_triton(x):
        from nanovllm.ops.quant_linear_triton import w8a16_linear_partials_triton
        return w8a16_linear_partials_triton(x, qweight, scales, offsets, bias)
    return w8a16_linear_torch(x, qweight, scales, offsets, bias)
