"""RoPE in Triton, in place on q and k, optionally fused with Qwen3's per-head RMSNorm
and with the write of the token's K and V into the paged KV cache.

One program per token rotates every query and key head of that token: the cos/sin
row of its position is read once, and q and k are read and written once each.
With the norm fused, each head is normalized (fp32 mean square over D) before it
is rotated, so Qwen3's q_norm -> k_norm -> rotary is one pass instead of three.
With the store fused (`rotary_and_store_kv_triton`, what a decoder layer runs), the
same program then writes the rotated k, still in registers, and the token's v into
the caches at its slot (slot < 0: a padding row, nothing written): a decoder layer
launches one kernel for norm + RoPE + cache write, where a separate store kernel
would cost a launch and a re-read of k per layer.
Rounding follows the torch references (norm rounded to the dtype, then rotated in
fp32 and rounded again; the cache gets that rounded k, cast to the cache's dtype, or
for an FP8 cache divided by its scale in fp32, clamped to +-448 and rounded to e4m3:
`quantize_kv` in attention.py, `to_cache` here).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanovllm.ops.quant_format import FP8_DTYPE, FP8_MAX

_FP8_MAX = tl.constexpr(FP8_MAX)   # a kernel reads module constants only as constexpr

@triton.jit
def _round_to_e4m3(x):
    """fp32 x, |x| <= 448 -> the nearest e4m3 value (ties to even), still fp32, so that the cast after it
    is exact. Rounded here rather than by the cast because Triton's interpreter rounds that cast
    otherwise (no carry into the exponent, no subnormals) and the CPU tests compare bytes."""
    bits = x.to(tl.int32, bitcast=True)
    exponent = tl.maximum((bits >> 23) & 0xFF, 121)                  # biased; 121 = 2^-6, e4m3's least normal
    step = ((exponent - 3) << 23).to(tl.float32, bitcast=True)       # e4m3's spacing there: 2^(e - 3)
    inverse_step = ((257 - exponent) << 23).to(tl.float32, bitcast=True)
    y = tl.abs(x) * inverse_step                                      # exact: a power of 2; y < 16
    low = tl.floor(y)
    rest = y - low
    up = (rest > 0.5) | ((rest == 0.5) & ((low.to(tl.int32) & 1) == 1))
    rounded = (low + up.to(tl.float32)) * step
    return tl.where(bits < 0, -rounded, rounded)                      # the sign bit: -0.0 stays -0.0


@triton.jit
def to_cache(x, scale, cache_ptr, FP8: tl.constexpr):
    """K or V values x (any float dtype) -> what the cache at cache_ptr stores: x in the cache's dtype,
    or with FP8 x / scale in fp32 (IEEE division, as torch's), clamped to the e4m3 range and rounded
    to nearest even, NaN stored as 0 (attention.py's quantize_kv, bit for bit)."""
    if FP8:
        xs = tl.math.div_rn(x.to(tl.float32), scale)
        xs = tl.minimum(tl.maximum(tl.where(xs == xs, xs, 0.0), -_FP8_MAX), _FP8_MAX)
        return _round_to_e4m3(xs).to(cache_ptr.dtype.element_ty)
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def _rotate_heads(x_ptr, stride_h, cos, sin, weight_ptr, eps,
                  NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
                  HALF: tl.constexpr, HALF_PAD: tl.constexpr, HAS_NORM: tl.constexpr):
    """Rotate (and first normalize) the [NUM_HEADS, 2 * HALF] heads at x_ptr in place.
    Returns the rotated halves as stored (in x's dtype), [HEADS_PAD, HALF_PAD] each."""
    offs_h = tl.arange(0, HEADS_PAD)
    offs_d = tl.arange(0, HALF_PAD)
    mask = (offs_h[:, None] < NUM_HEADS) & (offs_d[None, :] < HALF)
    ptr1 = x_ptr + offs_h[:, None] * stride_h + offs_d[None, :]
    if HAS_NORM:   # loaded before the reduction, so that it travels with x's load
        w1 = tl.load(weight_ptr + offs_d, mask=offs_d < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(weight_ptr + HALF + offs_d, mask=offs_d < HALF, other=0.0).to(tl.float32)
    x1 = tl.load(ptr1, mask=mask, other=0.0)
    x2 = tl.load(ptr1 + HALF, mask=mask, other=0.0)
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    if HAS_NORM:
        rstd = tl.rsqrt((tl.sum(x1f * x1f, axis=1) + tl.sum(x2f * x2f, axis=1)) / (2 * HALF) + eps)
        x1f = (x1f * rstd[:, None]).to(x1.dtype).to(tl.float32) * w1[None, :]
        x2f = (x2f * rstd[:, None]).to(x1.dtype).to(tl.float32) * w2[None, :]
        x1f = x1f.to(x1.dtype).to(tl.float32)
        x2f = x2f.to(x1.dtype).to(tl.float32)
    out1 = (x1f * cos[None, :] - x2f * sin[None, :]).to(x1.dtype)
    out2 = (x2f * cos[None, :] + x1f * sin[None, :]).to(x1.dtype)
    tl.store(ptr1, out1, mask=mask)
    tl.store(ptr1 + HALF, out2, mask=mask)
    return out1, out2


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, positions_ptr, cos_sin_ptr, q_weight_ptr, k_weight_ptr, eps,
                   v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, k_scale, v_scale,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_cache, stride_vt, stride_vh,
                   stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, stride_vcd,
                   NUM_Q_HEADS: tl.constexpr, Q_HEADS_PAD: tl.constexpr,
                   NUM_KV_HEADS: tl.constexpr, KV_HEADS_PAD: tl.constexpr,
                   HALF: tl.constexpr, HALF_PAD: tl.constexpr, HAS_NORM: tl.constexpr,
                   STORE_KV: tl.constexpr, BLOCK_SIZE: tl.constexpr, FP8_KV: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    offs_d = tl.arange(0, HALF_PAD)
    if STORE_KV:   # the loads that depend on nothing else go first, to overlap the cos/sin loads
        slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
        offs_h = tl.arange(0, KV_HEADS_PAD)
        mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HALF)
        v_src = v_ptr + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :]   # first halves
        v1 = tl.load(v_src, mask=mask)
        v2 = tl.load(v_src + HALF, mask=mask)
    cos = tl.load(cos_sin_ptr + position * stride_cache + offs_d, mask=offs_d < HALF, other=0.0)
    sin = tl.load(cos_sin_ptr + position * stride_cache + HALF + offs_d, mask=offs_d < HALF, other=0.0)
    _rotate_heads(q_ptr + token * stride_qt, stride_qh, cos, sin, q_weight_ptr, eps,
                  NUM_Q_HEADS, Q_HEADS_PAD, HALF, HALF_PAD, HAS_NORM)
    k1, k2 = _rotate_heads(k_ptr + token * stride_kt, stride_kh, cos, sin, k_weight_ptr, eps,
                           NUM_KV_HEADS, KV_HEADS_PAD, HALF, HALF_PAD, HAS_NORM)
    if STORE_KV:
        if slot >= 0:   # slot -1: a padding row (e.g. of a CUDA-graph batch), nothing to write
            block = slot // BLOCK_SIZE
            in_block = slot % BLOCK_SIZE
            k_dst = (k_cache_ptr + block * stride_kcb + in_block * stride_kcs
                     + offs_h[:, None] * stride_kch + offs_d[None, :])
            v_dst = (v_cache_ptr + block * stride_vcb + in_block * stride_vcs
                     + offs_h[:, None] * stride_vch + offs_d[None, :] * stride_vcd)
            tl.store(k_dst, to_cache(k1, k_scale, k_cache_ptr, FP8_KV), mask=mask)
            tl.store(k_dst + HALF, to_cache(k2, k_scale, k_cache_ptr, FP8_KV), mask=mask)
            tl.store(v_dst, to_cache(v1, v_scale, v_cache_ptr, FP8_KV), mask=mask)
            tl.store(v_dst + HALF * stride_vcd, to_cache(v2, v_scale, v_cache_ptr, FP8_KV), mask=mask)


def _launch(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
            q_norm_weight: torch.Tensor | None, k_norm_weight: torch.Tensor | None, eps: float,
            v: torch.Tensor | None = None, k_cache: torch.Tensor | None = None,
            v_cache: torch.Tensor | None = None, slot_mapping: torch.Tensor | None = None,
            k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Rotate q and k in place; with v given, also write k and v into the caches at slot_mapping
    (an FP8 cache: quantized by k_scale, v_scale)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if num_tokens == 0:
        return
    if q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError("rotary embedding works in place and needs q and k with a unit stride "
                         "along head_dim; pass views of a row-major qkv buffer")
    positions = positions.contiguous()    # a program reads its token's entry at positions_ptr + token
    half = head_dim // 2
    has_norm = q_norm_weight is not None
    store_kv = v is not None
    if store_kv:
        if v.stride(2) != 1:
            v = v.contiguous()
        slot_mapping = slot_mapping.contiguous()
        if k_cache.stride(3) != 1:
            raise ValueError("the K cache needs a unit stride along head_dim")
        cache_strides = (*k_cache.stride()[:3], *v_cache.stride())     # V may be keys-innermost (attention.py)
        block_size = k_cache.shape[1]
    else:   # the store's arguments are unused: any valid pointer and stride will do
        v, k_cache, v_cache, slot_mapping = k, k, k, positions
        cache_strides = (0,) * 7
        block_size = 1
    _rotary_kernel[(num_tokens,)](
        q, k, positions, cos_sin_cache,
        q_norm_weight if has_norm else q, k_norm_weight if has_norm else k, eps,
        v, k_cache, v_cache, slot_mapping, k_scale, v_scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0), v.stride(0), v.stride(1),
        *cache_strides,
        NUM_Q_HEADS=num_heads, Q_HEADS_PAD=triton.next_power_of_2(num_heads),
        NUM_KV_HEADS=num_kv_heads, KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HALF=half, HALF_PAD=triton.next_power_of_2(half), HAS_NORM=has_norm,
        STORE_KV=store_kv, BLOCK_SIZE=block_size, FP8_KV=store_kv and k_cache.dtype == FP8_DTYPE, num_warps=4)


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


def rotary_and_store_kv_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                               cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               slot_mapping: torch.Tensor, q_norm_weight: torch.Tensor | None = None,
                               k_norm_weight: torch.Tensor | None = None, eps: float = 0.0, *,
                               k_scale: float = 1.0, v_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place (first RMSNorm each head when the norm
    weights [D] are given), then write k and v [T, Hkv, D] into k_cache, v_cache
    [num_blocks, block_size, Hkv, D] at slot_mapping [T] (slots < 0 skipped; an FP8 cache gets
    them quantized by k_scale, v_scale); returns (q, k)."""
    _launch(q, k, positions, cos_sin_cache, q_norm_weight, k_norm_weight, eps, v, k_cache, v_cache, slot_mapping,
            k_scale, v_scale)
    return q, k
