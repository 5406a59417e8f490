"""SiLU-and-mul in Triton: reads [gate | up] once, writes silu(gate) * up once.

Rounding follows `silu_and_mul_torch`: silu in fp32 rounded to the input dtype,
then the product rounded again. With fp8=True the rows are written as e4m3 codes and a scale a
row (`Fp8Rows`, ops/fp8_rows_triton.py) for down_proj's FP8 product: one program then holds a
whole row, for its amax. With w4=True they are written as the W4A16 GEMV reads them (`W4Rows`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanovllm.ops import use_pdl
from nanovllm.ops.fp8_rows_triton import empty_rows, quantize_fp8_rows_triton, store_row
from nanovllm.ops.quant_format import Fp8Rows, W4Rows

FP8_MAX_FEATURES = 16384     # the widest row one program quantizes (16 warps, 32 values of gate and up a thread)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, scale_ptr, stride_x, INTERMEDIATE: tl.constexpr, BLOCK: tl.constexpr,
                         FP8_OUT: tl.constexpr = False, W4_OUT: tl.constexpr = False, PDL: tl.constexpr = False):
    if PDL:     # a GEMV launched with PDL after this kernel may start now (ops/__init__.py)
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < INTERMEDIATE
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + INTERMEDIATE + offs, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    # (with FP8_OUT the grid is one program a row: BLOCK covers it)
    store_row(silu * up.to(tl.float32), out_ptr, scale_ptr, row, offs, mask, INTERMEDIATE, FP8_OUT, gate.dtype,
              W4_OUT)


def silu_and_mul_triton(x: torch.Tensor, fp8: bool = False, w4: bool = False) -> torch.Tensor | Fp8Rows | W4Rows:
    """x: [T, 2 * I] -> [T, I]; fp8 (x [T, 2 I]): as Fp8Rows; w4: as W4Rows."""
    intermediate = x.shape[-1] // 2
    if fp8 and intermediate > FP8_MAX_FEATURES and x.dim() == 2:
        return quantize_fp8_rows_triton(silu_and_mul_triton(x))      # wider rows: two kernels
    out, out_arg, scale_arg = empty_rows((*x.shape[:-1], intermediate), x.dtype, x.device, fp8, w4)   # [T, I]
    if out_arg.numel() == 0:
        return out
    if x.stride(-1) != 1:
        x = x.contiguous()
    x = x.reshape(-1, 2 * intermediate)
    block = triton.next_power_of_2(intermediate) if fp8 else min(1024, triton.next_power_of_2(intermediate))
    grid = (x.shape[0], triton.cdiv(intermediate, block))
    _silu_and_mul_kernel[grid](x, out_arg, scale_arg, x.stride(0), INTERMEDIATE=intermediate,
                               BLOCK=block, FP8_OUT=fp8, W4_OUT=w4, PDL=use_pdl(x),
                               num_warps=min(16, max(1, block // 256)))
    return out
