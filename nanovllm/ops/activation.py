"""SiLU-and-mul, the gate of the SwiGLU MLP: silu(gate) * up.

The gate and up projections are one fused matmul whose output holds
[gate | up] side by side; this op splits it and combines the halves.
fp8=True returns the result quantized per row (`Fp8Rows`) for down_proj's FP8 W8A8
product, w4=True laid out for its W4A16 GEMV (`W4Rows`): on the GPU the kernel writes them
itself (activation_triton.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.ops import use_triton
from nanovllm.ops.quant_format import Fp8Rows, W4Rows, as_product_rows


def silu_and_mul_torch(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2 * I] -> [T, I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


def silu_and_mul(x: torch.Tensor, fp8: bool = False, w4: bool = False) -> torch.Tensor | Fp8Rows | W4Rows:
    if use_triton(x):
        from nanovllm.ops.activation_triton import silu_and_mul_triton
        return silu_and_mul_triton(x, fp8, w4)
    return as_product_rows(silu_and_mul_torch(x), fp8, w4)


def linear_silu_and_mul(x: torch.Tensor | Fp8Rows | W4Rows, layer: nn.Module, fp8: bool = False,
                        w4: bool = False) -> torch.Tensor | Fp8Rows | W4Rows:
    """silu_and_mul(layer(x), fp8, w4) for gate_up_proj; a layer with a `forward_silu_and_mul` of its own
    (Fp8Linear: one kernel at one row) computes both, where down_proj takes no W4Rows."""
    fused = getattr(layer, "forward_silu_and_mul", None)
    return fused(x, fp8) if fused is not None and not w4 else silu_and_mul(layer(x), fp8, w4)
