"""RMSNorm, and the fused "add the residual, then normalize" step.

Each decoder layer does `residual = residual + x; x = rms_norm(residual)` twice.
Fusing the add into the norm reads the activations once instead of three times.
RMSNorm itself: x / sqrt(mean(x^2) + eps) * weight, computed in float32.
The x of the fused step may come as partial sums [S, T, H] (a product split along K,
ops/linear.py): they are added in float32 with the residual, and rounded once.
For float32 inputs the reference calls torch's `F.rms_norm`, which computes
exactly this formula in fewer dispatched ops (the CPU backend's hot path).
fp8=True returns the normalized rows quantized per row (`Fp8Rows`) for the FP8 W8A8 product
after the norm: on the GPU the norm's kernel writes them itself (rmsnorm_triton.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nanovllm.ops import use_triton
from nanovllm.ops.quant_format import Fp8Rows, as_product_rows


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., H], weight: [H] -> [..., H] in x's dtype."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, x.shape[-1:], weight, eps)      # the formula below, bit for bit
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm_torch(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual); x, residual: [T, H]. x may also be
    float32 partial sums [S, T, H]: then x + residual is their sum plus residual, in residual's dtype."""
    if x.dim() == 3:
        residual = (x.sum(0) + residual.float()).to(residual.dtype)
    else:
        residual = x + residual
    return rms_norm_torch(residual, weight, eps), residual


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, fp8: bool = False) -> torch.Tensor | Fp8Rows:
    if use_triton(x):
        from nanovllm.ops.rmsnorm_triton import rms_norm_triton
        return rms_norm_triton(x, weight, eps, fp8)
    return as_product_rows(rms_norm_torch(x, weight, eps), fp8)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 fp8: bool = False) -> tuple[torch.Tensor | Fp8Rows, torch.Tensor]:
    if use_triton(x):
        from nanovllm.ops.rmsnorm_triton import add_rms_norm_triton
        return add_rms_norm_triton(x, residual, weight, eps, fp8)
    out, residual = add_rms_norm_torch(x, residual, weight, eps)
    return as_product_rows(out, fp8), residual
