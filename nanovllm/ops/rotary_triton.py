"""RoPE in Triton, in place on q and k, optionally fused with Qwen3's per-head RMSNorm.

One program per token rotates every query and key head of that token: the cos/sin
row of its position is read once, and q and k are read and written once each.
With the norm fused, each head is normalized (fp32 mean square over D) before it
is rotated, so Qwen3's q_norm -> k_norm -> rotary is one pass instead of three.
Rounding follows the torch references (norm rounded to the dtype, then rotated in
fp32 and rounded again).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(x_ptr, stride_h, cos, sin, weight_ptr, eps,
                  NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
                  HALF: tl.constexpr, HALF_PAD: tl.constexpr, HAS_NORM: tl.constexpr):
    """Rotate (and first normalize) the [NUM_HEADS, 2 * HALF] heads at x_ptr in place."""
    offs_h = tl.arange(0, HEADS_PAD)
    offs_d = tl.arange(0, HALF_PAD)
    mask = (offs_h[:, None] < NUM_HEADS) & (offs_d[None, :] < HALF)
    ptr1 = x_ptr + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(ptr1, mask=mask, other=0.0)
    x2 = tl.load(ptr1 + HALF, mask=mask, other=0.0)
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    if HAS_NORM:
        rstd = tl.rsqrt((tl.sum(x1f * x1f, axis=1) + tl.sum(x2f * x2f, axis=1)) / (2 * HALF) + eps)
        w1 = tl.load(weight_ptr + offs_d, mask=offs_d < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(weight_ptr + HALF + offs_d, mask=offs_d < HALF, other=0.0).to(tl.float32)
        x1f = (x1f * rstd[:, None]).to(x1.dtype).to(tl.float32) * w1[None, :]
        x2f = (x2f * rstd[:, None]).to(x1.dtype).to(tl.float32) * w2[None, :]
        x1f = x1f.to(x1.dtype).to(tl.float32)
        x2f = x2f.to(x1.dtype).to(tl.float32)
    tl.store(ptr1, (x1f * cos[None, :] - x2f * sin[None, :]).to(x1.dtype), mask=mask)
    tl.store(ptr1 + HALF, (x2f * cos[None, :] + x1f * sin[None, :]).to(x1.dtype), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, positions_ptr, cos_sin_ptr, q_weight_ptr, k_weight_ptr, eps,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
                   NUM_Q_HEADS: tl.constexpr, Q_HEADS_PAD: tl.constexpr,
                   NUM_KV_HEADS: tl.constexpr, KV_HEADS_PAD: tl.constexpr,
                   HALF: tl.constexpr, HALF_PAD: tl.constexpr, HAS_NORM: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    offs_d = tl.arange(0, HALF_PAD)
    cos = tl.load(cos_sin_ptr + position * stride_cache + offs_d, mask=offs_d < HALF, other=0.0)
    sin = tl.load(cos_sin_ptr + position * stride_cache + HALF + offs_d, mask=offs_d < HALF, other=0.0)
    _rotate_heads(q_ptr + token * stride_qt, stride_qh, cos, sin, q_weight_ptr, eps,
                  NUM_Q_HEADS, Q_HEADS_PAD, HALF, HALF_PAD, HAS_NORM)
    _rotate_heads(k_ptr + token * stride_kt, stride_kh, cos, sin, k_weight_ptr, eps,
                  NUM_KV_HEADS, KV_HEADS_PAD, HALF, HALF_PAD, HAS_NORM)


def _launch(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
            q_norm_weight: torch.Tensor | None, k_norm_weight: torch.Tensor | None, eps: float) -> None:
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if num_tokens == 0:
        return
    if q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError("rotary embedding works in place and needs q and k with a unit stride "
                         "along head_dim; pass views of a row-major qkv buffer")
    half = head_dim // 2
    has_norm = q_norm_weight is not None
    _rotary_kernel[(num_tokens,)](
        q, k, positions, cos_sin_cache,
        q_norm_weight if has_norm else q, k_norm_weight if has_norm else k, eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        NUM_Q_HEADS=num_heads, Q_HEADS_PAD=triton.next_power_of_2(num_heads),
        NUM_KV_HEADS=num_kv_heads, KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HALF=half, HALF_PAD=triton.next_power_of_2(half), HAS_NORM=has_norm, num_warps=4)


def apply_rotary_triton(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                        cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place by positions [T]; returns (q, k)."""
    _launch(q, k, positions, cos_sin_cache, None, None, 0.0)
    return q, k


def qk_norm_rotary_triton(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                          cos_sin_cache: torch.Tensor, q_norm_weight: torch.Tensor,
                          k_norm_weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm each head of q [T, Hq, D] and k [T, Hkv, D] (weights [D]), then rotate; in place."""
    _launch(q, k, positions, cos_sin_cache, q_norm_weight, k_norm_weight, eps)
    return q, k
