"""SiLU-and-mul, the gate of the SwiGLU MLP: silu(gate) * up.

The gate and up projections are one fused matmul whose output holds
[gate | up] side by side; this op splits it and combines the halves.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.ops import use_triton


def silu_and_mul_torch(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2 * I] -> [T, I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if use_triton(x):
        from nanovllm.ops.activation_triton import silu_and_mul_triton
        return silu_and_mul_triton(x)
    return silu_and_mul_torch(x)


def linear_silu_and_mul(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """silu_and_mul(layer(x)) for gate_up_proj; a layer with a `forward_silu_and_mul` of its own
    (Fp8Linear: one kernel at one row) computes both."""
    fused = getattr(layer, "forward_silu_and_mul", None)
    return fused(x) if fused is not None else silu_and_mul(layer(x))
