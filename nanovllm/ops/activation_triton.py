"""SiLU-and-mul in Triton: reads [gate | up] once, writes silu(gate) * up once.

Rounding follows `silu_and_mul_torch`: silu in fp32 rounded to the input dtype,
then the product rounded again. With fp8=True the rows are written as e4m3 codes and a scale a
row (`Fp8Rows`, ops/fp8_rows_triton.py) for down_proj's FP8 product: one program then holds a
whole row, for its amax.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanovllm.ops import pdl_between
from nanovllm.ops.fp8_rows_triton import TL_DTYPES, empty_rows, quantize_fp8_rows_triton, store_row
from nanovllm.ops.quant_format import Fp8Rows

FP8_MAX_FEATURES = 16384     # the widest row one program quantizes (16 warps, 32 values of gate and up a thread)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, scale_ptr, stride_x, stride_xs, INTERMEDIATE: tl.constexpr,
                         BLOCK: tl.constexpr, ROUND_TO: tl.constexpr, NUM_PARTIALS: tl.constexpr = 1,
                         FP8_OUT: tl.constexpr = False, PDL: tl.constexpr = False, WAIT: tl.constexpr = False):
    if PDL:     # a GEMV launched with PDL after this kernel may start now (ops/__init__.py)
        tl.extra.cuda.gdc_launch_dependents()
    if WAIT:    # launched early (PDL_BETWEEN): the kernel before has written x once this returns
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < INTERMEDIATE
    gate_ptrs = x_ptr + row * stride_x + offs
    if NUM_PARTIALS == 1:
        gate = tl.load(gate_ptrs, mask=mask, other=0.0)
        up = tl.load(gate_ptrs + INTERMEDIATE, mask=mask, other=0.0)
    else:   # K's float32 partial products: added up as sum_partials adds them, then rounded as its output
        gate = tl.zeros([BLOCK], dtype=tl.float32)
        up = tl.zeros([BLOCK], dtype=tl.float32)
        for s in tl.static_range(NUM_PARTIALS):     # unrolled: every partial's load in flight at once
            gate += tl.load(gate_ptrs + s * stride_xs, mask=mask, other=0.0)
            up += tl.load(gate_ptrs + s * stride_xs + INTERMEDIATE, mask=mask, other=0.0)
        gate, up = gate.to(ROUND_TO), up.to(ROUND_TO)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(ROUND_TO).to(tl.float32)
    # (with FP8_OUT the grid is one program a row: BLOCK covers it)
    store_row(silu * up.to(tl.float32), out_ptr, scale_ptr, row, offs, mask, INTERMEDIATE, FP8_OUT, ROUND_TO)


def silu_and_mul_triton(x: torch.Tensor, fp8: bool = False,
                        partials_dtype: torch.dtype | None = None) -> torch.Tensor | Fp8Rows:
    """x: [T, 2 * I] -> [T, I]; fp8 (x [T, 2 I]): as Fp8Rows. With partials_dtype, x is
    gate_up_proj's float32 partial products [S, T, 2 I], added up and rounded to that dtype here (as
    sum_partials would, the same bits) rather than by a kernel of their own."""
    partials = x if partials_dtype is not None else x[None]                       # [S, ..., 2 I]
    intermediate, dtype = x.shape[-1] // 2, partials_dtype or x.dtype
    if fp8 and intermediate > FP8_MAX_FEATURES and partials.dim() == 3:      # wider rows: two kernels
        return quantize_fp8_rows_triton(silu_and_mul_triton(x, partials_dtype=partials_dtype))
    out, out_arg, scale_arg = empty_rows((*partials.shape[1:-1], intermediate), dtype, x.device, fp8)   # [T, I]
    if out_arg.numel() == 0:
        return out
    if partials.stride(-1) != 1:
        partials = partials.contiguous()
    partials = partials.reshape(partials.shape[0], -1, 2 * intermediate)         # [S, T, 2 I]
    block = triton.next_power_of_2(intermediate) if fp8 else min(1024, triton.next_power_of_2(intermediate))
    grid = (partials.shape[1], triton.cdiv(intermediate, block))
    _silu_and_mul_kernel[grid](partials, out_arg, scale_arg, partials.stride(1), partials.stride(0),
                               INTERMEDIATE=intermediate, BLOCK=block, ROUND_TO=TL_DTYPES[dtype],
                               NUM_PARTIALS=partials.shape[0], FP8_OUT=fp8, **pdl_between(x, "silu"),
                               num_warps=min(16, max(1, block // 256)))
    return out
