"""SiLU-and-mul in Triton: reads [gate | up] once, writes silu(gate) * up once.

Rounding follows `silu_and_mul_torch`: silu in fp32 rounded to the input dtype,
then the product rounded again.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanovllm.ops import use_pdl


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, INTERMEDIATE: tl.constexpr, BLOCK: tl.constexpr,
                         PDL: tl.constexpr = False):
    if PDL:     # a GEMV launched with PDL after this kernel may start now (ops/__init__.py)
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < INTERMEDIATE
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + INTERMEDIATE + offs, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + row * INTERMEDIATE + offs, (silu * up.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=mask)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2 * I] -> [T, I]."""
    intermediate = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], intermediate, dtype=x.dtype, device=x.device)   # [T, I]
    if out.numel() == 0:
        return out
    if x.stride(-1) != 1:
        x = x.contiguous()
    x = x.reshape(-1, 2 * intermediate)
    block = min(1024, triton.next_power_of_2(intermediate))
    grid = (x.shape[0], triton.cdiv(intermediate, block))
    _silu_and_mul_kernel[grid](x, out, x.stride(0), INTERMEDIATE=intermediate, BLOCK=block, PDL=use_pdl(x),
                               num_warps=max(1, block // 256))
    return out
