"""Paged attention over a mixed batch of prefill chunks and decodes.

The KV cache of one layer is a pool of fixed-size blocks:
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
A sequence owns a list of block ids, its *block table*; token i of the
sequence lives in slot `block_table[i // block_size] * block_size + i % block_size`
of the flattened pool. Blocks need not be contiguous, which is the whole point
(PagedAttention): memory is handed out a block at a time, as sequences grow.

One forward pass carries several sequences, flattened into T token rows. For
sequence b, rows query_start_loc[b]:query_start_loc[b+1] are its new tokens
(a prefill chunk, or a single token for a decode), and seq_lens[b] counts its
whole context *including* the new tokens. The new tokens' K and V are first
written into their slots (`store_kvcache_torch`; on CUDA the rotary kernel writes
them, `rotary_and_store_kv` in rotary.py, or for a decode of a few sequences the
attention kernel itself, `rotary_store_and_attend`), then every query reads its
sequence's context through the block table (`paged_attention`), causally: the
query at absolute position p sees keys 0..p.

On the CPU a step of decodes (one new token per sequence) gathers each
sequence's context blocks with one `index_select` per cache and runs one
`scaled_dot_product_attention` for the whole batch. The gather indices and the
padding mask depend only on the block tables, so the first layer derives them
(`DecodeContext`) and the other layers of the step reuse them.

An FP8 cache (`kv_cache_dtype="fp8"`) stores K and V as float8 e4m3 with one scale
per layer and tensor, as vLLM does: a write stores x / scale, clamped to the format's
largest value (448) and rounded to e4m3 (`quantize_kv`); a read multiplies the stored
value by the scale in float32 (`dequantize_kv`). A float cache ignores the scales.
At head_dim above 64 its V is stored keys-innermost (`layer_caches`): each block as
[Hkv, D, block_size], seen through a permuted view as [num_blocks, block_size, Hkv, D]
like every other cache, so that the GPU kernels read V as they read K (attention_triton.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nanovllm.ops import use_triton
from nanovllm.ops.attention_metadata import AttentionMetadata, DecodeContext
from nanovllm.ops.quant_format import FP8_DTYPE, FP8_MAX


def is_fp8_cache(cache: torch.Tensor) -> bool:
    return cache.dtype == FP8_DTYPE


def quantize_kv(x: torch.Tensor, cache_dtype: torch.dtype, scale: float) -> torch.Tensor:
    """x [..., D] -> what a cache of cache_dtype stores: for FP8, x / scale in float32, clamped to
    +-448 and rounded to e4m3, NaN stored as 0 (so an FP8 cache never holds NaN: the kernels read
    slots past a sequence's end in its last block, times a probability of 0); for a float cache, x
    cast to its dtype (the scale unused)."""
    if cache_dtype != FP8_DTYPE:
        return x.to(cache_dtype)
    return (x.float() / scale).nan_to_num(nan=0.0).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


FP8_V_KEYS_INNERMOST = True     # off: an FP8 cache's V row-major like K (for timing against it)


def stores_v_keys_innermost(cache_dtype: torch.dtype, block_size: int, head_dim: int) -> bool:
    """Whether a cache stores V keys-innermost: an FP8 cache of heads wider than 64 (at 64, Llama-3.2-1B's,
    its decode read slower so: docs/reference/quantization.md) whose block size is a power of two up to
    16 (every tile of the attention kernels holds whole blocks then)."""
    return (FP8_V_KEYS_INNERMOST and cache_dtype == FP8_DTYPE and head_dim > 64 and 2 <= block_size <= 16
            and block_size & (block_size - 1) == 0)


def layer_caches(storage: torch.Tensor, v_keys_innermost: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's cache storage [2, num_blocks, block_size, Hkv, D] -> (k_cache, v_cache), each seen as
    [num_blocks, block_size, Hkv, D]. Where `stores_v_keys_innermost`, V's half of the storage holds each
    block as [Hkv, D, block_size] (a head's values of one d for the block's keys side by side), and
    v_cache is that memory permuted to the common shape: stride 1 along the block's slots."""
    k_cache, v_cache = storage[0], storage[1]
    num_blocks, block_size, num_kv_heads, head_dim = v_cache.shape
    if v_keys_innermost is None:      # as the engine stores it; tests choose
        v_keys_innermost = stores_v_keys_innermost(v_cache.dtype, block_size, head_dim)
    if v_keys_innermost:
        v_cache = v_cache.view(num_blocks, num_kv_heads, head_dim, block_size).permute(0, 3, 1, 2)
    return k_cache, v_cache


def dequantize_kv(cache: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Stored K or V -> dtype: an FP8 value times its scale in float32, then rounded to dtype."""
    if cache.dtype != FP8_DTYPE:
        return cache.to(dtype)
    return (cache.float() * scale).to(dtype)


def store_kvcache_torch(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, slot_mapping: torch.Tensor, *,
                        k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Write k, v [T, Hkv, D] into the caches at slot_mapping [T]; slots < 0 are skipped.
    An FP8 cache stores them quantized by k_scale and v_scale (`quantize_kv`)."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    if slot_mapping.numel() and int(slot_mapping.min()) < 0:
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    for x, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        stored = quantize_kv(x, cache.dtype, scale)                              # [T, Hkv, D]
        if is_fp8_cache(cache):   # torch's CPU index_copy_ has no float8: copy the bytes
            cache, stored = cache.view(torch.uint8), stored.view(torch.uint8)
        if cache.is_contiguous():
            cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, stored)
        else:                     # V keys-innermost (`layer_caches`): by block and slot in it
            block_size = cache.shape[1]
            cache[slot_mapping // block_size, slot_mapping % block_size] = stored


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """cache [N, bs, Hkv, D], block_table [max_blocks] -> [num_blocks * bs, Hkv, D]."""
    return cache.index_select(0, block_table[:num_blocks].clamp(min=0)).flatten(0, 1)


def paged_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          metadata: AttentionMetadata, scale: float, *,
                          k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """q [T, Hq, D] -> out [T, Hq, D]. GQA: query head h reads KV head h // (Hq // Hkv).
    An FP8 cache's keys and values are read as stored x k_scale, v_scale (`dequantize_kv`)."""
    num_heads, (block_size, num_kv_heads) = q.shape[1], k_cache.shape[1:3]
    group = num_heads // num_kv_heads
    num_blocks = -(-metadata.max_seq_len // block_size)
    if metadata.max_query_len == 1:
        return _decode_attention(q, k_cache, v_cache, metadata, scale, num_blocks, k_scale, v_scale)

    out = torch.empty_like(q)
    starts = metadata.query_start_loc.tolist()
    seq_lens = metadata.seq_lens.tolist()
    for b, seq_len in enumerate(seq_lens):
        start, end = starts[b], starts[b + 1]
        q_len = end - start
        if q_len == 0:
            continue
        nb = -(-seq_len // block_size)
        k = _gather_context(k_cache, metadata.block_tables[b], nb)[:seq_len]    # [L, Hkv, D]
        v = _gather_context(v_cache, metadata.block_tables[b], nb)[:seq_len]
        k, v = dequantize_kv(k, k_scale, q.dtype), dequantize_kv(v, v_scale, q.dtype)
        # Four dimensions, [1, heads, tokens, D]: torch's CPU flash-attention kernel takes those (and
        # GQA's shared KV heads, enable_gqa); three send it to the unfused path, 5x slower at 2,000 tokens.
        qb, kb, vb = q[start:end].transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
        mask = None             # a whole prompt: the plain causal mask, which the kernel applies itself
        if q_len < seq_len:     # a chunk after cached context: query at position p sees keys 0..p
            query_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
            mask = torch.arange(seq_len, device=q.device)[None, :] <= query_pos[:, None]   # [q_len, L]
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, is_causal=mask is None, scale=scale,
                                           enable_gqa=group > 1)
        out[start:end] = o[0].transpose(0, 1)
    return out


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      metadata: AttentionMetadata, scale: float, num_blocks: int,
                      k_scale: float, v_scale: float) -> torch.Tensor:
    """All sequences have one new token: attend for the whole batch at once."""
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    context = DecodeContext.of(metadata, block_size)
    shape = (batch, num_blocks * block_size, num_kv_heads, head_dim)
    if context.first_block is not None:   # one sequence, consecutive blocks: a slice of the cache, no copy
        blocks = slice(context.first_block, context.first_block + num_blocks)
        k, v = k_cache[blocks].view(shape), v_cache[blocks].reshape(shape)   # V keys-innermost: a copy
    else:
        k = k_cache.index_select(0, context.block_ids).view(shape)
        v = v_cache.index_select(0, context.block_ids).view(shape)
    k, v = k[:, :metadata.max_seq_len], v[:, :metadata.max_seq_len]                     # [B, L, Hkv, D]
    if k.dtype != q.dtype:
        k, v = dequantize_kv(k, k_scale, q.dtype), dequantize_kv(v, v_scale, q.dtype)
    qb = q.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)                # [B, Hkv, g, D]
    o = F.scaled_dot_product_attention(qb, k.transpose(1, 2), v.transpose(1, 2), attn_mask=context.mask,
                                       scale=scale)                                      # [B, Hkv, g, D]
    return o.reshape(batch, num_heads, head_dim)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    metadata: AttentionMetadata, scale: float, *,
                    k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """q [T, Hq, D] -> out [T, Hq, D]; Triton on CUDA (CUDA-graph safe for decodes), torch elsewhere."""
    if use_triton(q):
        from nanovllm.ops.attention_triton import paged_attention_triton
        return paged_attention_triton(q, k_cache, v_cache, metadata, scale, k_scale=k_scale, v_scale=v_scale)
    return paged_attention_torch(q, k_cache, v_cache, metadata, scale, k_scale=k_scale, v_scale=v_scale)
