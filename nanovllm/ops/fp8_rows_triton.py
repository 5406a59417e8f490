"""Activations quantized per row to FP8 (e4m3) in Triton, for the W8A8 product after them.

An FP8 W8A8 product multiplies e4m3 codes of x, one float32 scale a row (amax / 448). The kernel
that computes x may as well write those codes: it holds the whole row in registers, so its amax
costs a reduction, and the product then needs no quantization kernel of its own (one launch and
one read and write of x fewer for each). The RMSNorms and SiLU-and-mul do this when the layer
after them asks for `Fp8Rows` (model/llama.py); `quantize_fp8_rows_triton` quantizes rows that
some other kernel wrote (o_proj's, from the attention). All of them round as `quantize_fp8_per_token_torch`:
the row as its 16-bit output would hold it, divided by its scale, clamped to +-448.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanovllm.ops.quant_format import FP8_DTYPE, FP8_MAX, FP8_MIN_SCALE, Fp8Rows

FP8_MAX_C = tl.constexpr(FP8_MAX)
FP8_MIN_SCALE_C = tl.constexpr(FP8_MIN_SCALE)

# tl's dtype of each torch dtype a row may be rounded to before it is quantized
TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def fp8_row_scale(amax):
    """A row's scale from the largest magnitude in it (FP8_MIN_SCALE keeps a zero row's positive)."""
    return tl.maximum(amax / FP8_MAX_C, FP8_MIN_SCALE_C)


@triton.jit
def fp8_codes(y, scale, code_dtype: tl.constexpr):
    """y [..] float32 over its row's scale, clamped to e4m3's range, as codes of code_dtype."""
    return tl.minimum(tl.maximum(y / scale, -FP8_MAX_C), FP8_MAX_C).to(code_dtype)


@triton.jit
def store_row(y, out_ptr, scale_ptr, row, offs, mask, FEATURES: tl.constexpr, FP8_OUT: tl.constexpr,
              ROUND_TO: tl.constexpr):
    """Write y [BLOCK] (float32; lanes outside mask are 0), the values offs of row `row`, whose
    FEATURES values make up the whole row: rounded to ROUND_TO, the dtype the row has unquantized,
    then as it is (out_ptr of that dtype, rows of FEATURES) or, with FP8_OUT, as e4m3 codes at out_ptr
    and the row's scale at scale_ptr + row (y must then be the whole row)."""
    y = y.to(ROUND_TO)
    if FP8_OUT:
        yf = y.to(tl.float32)
        scale = fp8_row_scale(tl.max(tl.abs(yf), axis=0))
        tl.store(scale_ptr + row, scale)
        tl.store(out_ptr + row * FEATURES + offs, fp8_codes(yf, scale, out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + row * FEATURES + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def empty_fp8_rows(num_rows: int, features: int, dtype: torch.dtype, device: torch.device) -> Fp8Rows:
    """Fp8Rows to be written: codes [M, K] e4m3, scale [M] float32, for rows of dtype."""
    return Fp8Rows(torch.empty(num_rows, features, dtype=FP8_DTYPE, device=device),
                   torch.empty(num_rows, dtype=torch.float32, device=device), dtype)


def empty_rows(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
               fp8: bool) -> tuple[torch.Tensor | Fp8Rows, torch.Tensor, torch.Tensor]:
    """The output of a kernel that writes rows of dtype (store_row): a tensor of shape, or with fp8
    its Fp8Rows (shape [T, K]); and the two pointers the kernel takes for it, out_ptr and scale_ptr
    (out_ptr again where no scale is written)."""
    if not fp8:
        out = torch.empty(shape, dtype=dtype, device=device)
        return out, out, out
    if len(shape) != 2:
        raise ValueError(f"fp8 rows are [T, K]; got a {tuple(shape)} output")
    rows = empty_fp8_rows(*shape, dtype, device)
    return rows, rows.codes, rows.scale


@triton.jit
def _quantize_fp8_rows_kernel(x_ptr, xq_ptr, scale_ptr, stride_x, K, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + row * stride_x + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = fp8_row_scale(tl.max(amax, axis=0))
    tl.store(scale_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + row * stride_x + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        tl.store(xq_ptr + row * K + k0 + offs, fp8_codes(x, scale, xq_ptr.dtype.element_ty), mask=k0 + offs < K)


def quantize_fp8_rows_triton(x: torch.Tensor) -> Fp8Rows:
    """x [M, K] -> its Fp8Rows, as quantize_fp8_rows_torch."""
    num_rows, in_features = x.shape
    rows = empty_fp8_rows(num_rows, in_features, x.dtype, x.device)
    if num_rows:
        if x.stride(-1) != 1:
            x = x.contiguous()
        block = min(2048, triton.next_power_of_2(in_features))
        _quantize_fp8_rows_kernel[(num_rows,)](x, rows.codes, rows.scale, x.stride(0), in_features, BLOCK_K=block,
                                               num_warps=4)
    return rows
