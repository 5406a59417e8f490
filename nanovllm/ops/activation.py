"""SiLU-and-mul, the gate of the SwiGLU MLP: silu(gate) * up.

The gate and up projections are one fused matmul whose output holds
[gate | up] side by side; this op splits it and combines the halves.
fp8=True returns the result quantized per row (`Fp8Rows`) for down_proj's FP8 W8A8
product: on the GPU the kernel writes them itself (activation_triton.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.ops import use_triton
from nanovllm.ops.quant_format import Fp8Rows, as_product_rows


def silu_and_mul_torch(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2 * I] -> [T, I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


def silu_and_mul(x: torch.Tensor, fp8: bool = False,
                 partials_dtype: torch.dtype | None = None) -> torch.Tensor | Fp8Rows:
    """x [T, 2 I] -> [T, I]; or with partials_dtype, x is the float32 partial products [S, T, 2 I] of a
    product split along K, added up in order and rounded to partials_dtype first (sum_partials' bits)."""
    if use_triton(x):
        from nanovllm.ops.activation_triton import silu_and_mul_triton
        return silu_and_mul_triton(x, fp8, partials_dtype)
    if partials_dtype is not None:
        x = sum(x.unbind(0), torch.zeros_like(x[0])).to(partials_dtype)
    return as_product_rows(silu_and_mul_torch(x), fp8)


# A quantized gate_up_proj whose one-row product splits K (W4A16, W8A16) hands SiLU-and-mul its float32
# partial products, which it adds up as it loads them: one launch and one pass fewer than summing them
# in a kernel of their own (sum_partials), the same bits. W4A16 batch-1 decode on an H100, in one run:
# Llama-3.2-1B 1,351 -> 1,354 tok/s, Llama-3.1-8B 356 -> 361.
PARTIALS_INTO_SILU = True


def linear_silu_and_mul(x: torch.Tensor | Fp8Rows, layer: nn.Module, fp8: bool = False) -> torch.Tensor | Fp8Rows:
    """silu_and_mul(layer(x), fp8) for gate_up_proj; a layer with a `forward_silu_and_mul` of its own
    computes both where it can (Fp8Linear: one kernel at one row; W4A16Linear: one kernel where its
    one-row GEMV takes the layer unsplit, else None); a quantized layer with `forward_or_partials` may
    hand over K's partial products (PARTIALS_INTO_SILU, not for Fp8Rows)."""
    fused = getattr(layer, "forward_silu_and_mul", None)
    if fused is not None:
        out = fused(x, fp8)
        if out is not None:
            return out
    or_partials = getattr(layer, "forward_or_partials", None)
    if not PARTIALS_INTO_SILU or or_partials is None or fp8:
        return silu_and_mul(layer(x), fp8)
    out = or_partials(x)                                                 # [T, 2 I], or [S, T, 2 I] float32
    return silu_and_mul(out, fp8, partials_dtype=x.dtype if out.dim() == 3 else None)
