"""Rotary position embeddings (RoPE), rotate-half convention.

Each pair (x[i], x[i + D/2]) of a query or key head is rotated by the angle
position * inv_freq[i]. We precompute cos and sin for every position once
(`rope_cos_sin_cache`) and index them by the tokens' positions at run time.
Long-context models stretch the low frequencies: `linear` divides every
frequency by a factor, `llama3` divides only the long wavelengths and blends
the middle band smoothly (Llama 3.1 / 3.2).

On the CPU each op call costs microseconds whatever its size, so the reference
rotates in four in-place ops, and q and k together when they sit side by side
in the fused qkv output.

A decoder layer calls `rotary_store_and_attend`: (Qwen3's per-head norm,) RoPE,
the write of the new tokens' K and V into the paged cache (`rotary_and_store_kv`),
then paged attention. On CUDA the first two are one kernel, and for a decode of a
few sequences all three are (attention_triton.py); the torch reference runs the
steps in turn.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from nanovllm.ops import NUMBA_CACHE_DTYPES, use_numba, use_triton
from nanovllm.ops.attention import AttentionMetadata, paged_attention_torch, store_kvcache_torch
from nanovllm.ops.rmsnorm import rms_norm_torch


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """-> [head_dim / 2] float32 angular frequencies, scaled as the config says."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    kind = scaling["rope_type"]
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    if kind == "llama3":
        low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
        high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
        old_context = float(scaling.get("original_max_position_embeddings", 8192))
        low_freq_wavelen = old_context / low_freq_factor
        high_freq_wavelen = old_context / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: llama3, linear)")


def rope_cos_sin_cache(head_dim: int, max_position: int, theta: float,
                       scaling: dict[str, Any] | None) -> torch.Tensor:
    """-> [max_position, head_dim] float32: cos in the first half, sin in the second."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    angles = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def _rotate_half_table(cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """[max_position, D] (cos | sin) -> [max_position, 2, 1, D]: (cos | cos) and (-sin | sin) per position,
    so that rotating x is x * cos_cos + roll_half(x) * minus_sin_sin (roll_half(x) = x2 | x1).
    Built on first use and kept for the last cache seen (a model's layers all share one, which
    nothing writes to after it is built)."""
    global _last_table
    cached_for, table = _last_table
    if cached_for is not cos_sin_cache:
        cos, sin = cos_sin_cache.float().chunk(2, dim=-1)                            # [P, D/2] each
        table = torch.stack([torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)], dim=1)[:, :, None]
        _last_table = (cos_sin_cache, table)
    return table


_last_table: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)   # (cos_sin_cache, its table)


def _rotate_(x: torch.Tensor, angles: torch.Tensor) -> None:
    """Rotate x [T, H, D] float32 in place; angles [T, 2, 1, D] from _rotate_half_table.
    x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin: the same products and sums, bit for bit."""
    cos_cos, minus_sin_sin = angles.unbind(1)                                   # [T, 1, D] each
    rolled = x.roll(x.shape[-1] // 2, dims=-1).mul_(minus_sin_sin)              # [-x2 sin | x1 sin]
    x.mul_(cos_cos).add_(rolled)


def _joint_qk(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """q [T, Hq, D] and k [T, Hkv, D] as one view [T, Hq + Hkv, D] when k's heads follow q's in memory
    row by row (the fused qkv projection's output), so that one pass rotates both; else None."""
    num_tokens, num_heads, head_dim = q.shape
    row_stride = q.stride(0)                     # a single row's stride is arbitrary: only check rows > 1
    if (q.stride()[1:] != (head_dim, 1) or k.stride()[1:] != (head_dim, 1)
            or k.data_ptr() != q.data_ptr() + num_heads * head_dim * q.element_size()
            or (num_tokens > 1 and (k.stride(0) != row_stride or row_stride < (num_heads + k.shape[1]) * head_dim))):
        return None
    return q.as_strided((num_tokens, num_heads + k.shape[1], head_dim), (row_stride, head_dim, 1))


def apply_rotary_torch(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                       cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place by positions [T]; returns (q, k)."""
    angles = _rotate_half_table(cos_sin_cache).index_select(0, positions)      # [T, 2, 1, D]
    if q.dtype == torch.float32 and k.dtype == torch.float32:
        joint = _joint_qk(q, k)
        for x in (q, k) if joint is None else (joint,):
            _rotate_(x, angles)
        return q, k
    for x in (q, k):   # other dtypes: rotate in float32, round once
        xf = x.float()
        _rotate_(xf, angles)
        x.copy_(xf)
    return q, k


def qk_norm_rotary_torch(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                         cos_sin_cache: torch.Tensor, q_norm_weight: torch.Tensor,
                         k_norm_weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3: RMSNorm each head of q [T, Hq, D] and k [T, Hkv, D] (weights [D]), then rotate; in place."""
    q.copy_(rms_norm_torch(q, q_norm_weight, eps))
    k.copy_(rms_norm_torch(k, k_norm_weight, eps))
    return apply_rotary_torch(q, k, positions, cos_sin_cache)


def rotary_and_store_kv_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                              cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              slot_mapping: torch.Tensor, q_norm_weight: torch.Tensor | None = None,
                              k_norm_weight: torch.Tensor | None = None, eps: float = 0.0, *,
                              k_scale: float = 1.0, v_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place (first RMSNorm each head when the norm
    weights [D] are given), then write k and v [T, Hkv, D] into k_cache, v_cache
    [num_blocks, block_size, Hkv, D] at slot_mapping [T] (slots < 0 skipped; an FP8 cache gets
    them quantized by k_scale, v_scale); returns (q, k)."""
    if q_norm_weight is not None:
        qk_norm_rotary_torch(q, k, positions, cos_sin_cache, q_norm_weight, k_norm_weight, eps)
    else:
        apply_rotary_torch(q, k, positions, cos_sin_cache)
    store_kvcache_torch(k, v, k_cache, v_cache, slot_mapping, k_scale=k_scale, v_scale=v_scale)
    return q, k


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                 cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(q):
        from nanovllm.ops.rotary_triton import apply_rotary_triton
        return apply_rotary_triton(q, k, positions, cos_sin_cache)
    return apply_rotary_torch(q, k, positions, cos_sin_cache)


def rotary_and_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                        cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor, q_norm_weight: torch.Tensor | None = None,
                        k_norm_weight: torch.Tensor | None = None, eps: float = 0.0, *,
                        k_scale: float = 1.0, v_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(Norm and) rotate q and k in place, then write k and v into the caches at slot_mapping;
    one kernel on CUDA. See rotary_and_store_kv_torch for the shapes."""
    if use_triton(q):
        from nanovllm.ops.rotary_triton import rotary_and_store_kv_triton
        return rotary_and_store_kv_triton(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
                                          q_norm_weight, k_norm_weight, eps, k_scale=k_scale, v_scale=v_scale)
    return rotary_and_store_kv_torch(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
                                     q_norm_weight, k_norm_weight, eps, k_scale=k_scale, v_scale=v_scale)


def rotary_store_and_attend_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                                  cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  metadata: AttentionMetadata, scale: float,
                                  q_norm_weight: torch.Tensor | None = None,
                                  k_norm_weight: torch.Tensor | None = None, eps: float = 0.0, *,
                                  k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """A decoder layer's attention core: `rotary_and_store_kv_torch` on q [T, Hq, D], k, v [T, Hkv, D]
    (the metadata's slot mapping), then `paged_attention_torch` -> out [T, Hq, D]. k_scale, v_scale:
    an FP8 cache's scales (attention.py)."""
    q, _ = rotary_and_store_kv_torch(q, k, v, positions, cos_sin_cache, k_cache, v_cache, metadata.slot_mapping,
                                     q_norm_weight, k_norm_weight, eps, k_scale=k_scale, v_scale=v_scale)
    return paged_attention_torch(q, k_cache, v_cache, metadata, scale, k_scale=k_scale, v_scale=v_scale)


def rotary_store_and_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                            cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            metadata: AttentionMetadata, scale: float, q_norm_weight: torch.Tensor | None = None,
                            k_norm_weight: torch.Tensor | None = None, eps: float = 0.0,
                            batch_invariant: bool = False, *, k_scale: float = 1.0,
                            v_scale: float = 1.0) -> torch.Tensor:
    """(Norm and) RoPE, the cache write of the new tokens' K and V, and paged attention. On CUDA a
    decode step runs it as one kernel (the attention kernel rotates the token's q and k itself and
    takes its own key from registers), a step with prefill chunks as two; the torch reference runs
    the steps in turn (and rotates q and k in place, which the kernel need not do). On the CPU in
    float32 (with a float32 or float16 cache) the attention is numba's, whose result for a query does
    not depend on the batch.
    batch_invariant: on CUDA, always two kernels, and attention in the one configuration of
    `rotary_store_and_attend_triton` whose result for a query does not depend on the batch either.
    An FP8 cache (k_scale, v_scale: its scales) runs the Triton kernels on CUDA and the torch reference
    on the CPU: the numba kernel reads float32 and float16 caches only."""
    if use_triton(q):
        from nanovllm.ops.attention_triton import rotary_store_and_attend_triton
        return rotary_store_and_attend_triton(q, k, v, positions, cos_sin_cache, k_cache, v_cache, metadata, scale,
                                              q_norm_weight, k_norm_weight, eps, batch_invariant=batch_invariant,
                                              k_scale=k_scale, v_scale=v_scale)
    if use_numba(q) and k_cache.dtype in NUMBA_CACHE_DTYPES:   # batch-invariant attention (attention_numba.py)
        from nanovllm.ops.attention_numba import rotary_store_and_attend_numba
        return rotary_store_and_attend_numba(q, k, v, positions, cos_sin_cache, k_cache, v_cache, metadata, scale,
                                             q_norm_weight, k_norm_weight, eps)
    return rotary_store_and_attend_torch(q, k, v, positions, cos_sin_cache, k_cache, v_cache, metadata, scale,
                                         q_norm_weight, k_norm_weight, eps, k_scale=k_scale, v_scale=v_scale)
