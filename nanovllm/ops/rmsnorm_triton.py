"""RMSNorm and fused residual-add + RMSNorm in Triton: one program per row.

A row of H values is read once, its mean square reduced in fp32, and the row written
once; the fused form also writes the new residual (x + residual) in the same pass,
and takes x as one row or as S float32 partial sums of it (a product split along K,
ops/linear.py), which it adds as it loads them.
Rounding follows `rms_norm_torch` step by step (normalize in fp32, round to the input
dtype, then multiply by the weight), so both backends agree to the last bit in
float32 and within one rounding in half precision.
With fp8=True a norm writes its rows as e4m3 codes and a scale a row (`Fp8Rows`) for the FP8
W8A8 product after it, the codes `quantize_fp8_per_token` would give of its 16-bit output
(ops/fp8_rows_triton.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanovllm.ops import pdl_between
from nanovllm.ops.fp8_rows_triton import TL_DTYPES, empty_rows, store_row
from nanovllm.ops.quant_format import Fp8Rows


@triton.jit
def _rms_norm_kernel(x_ptr, weight_ptr, out_ptr, scale_ptr, eps, inner, stride_x0, stride_x1,
                     HIDDEN: tl.constexpr, BLOCK_H: tl.constexpr, ROUND_TO: tl.constexpr,
                     FP8_OUT: tl.constexpr = False, PDL: tl.constexpr = False, WAIT: tl.constexpr = False):
    if PDL:     # a GEMV launched with PDL after this kernel may start now (ops/__init__.py)
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0)
    x_row = (row // inner).to(tl.int64) * stride_x0 + (row % inner) * stride_x1
    offs = tl.arange(0, BLOCK_H)
    mask = offs < HIDDEN
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)   # in flight with x's load
    if WAIT:    # launched early (PDL_BETWEEN): the kernel before has written x once this returns
        tl.extra.cuda.gdc_wait()
    x = tl.load(x_ptr + x_row + offs, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / HIDDEN + eps)
    normed = (xf * rstd).to(x.dtype).to(tl.float32)
    store_row(normed * w, out_ptr, scale_ptr, row.to(tl.int64), offs, mask, HIDDEN, FP8_OUT, ROUND_TO)


@triton.jit
def _add_rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, scale_ptr, residual_out_ptr, eps,
                         stride_xs, stride_x, stride_r, NUM_PARTIALS: tl.constexpr,
                         HIDDEN: tl.constexpr, BLOCK_H: tl.constexpr, ROUND_TO: tl.constexpr,
                         FP8_OUT: tl.constexpr = False, PDL: tl.constexpr = False, WAIT: tl.constexpr = False):
    if PDL:     # a GEMV launched with PDL after this kernel may start now (ops/__init__.py)
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    mask = offs < HIDDEN
    # Every load first: the weight loaded after the reduction would cost a second trip to memory,
    # a visible share of this kernel's ~2 us at batch 1.
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if WAIT:    # launched early (PDL_BETWEEN): the kernels before have written x and the residual
        tl.extra.cuda.gdc_wait()
    r = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0)
    xf = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    for s in tl.static_range(1, NUM_PARTIALS):     # unrolled: every partial's load in flight at once
        xf += tl.load(x_ptr + s * stride_xs + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    summed = (xf + r.to(tl.float32)).to(residual_out_ptr.dtype.element_ty)
    tl.store(residual_out_ptr + row * HIDDEN + offs, summed, mask=mask)
    sf = summed.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(sf * sf, axis=0) / HIDDEN + eps)
    normed = (sf * rstd).to(summed.dtype).to(tl.float32)
    store_row(normed * w, out_ptr, scale_ptr, row, offs, mask, HIDDEN, FP8_OUT, ROUND_TO)


def _num_warps(block: int) -> int:
    return min(16, max(1, block // 256))


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, fp8: bool = False) -> torch.Tensor | Fp8Rows:
    """x: [..., H], weight: [H] -> [..., H]; x may be a strided view (e.g. q heads of a fused qkv).
    fp8 (x [T, H]): the rows as Fp8Rows instead."""
    hidden = x.shape[-1]
    dtype = torch.promote_types(x.dtype, weight.dtype)
    out, out_arg, scale_arg = empty_rows(x.shape, dtype, x.device, fp8)
    if x.numel() == 0:
        return out
    if x.dim() > 3 or x.stride(-1) != 1:
        x = x.reshape(-1, hidden).contiguous()
    if x.dim() == 3:      # [T, heads, D]: rows are (token, head) pairs
        inner, stride_x0, stride_x1 = x.shape[1], x.stride(0), x.stride(1)
    else:
        x = x.reshape(-1, hidden)
        inner, stride_x0, stride_x1 = 1, x.stride(0), 0
    block_h = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(out_arg.numel() // hidden,)](x, weight, out_arg, scale_arg, eps, inner,
                                                  stride_x0, stride_x1, HIDDEN=hidden, BLOCK_H=block_h,
                                                  ROUND_TO=TL_DTYPES[dtype], FP8_OUT=fp8,
                                                  **pdl_between(x, "norm"),
                                                  num_warps=_num_warps(block_h))
    return out


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                        fp8: bool = False) -> tuple[torch.Tensor | Fp8Rows, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual); x, residual: [T, H]. x may also be
    float32 partial sums [S, T, H]: then x + residual is their sum plus residual, in residual's dtype.
    fp8: the normalized rows as Fp8Rows."""
    partials = x if x.dim() == 3 else x[None]                         # [S, T, H]
    num_tokens, hidden = residual.shape
    res_dtype = residual.dtype if x.dim() == 3 else torch.promote_types(x.dtype, residual.dtype)
    residual_out = torch.empty((num_tokens, hidden), dtype=res_dtype, device=x.device)
    dtype = torch.promote_types(res_dtype, weight.dtype)
    out, out_arg, scale_arg = empty_rows((num_tokens, hidden), dtype, x.device, fp8)
    if num_tokens == 0:
        return out, residual_out
    if partials.stride(2) != 1:
        partials = partials.contiguous()
    if residual.stride(1) != 1:
        residual = residual.contiguous()
    block_h = triton.next_power_of_2(hidden)
    _add_rms_norm_kernel[(num_tokens,)](partials, residual, weight, out_arg, scale_arg, residual_out, eps,
                                        partials.stride(0), partials.stride(1), residual.stride(0),
                                        NUM_PARTIALS=partials.shape[0], HIDDEN=hidden,
                                        BLOCK_H=block_h, ROUND_TO=TL_DTYPES[dtype], FP8_OUT=fp8,
                                        **pdl_between(x, "norm"), num_warps=_num_warps(block_h))
    return out, residual_out
