"""The CPU fast paths of the torch ops equal the plain formulas they replace.

The ops in nanovllm/ops/*.py are both the CPU backend and the references the Triton kernels are
tested against, so a faster way of computing one must give the same numbers: here each is checked
against the formula written out plainly (bit for bit where the arithmetic is the same).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nanovllm.ops.activation import silu_and_mul_torch
from nanovllm.ops.attention import AttentionMetadata, paged_attention_torch, store_kvcache_torch
from nanovllm.ops.quant import PackedLinear, top_k_indices
from nanovllm.ops.rmsnorm import rms_norm_torch
from nanovllm.ops.rotary import _joint_qk, apply_rotary_torch, rope_cos_sin_cache, rope_inv_freq


def plain_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def plain_rotary(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> torch.Tensor:
    cos, sin = cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


@pytest.mark.parametrize("shape", [(1, 576), (3, 37), (17, 128), (4, 3, 16)])   # [T, H] or per head [T, Hq, D]
def test_rms_norm_of_float32_is_the_formula_bit_for_bit(shape):
    torch.manual_seed(shape[0])
    x, weight = torch.randn(shape) * 3, torch.randn(shape[-1])
    assert torch.equal(rms_norm_torch(x, weight, 1e-6), plain_rms_norm(x, weight, 1e-6))


@pytest.mark.parametrize("shape, eps", [((5, 64), 1e-5), ((4, 3, 16), 0.5)])   # a large eps shows where it is added
def test_rms_norm_of_bfloat16_keeps_the_formula(shape, eps):
    x, weight = (torch.randn(shape) * 0.5).to(torch.bfloat16), torch.randn(shape[-1]).to(torch.bfloat16)
    assert torch.equal(rms_norm_torch(x, weight, eps), plain_rms_norm(x, weight, eps))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens, num_heads, num_kv_heads, head_dim", [(1, 9, 3, 64), (6, 4, 2, 32), (3, 2, 2, 16)])
@pytest.mark.parametrize("fused", [True, False])
def test_rotary_is_the_rotate_half_formula_bit_for_bit(dtype, num_tokens, num_heads, num_kv_heads, head_dim, fused):
    """q and k as views of one fused qkv row (rotated in one pass) or as separate tensors."""
    torch.manual_seed(num_tokens)
    cache = rope_cos_sin_cache(head_dim, 2048, 10000.0, None)
    positions = torch.randint(0, 2048, (num_tokens,))
    if fused:
        qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim).to(dtype)
        q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
        q, k, v = (t.view(num_tokens, -1, head_dim) for t in (q, k, v))
        v_before = v.clone()
    else:
        q = torch.randn(num_tokens, num_heads, head_dim).to(dtype)
        k = torch.randn(num_tokens, num_kv_heads, head_dim).to(dtype)
    want_q, want_k = plain_rotary(q, positions, cache), plain_rotary(k, positions, cache)
    got_q, got_k = apply_rotary_torch(q, k, positions, cache)
    assert got_q is q and got_k is k                       # in place
    assert torch.equal(q, want_q) and torch.equal(k, want_k)
    if fused:
        assert torch.equal(v, v_before)                    # v, beside k in the same rows, is left alone


def llama3_inv_freq_reference(head_dim: int, theta: float, factor: float, low_freq_factor: float,
                              high_freq_factor: float, old_context: float) -> list[float]:
    """Meta's `apply_scaling` (Llama 3.1), one frequency at a time in float64."""
    scaled = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high_freq_factor:
            scaled.append(freq)
        elif wavelen > old_context / low_freq_factor:
            scaled.append(freq / factor)
        else:
            smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            scaled.append((1 - smooth) * freq / factor + smooth * freq)
    return scaled


@pytest.mark.parametrize("scaling, reference", [
    (None, (64, 500000.0, 1.0, 1.0, 4.0, 8192.0)),
    ({"rope_type": "llama3", "factor": 32.0}, (64, 500000.0, 32.0, 1.0, 4.0, 8192.0)),     # the defaults
    ({"rope_type": "llama3", "factor": 8, "low_freq_factor": 2, "high_freq_factor": 8,
      "original_max_position_embeddings": 4096}, (64, 500000.0, 8.0, 2.0, 8.0, 4096.0)),
])
def test_llama3_rope_frequencies_are_metas_formula(scaling, reference):
    want = torch.tensor(llama3_inv_freq_reference(*reference), dtype=torch.float64)
    got = rope_inv_freq(64, 500000.0, scaling)
    assert got.dtype == torch.float32 and got.shape == (32,)
    if scaling is not None:      # every band is present: unscaled, smoothed and divided by the factor
        wavelen = 2 * math.pi / want
        assert (wavelen < 8192 / 8).any() and (wavelen > 8192).any()
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=0.0)


def test_linear_rope_divides_every_frequency_and_other_types_are_refused():
    plain = rope_inv_freq(16, 10000.0, None)
    assert torch.equal(rope_inv_freq(16, 10000.0, {"rope_type": "linear", "factor": 4}), plain / 4.0)
    with pytest.raises(ValueError, match=r"rope_scaling type 'yarn' is not supported \(supported: llama3, linear\)"):
        rope_inv_freq(16, 10000.0, {"rope_type": "yarn", "factor": 4})


def test_the_cos_sin_cache_holds_cos_then_sin_of_position_times_frequency():
    cache = rope_cos_sin_cache(8, 5, 100.0, {"rope_type": "linear", "factor": 2.0})
    angles = torch.arange(5, dtype=torch.float64)[:, None] * (0.5 / 100.0 ** (torch.arange(0, 8, 2) / 8))[None, :]
    assert cache.shape == (5, 8) and cache.dtype == torch.float32
    torch.testing.assert_close(cache.double(), torch.cat([angles.cos(), angles.sin()], dim=-1), rtol=1e-6, atol=1e-6)


def test_q_and_k_are_rotated_as_one_view_only_when_k_follows_q_in_every_row():
    qkv = torch.randn(3, (4 + 2 + 2) * 8)
    q, k, _ = (t.view(3, -1, 8) for t in qkv.split([32, 16, 16], dim=-1))
    joint = _joint_qk(q, k)
    assert joint is not None and joint.shape == (3, 6, 8) and torch.equal(joint, torch.cat([q, k], dim=1))
    assert _joint_qk(q[:1], k[:1]) is not None                            # one row: its stride is arbitrary
    assert _joint_qk(q, torch.randn(3, 2, 8)) is None                     # k elsewhere
    assert _joint_qk(q, qkv[:, 40:56].view(3, 2, 8)) is None              # k not right after q
    assert _joint_qk(q[:, :, :4], k[:, :, :4]) is None                    # heads not contiguous
    exact = torch.randn(3, 2 * 8 + 8)                                     # rows holding just q and k
    assert _joint_qk(exact[:, :16].view(3, 2, 8), exact[:, 16:].view(3, 1, 8)) is not None
    flat = torch.randn(3 * 16 + 8)                                        # k after q, but rows overlap
    for rows in (3, 2):
        overlapping_q = flat.as_strided((rows, 2, 8), (16, 8, 1))
        assert _joint_qk(overlapping_q, flat[16:].as_strided((rows, 1, 8), (16, 8, 1))) is None
    spread_q = flat.as_strided((3, 2, 4), (16, 8, 1))                    # heads 8 apart, 4 wide; k right after
    assert _joint_qk(spread_q, flat.as_strided((3, 1, 4), (16, 4, 1), storage_offset=8)) is None


def test_qwen3_head_norm_then_rotary_is_the_formula():
    from nanovllm.ops.rotary import qk_norm_rotary_torch
    torch.manual_seed(6)
    cache = rope_cos_sin_cache(16, 64, 10000.0, None)
    q, k, positions = torch.randn(5, 4, 16), torch.randn(5, 2, 16), torch.tensor([0, 3, 9, 10, 63])
    q_weight, k_weight = torch.randn(16), torch.randn(16)
    want_q = plain_rotary(plain_rms_norm(q, q_weight, 0.5), positions, cache)
    want_k = plain_rotary(plain_rms_norm(k, k_weight, 0.5), positions, cache)
    qk_norm_rotary_torch(q, k, positions, cache, q_weight, k_weight, 0.5)
    torch.testing.assert_close(q, want_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k, want_k, rtol=1e-6, atol=1e-6)


def test_the_fused_residual_add_and_norm_takes_a_sum_or_partial_sums():
    from nanovllm.ops.rmsnorm import add_rms_norm_torch
    torch.manual_seed(7)
    x, residual, weight = torch.randn(3, 32), torch.randn(3, 32), torch.randn(32)
    normed, summed = add_rms_norm_torch(x, residual, weight, 0.5)
    assert torch.equal(summed, x + residual) and torch.equal(normed, plain_rms_norm(x + residual, weight, 0.5))
    partials, residual16 = torch.randn(4, 3, 32), residual.to(torch.bfloat16)
    normed, summed = add_rms_norm_torch(partials, residual16, weight.to(torch.bfloat16), 0.5)
    assert summed.dtype == torch.bfloat16
    assert torch.equal(summed, (partials.sum(0) + residual16.float()).to(torch.bfloat16))
    assert torch.equal(normed, plain_rms_norm(summed, weight.to(torch.bfloat16), 0.5))


def test_rotary_store_and_attend_is_rotary_and_store_then_paged_attention():
    from nanovllm.ops.rotary import rotary_and_store_kv_torch, rotary_store_and_attend_torch
    q_rest, k_cache, v_cache, metadata = _decode_batch([9, 30, 21], 4, 2, 16, 8, seed=8)
    cache, positions = rope_cos_sin_cache(16, 64, 10000.0, None), metadata.seq_lens.long() - 1
    metadata.slot_mapping = torch.tensor([int(metadata.block_tables[b, (n - 1) // 8]) * 8 + (n - 1) % 8
                                          for b, n in enumerate(metadata.seq_lens.tolist())])
    k, v = torch.randn(3, 2, 16), torch.randn(3, 2, 16)
    want_caches = k_cache.clone(), v_cache.clone()
    want_q, _ = rotary_and_store_kv_torch(q_rest.clone(), k.clone(), v, positions, cache, *want_caches,
                                          metadata.slot_mapping)
    want = paged_attention_torch(want_q, *want_caches, metadata, 0.3)
    got = rotary_store_and_attend_torch(q_rest.clone(), k.clone(), v, positions, cache, k_cache, v_cache, metadata, 0.3)
    assert torch.equal(got, want) and torch.equal(k_cache, want_caches[0])


def test_silu_and_mul_is_the_formula_bit_for_bit():
    x = torch.randn(5, 2 * 48)
    gate, up = x.chunk(2, dim=-1)
    assert torch.equal(silu_and_mul_torch(x), F.silu(gate) * up)


def _decode_batch(context_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                  seed: int):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in context_lens) + 3
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    order = torch.randperm(num_blocks, generator=gen)
    max_blocks = max(-(-n // block_size) for n in context_lens) + 1
    block_tables = torch.full((len(context_lens), max_blocks), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(context_lens):
        needed = -(-n // block_size)
        block_tables[b, :needed] = order[used:used + needed].to(torch.int32)
        used += needed
    batch = len(context_lens)
    metadata = AttentionMetadata(query_start_loc=torch.arange(batch + 1, dtype=torch.int32),
                                 seq_lens=torch.tensor(context_lens, dtype=torch.int32),
                                 slot_mapping=torch.zeros(batch, dtype=torch.int64), block_tables=block_tables,
                                 max_query_len=1, max_seq_len=max(context_lens))
    q = torch.randn(batch, num_heads, head_dim, generator=gen)
    return q, k_cache, v_cache, metadata


def plain_decode_attention(q, k_cache, v_cache, metadata, scale):
    """Each sequence's keys read slot by slot through its block table, softmax written out."""
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // num_kv_heads
    out = torch.empty_like(q)
    for b, seq_len in enumerate(metadata.seq_lens.tolist()):
        slots = [int(metadata.block_tables[b, i // block_size]) * block_size + i % block_size for i in range(seq_len)]
        k = k_cache.flatten(0, 1)[slots].repeat_interleave(group, dim=1)     # [L, Hq, D]
        v = v_cache.flatten(0, 1)[slots].repeat_interleave(group, dim=1)
        weights = torch.softmax(torch.einsum("hd,lhd->hl", q[b], k) * scale, dim=-1)
        out[b] = torch.einsum("hl,lhd->hd", weights, v)
    return out


@pytest.mark.parametrize("context_lens, num_heads, num_kv_heads, head_dim, block_size",
                         [([192], 9, 3, 64, 16), ([5, 40, 17, 33], 4, 2, 32, 4), ([16, 16, 16], 8, 8, 16, 16)])
def test_decode_attention_matches_the_plain_formula(context_lens, num_heads, num_kv_heads, head_dim, block_size):
    q, k_cache, v_cache, metadata = _decode_batch(context_lens, num_heads, num_kv_heads, head_dim, block_size, seed=1)
    got = paged_attention_torch(q, k_cache, v_cache, metadata, 0.125)
    torch.testing.assert_close(got, plain_decode_attention(q, k_cache, v_cache, metadata, 0.125),
                               rtol=1e-5, atol=1e-5)


def test_decode_context_is_derived_once_per_step_and_again_for_a_new_step():
    q, k_cache, v_cache, metadata = _decode_batch([9, 30, 21], 4, 2, 32, 8, seed=2)
    first = paged_attention_torch(q, k_cache, v_cache, metadata, 0.2)
    context = metadata.decode_context
    assert context is not None and context.mask is not None          # lengths differ: a padding mask
    assert torch.equal(paged_attention_torch(q, k_cache, v_cache, metadata, 0.2), first)
    assert metadata.decode_context is context                        # the next layer reuses it
    longer = AttentionMetadata(metadata.query_start_loc, metadata.seq_lens + 1, metadata.slot_mapping,
                               metadata.block_tables, 1, metadata.max_seq_len + 1)
    torch.testing.assert_close(paged_attention_torch(q, k_cache, v_cache, longer, 0.2),
                               plain_decode_attention(q, k_cache, v_cache, longer, 0.2), rtol=1e-5, atol=1e-5)
    assert longer.decode_context is not context
    shorter = AttentionMetadata(longer.query_start_loc, longer.seq_lens, longer.slot_mapping, longer.block_tables, 1,
                                longer.max_seq_len - 1)                  # the same tensors, another max_seq_len
    shorter.decode_context = longer.decode_context
    paged_attention_torch(q, k_cache, v_cache, shorter, 0.2)
    assert shorter.decode_context is not longer.decode_context


def test_decode_attention_reads_a_bfloat16_cache_for_float32_queries():
    q, k_cache, v_cache, metadata = _decode_batch([9, 30, 21], 4, 2, 32, 8, seed=4)
    k_cache, v_cache = k_cache.to(torch.bfloat16), v_cache.to(torch.bfloat16)
    got = paged_attention_torch(q, k_cache, v_cache, metadata, 0.2)
    want = plain_decode_attention(q, k_cache.float(), v_cache.float(), metadata, 0.2)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_one_sequence_with_consecutive_blocks_is_read_in_place():
    q, k_cache, v_cache, metadata = _decode_batch([45], 6, 2, 32, 8, seed=3)
    metadata.block_tables[0, :6] = torch.arange(2, 8, dtype=torch.int32)    # blocks 2..7, in order
    got = paged_attention_torch(q, k_cache, v_cache, metadata, 0.3)
    assert metadata.decode_context.first_block == 2
    torch.testing.assert_close(got, plain_decode_attention(q, k_cache, v_cache, metadata, 0.3), rtol=1e-5, atol=1e-5)
    scattered = AttentionMetadata(metadata.query_start_loc, metadata.seq_lens, metadata.slot_mapping,
                                  metadata.block_tables[:, [0, 2, 1, 3, 4, 5, 6]], 1, metadata.max_seq_len)
    paged_attention_torch(q, k_cache, v_cache, scattered, 0.3)
    assert scattered.decode_context.first_block is None


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_prefill_chunks_attend_causally_to_their_whole_context_through_the_block_table(cache_dtype):
    """A mixed step: a whole prompt, a sequence with no new token, a chunk after 15 cached tokens and a
    decode; GQA with 2 query heads per KV head; the cache in float32 or bfloat16, the queries in float32."""
    gen = torch.Generator().manual_seed(5)
    seq_lens, query_lens, block_size, num_heads, num_kv_heads, head_dim = [7, 6, 20, 9], [7, 0, 5, 1], 4, 4, 2, 16
    k_cache = torch.randn(24, block_size, num_kv_heads, head_dim, generator=gen).to(cache_dtype)
    v_cache = torch.randn(24, block_size, num_kv_heads, head_dim, generator=gen).to(cache_dtype)
    block_tables = torch.randperm(24, generator=gen)[:4 * 6].view(4, 6).to(torch.int32)
    block_tables[0, 2:] = -1                                              # padding past a sequence's blocks
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    metadata = AttentionMetadata(query_start_loc=torch.tensor(starts, dtype=torch.int32),
                                 seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                                 slot_mapping=torch.zeros(starts[-1], dtype=torch.int64), block_tables=block_tables,
                                 max_query_len=max(query_lens), max_seq_len=max(seq_lens))
    q = torch.randn(starts[-1], num_heads, head_dim, generator=gen)
    got = paged_attention_torch(q, k_cache, v_cache, metadata, 0.3)
    for b, (seq_len, q_len) in enumerate(zip(seq_lens, query_lens)):
        slots = [int(block_tables[b, i // block_size]) * block_size + i % block_size for i in range(seq_len)]
        k = k_cache.flatten(0, 1)[slots].float().repeat_interleave(2, dim=1)     # [L, Hq, D]
        v = v_cache.flatten(0, 1)[slots].float().repeat_interleave(2, dim=1)
        for i in range(q_len):
            position = seq_len - q_len + i                                # sees keys 0..position
            weights = torch.softmax(torch.einsum("hd,lhd->hl", q[starts[b] + i], k[:position + 1]) * 0.3, dim=-1)
            want = torch.einsum("hl,lhd->hd", weights, v[:position + 1])
            torch.testing.assert_close(got[starts[b] + i], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_new_keys_and_values_land_in_their_slots_and_padding_slots_are_skipped(cache_dtype):
    k_cache, v_cache = torch.zeros(3, 4, 2, 8, dtype=cache_dtype), torch.zeros(3, 4, 2, 8, dtype=cache_dtype)
    k, v = torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    store_kvcache_torch(k, v, k_cache, v_cache, torch.tensor([5, -1, 0, 11]))
    assert torch.equal(k_cache.view(12, 2, 8)[[5, 0, 11]], k[[0, 2, 3]].to(cache_dtype))
    assert torch.equal(v_cache.view(12, 2, 8)[[5, 0, 11]], v[[0, 2, 3]].to(cache_dtype))
    assert int((k_cache.view(12, -1).abs().sum(-1) > 0).sum()) == 3
    store_kvcache_torch(k[:0], v[:0], k_cache, v_cache, torch.tensor([], dtype=torch.int64))   # an empty step


def test_int8_packed_linear_above_max_packed_rows_is_the_bfloat16_matmul_bit_for_bit():
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 64), torch.randn(48).to(torch.bfloat16)
    layer = PackedLinear.from_weight(weight, "int8", bias=bias, max_packed_rows=2)
    for rows in (3, 16, 40):
        x = torch.randn(rows, 64)
        want = F.linear(x.to(torch.bfloat16), weight.to(torch.bfloat16), bias).float()
        assert torch.equal(layer(x), want)


@pytest.mark.parametrize("rows, vocab_size, k", [(1, 49152, 32), (16, 49152, 32), (3, 4096, 5), (2, 1000, 32),
                                                (2, 512, 32)])   # 8 chunks for 32 tokens: no chunked search
def test_top_k_indices_are_the_top_k_set(rows, vocab_size, k):
    torch.manual_seed(rows)
    scores = torch.randn(rows, vocab_size) * 4
    scores[0, :64] += 20             # a chunk holding many of row 0's best
    got = top_k_indices(scores, k).sort(dim=-1).values
    assert torch.equal(got, scores.topk(k, dim=-1).indices.sort(dim=-1).values)


# ---- products split along K (ops/linear.py) ------------------------------------------------

@pytest.mark.parametrize("rows,n,k,splits", [(1, 37, 64, 4), (3, 5, 96, 8), (8, 130, 256, 2)])
def test_split_k_partial_products_add_up_to_the_product(rows, n, k, splits):
    from nanovllm.ops.linear import linear_partials
    x, weight = torch.randn(rows, k), torch.randn(n, k)
    partials = linear_partials(x, weight, splits)
    assert partials.shape == (splits, rows, n) and partials.dtype == torch.float32
    torch.testing.assert_close(partials.sum(0), x @ weight.T, rtol=1e-5, atol=1e-4)


def test_split_k_count_splits_only_few_row_products_with_too_few_tiles_on_a_gpu(monkeypatch):
    import nanovllm.ops.linear as linear
    monkeypatch.setattr(linear, "sm_count", lambda device: 132)                   # an H200
    gpu = torch.device("cuda", 0)
    # Llama-3.2-1B at batch 1: o and down (32 tiles of 64 columns) split 4 ways; gate_up (256) not at all
    assert [linear.split_k_count(1, n, k, gpu) for n, k in [(2048, 2048), (2048, 8192), (16384, 2048)]] == [4, 4, 1]
    assert linear.split_k_count(1, 1024, 3072, gpu) == 8                     # Qwen3-0.6B's down: 16 tiles
    assert linear.split_k_count(linear.SPLIT_K_MAX_ROWS + 1, 2048, 2048, gpu) == 1     # enough rows: plain
    assert linear.split_k_count(1, 2048, 2048, torch.device("cpu")) == 1               # never on the CPU
    assert linear.split_k_count(16, 2048, 2048, gpu) == 4
    assert linear.split_k_count(1, 64, 768, gpu) == 2          # slices of K stay >= 256 and divide K
    assert linear.split_k_count(1, 64, 300, gpu) == 1
    assert linear.split_k_count(1, 64, 1024, gpu) == 4         # slices of exactly 256
    assert [linear.split_k_count(1, 64, k, gpu) for k in (1025, 1026)] == [1, 2]   # odd K; K / 2 odd
    assert linear.split_k_count(1, 256, 8192, gpu) == 8        # 4 tiles: 8 slices at most
    assert linear.split_k_count(1, 2112, 2048, gpu) == 4       # 33 tiles: 4 slices fill the 132 SMs exactly
    assert linear.split_k_count(1, 1025, 4096, gpu) == 4       # 1025 columns are 17 tiles, not 16.02


def test_linear_or_partials_leaves_biased_and_quantized_layers_whole(monkeypatch):
    import nanovllm.ops.linear as linear
    monkeypatch.setattr(linear, "split_k_count", lambda rows, n, k, device: 4)
    x = torch.randn(2, 64)
    plain, biased = torch.nn.Linear(64, 8, bias=False), torch.nn.Linear(64, 8)
    packed = PackedLinear.from_weight(torch.randn(8, 64), "int8")
    assert linear.linear_or_partials(x, plain).shape == (4, 2, 8)
    assert linear.linear_or_partials(x, biased).shape == (2, 8)
    assert linear.linear_or_partials(x, packed).shape == (2, 8)
    assert linear.linear_or_partials(x, plain, may_split=False).shape == (2, 8)     # tensor parallel
    monkeypatch.setattr(linear, "split_k_count", lambda rows, n, k, device: 2)
    assert linear.linear_or_partials(x, plain).shape == (2, 2, 8)

    class SplitsItself(torch.nn.Module):                  # a quantized layer decides its own split
        def forward_or_partials(self, x: torch.Tensor) -> torch.Tensor:
            return x[None].expand(3, -1, -1)

    assert torch.equal(linear.linear_or_partials(x, SplitsItself()), x[None].expand(3, -1, -1))


def test_linear_or_partials_on_the_cpu_is_the_layer_itself():
    from nanovllm.ops.linear import linear_or_partials
    layer, x = torch.nn.Linear(64, 8, bias=False), torch.randn(2, 64)
    assert torch.equal(linear_or_partials(x, layer), layer(x))
