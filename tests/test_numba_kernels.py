"""Each numba CPU kernel against its torch reference, on random inputs of odd sizes, and the
property it exists for: a row's result does not depend on the rows beside it."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

pytest.importorskip("numba")

from nanovllm.ops import attention_numba, int4_numba_supported, numba_ir, quant_numba  # noqa: E402
from nanovllm.ops.attention import AttentionMetadata, paged_attention_torch  # noqa: E402
from nanovllm.ops.attention_numba import paged_attention_numba, rotary_store_and_attend_numba  # noqa: E402
from nanovllm.ops.quant import PackedLinear, pack_int4  # noqa: E402
from nanovllm.ops.quant_numba import (int4_linear_numba, int4_linear_int16_torch, tiles_from_codes,  # noqa: E402
                                      unpack_torch_int4)
from nanovllm.ops.rotary import rope_cos_sin_cache, rotary_store_and_attend_torch  # noqa: E402
from nanovllm.ops.sampling_numba import greedy_sample_numba, log_normalizer_numba  # noqa: E402


def _random_step(query_lens: list[int], context_lens: list[int], num_heads: int, num_kv_heads: int,
                 head_dim: int, block_size: int, seed: int):
    """A step of sequences with query_lens new tokens each, contexts of context_lens tokens (new ones
    included), their blocks scattered over a pool; -> (q [T, Hq, D], k_cache, v_cache, metadata)."""
    generator = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-length // block_size) for length in context_lens]
    num_blocks = sum(blocks_per_seq) + 3
    order = torch.randperm(num_blocks, generator=generator).to(torch.int32)
    block_tables = torch.full((len(context_lens), max(blocks_per_seq) + 1), -1, dtype=torch.int32)
    used = 0
    for b, count in enumerate(blocks_per_seq):
        block_tables[b, :count] = order[used:used + count]
        used += count
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator)
    q = torch.randn(sum(query_lens), num_heads, head_dim, generator=generator)
    query_start_loc = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    metadata = AttentionMetadata(query_start_loc=query_start_loc,
                                 seq_lens=torch.tensor(context_lens, dtype=torch.int32),
                                 slot_mapping=torch.zeros(sum(query_lens), dtype=torch.int64),
                                 block_tables=block_tables, max_query_len=max(query_lens),
                                 max_seq_len=max(context_lens))
    return q, k_cache, v_cache, metadata


@pytest.mark.parametrize("query_lens, context_lens, num_heads, num_kv_heads, head_dim, block_size", [
    ([1], [1], 1, 1, 8, 4),                        # a single key
    ([1, 1, 1], [37, 5, 64], 6, 2, 24, 8),         # decodes of ragged contexts, GQA
    ([7], [7], 3, 3, 40, 16),                      # a prompt in one chunk
    ([5, 1, 13], [21, 9, 13], 9, 3, 64, 4),        # chunks on top of cached context beside a decode
    ([3, 1], [19, 40], 4, 2, 128, 16),             # head_dim 128 (the vector path), a block cut short
    ([2, 1], [9, 23], 10, 2, 64, 8),               # 5 heads a KV head: runs of 4 and 1
    ([1, 2], [30, 17], 12, 2, 128, 8),             # 6 heads a KV head at 128: runs of 2
])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_numba_paged_attention_matches_the_torch_reference(query_lens, context_lens, num_heads, num_kv_heads,
                                                           head_dim, block_size, cache_dtype):
    q, k_cache, v_cache, metadata = _random_step(query_lens, context_lens, num_heads, num_kv_heads, head_dim,
                                                 block_size, seed=sum(context_lens))
    k_cache, v_cache = k_cache.to(cache_dtype), v_cache.to(cache_dtype)    # the reference widens them to q's
    want = paged_attention_torch(q, k_cache, v_cache, metadata, head_dim ** -0.5)
    got = paged_attention_numba(q, k_cache, v_cache, metadata, head_dim ** -0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_vectorized_exp_matches_torch_within_float32_rounding():
    """exp_shifted_into (a polynomial and a power of two, vectorized; the softmax's and SiLU's exp) against
    torch.exp, over the range it keeps, on slices of odd lengths (values past a slice's end untouched),
    and clamped beyond that range."""
    import numpy as np
    x = torch.cat([torch.linspace(-87.0, 88.0, 7001), torch.tensor([0.0, -1e-7, 1e-7, -0.5, 0.6931, -86.9])])
    for length in (1, 37, 64, 130):
        for start in range(0, x.numel() - length, 7 * length):
            buffer = np.full(length + 3, 7.0, np.float32)
            buffer[:length] = x[start:start + length].numpy() + 2.0
            want = torch.from_numpy(buffer[:length].copy()).double().sub(2.0).exp()      # of the float32 inputs
            numba_ir.exp_shifted_into(buffer[:length], np.float32(2.0))
            got = torch.from_numpy(buffer[:length].copy()).double()
            assert torch.allclose(got, want, rtol=4e-7, atol=0.0), (got - want).abs().div(want).max()
            assert (buffer[length:] == 7.0).all()
    edges = np.array([-200.0, -87.0, 88.0, 500.0], np.float32)
    numba_ir.exp_shifted_into(edges, np.float32(0.0))
    assert torch.allclose(torch.from_numpy(edges).double(), torch.tensor([-87.0, -87.0, 88.0, 88.0]).double().exp(),
                          rtol=1e-6)


@pytest.mark.parametrize("vocab_size", [1, 7, 49157])
def test_numba_log_normalizer_matches_torch_logsumexp(vocab_size):
    generator = torch.Generator().manual_seed(vocab_size)
    logits = torch.randn(6, vocab_size, generator=generator) * 8
    logits[1, ::2] = float("-inf")                           # masked tokens
    logits[2] = float("-inf")                                # every token masked: -inf
    logits[3, -1] = float("inf")                             # +inf
    logits[4, 0] = -float("nan")                             # NaN anywhere, of either sign: NaN
    logits[5] += 500.0                                       # far from 0: only the differences count
    want = torch.logsumexp(logits, dim=-1)
    got = log_normalizer_numba(logits)
    torch.testing.assert_close(got, want, rtol=2e-7, atol=0, equal_nan=True)
    assert torch.equal(log_normalizer_numba(logits[5:]), got[5:])     # a row alone: the same bits


@pytest.mark.parametrize("vocab_size", [1, 7, 200, 49157])
def test_numba_greedy_sampling_gives_the_torch_paths_tokens_logprobs_and_normalizers(vocab_size):
    generator = torch.Generator().manual_seed(vocab_size)
    logits = torch.randn(7, vocab_size, generator=generator) * 8
    logits[1, 3 * vocab_size // 4:] = float("nan")           # NaNs: the first NaN, as torch's argmax
    logits[1, vocab_size // 3] = float("nan")
    logits[2] = float("-inf")                                # every token masked but a tie: the first
    logits[2, [vocab_size // 2, vocab_size - 1]] = 2.0
    logits[3, -1] = float("inf")                             # +inf
    logits[4, -1] = 1e4                                      # the maximum in the last run of values
    logits[5] += 500.0
    logits[6, 0] = 1e4                                       # ... and in the first
    tokens, logprobs, normalizers = greedy_sample_numba(logits)
    assert torch.equal(tokens, logits.argmax(dim=-1))
    assert torch.equal(normalizers.nan_to_num(7.0), log_normalizer_numba(logits).nan_to_num(7.0))
    want = logits.gather(1, tokens[:, None]).squeeze(1) - normalizers
    assert torch.equal(logprobs.nan_to_num(7.0), want.nan_to_num(7.0))
    out = torch.full((9,), -5, dtype=torch.int64), torch.full((9,), -5.0)     # the sampler's buffers
    alone = greedy_sample_numba(logits[4:5], (out[0][2:3], out[1][2:3]))
    assert alone[0].data_ptr() == out[0][2:3].data_ptr() and out[0].tolist() == [-5, -5, int(tokens[4])] + [-5] * 6
    assert torch.equal(out[1][2:3], logprobs[4:5])                          # a row alone: the same bits


@pytest.mark.parametrize("head_dim, cache_dtype", [(32, torch.float32), (64, torch.float32), (64, torch.float16)])
def test_numba_paged_attention_gives_a_query_the_same_bits_decoded_alone_batched_or_prefilled(head_dim,
                                                                                              cache_dtype):
    # Sequence 0 has 29 tokens. Its last query, decoded alone...
    q, k_cache, v_cache, alone = _random_step([1], [29], 6, 2, head_dim, 4, seed=1)
    k_cache, v_cache = k_cache.to(cache_dtype), v_cache.to(cache_dtype)
    want = paged_attention_numba(q, k_cache, v_cache, alone, 0.2)
    # ...beside two longer decodes (a padded batch for SDPA)...
    others = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, -1], [7, 6, 5, 4, 3, 2, 1, 0, -1]], dtype=torch.int32)
    tables = torch.cat([alone.block_tables, others])
    batch = AttentionMetadata(torch.tensor([0, 1, 2, 3], dtype=torch.int32),
                              torch.tensor([29, 32, 31], dtype=torch.int32), torch.zeros(3, dtype=torch.int64),
                              tables, 1, 32)
    batched = paged_attention_numba(torch.cat([q, torch.randn(2, 6, head_dim)]), k_cache, v_cache, batch, 0.2)
    assert torch.equal(batched[:1], want)
    # ...and as the last row of a 29-token prefill.
    prefill = AttentionMetadata(torch.tensor([0, 29], dtype=torch.int32), torch.tensor([29], dtype=torch.int32),
                                torch.zeros(29, dtype=torch.int64), alone.block_tables, 29, 29)
    rows = torch.cat([torch.randn(28, 6, head_dim), q])
    assert torch.equal(paged_attention_numba(rows, k_cache, v_cache, prefill, 0.2)[-1:], want)


@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize("query_lens, context_lens", [([4, 1, 1], [40, 17, 33]), ([1], [40])])
def test_numba_paged_attention_gives_the_same_bits_on_one_thread_or_split_over_threads(monkeypatch, head_dim,
                                                                                       query_lens, context_lens):
    # A small step runs serially (a parallel launch costs more than its work), a row at a time; a large one
    # is split, by rows where there are enough of them and else by (row, KV head) (kv_heads_per_item).
    q, k_cache, v_cache, metadata = _random_step(query_lens, context_lens, 6, 2, head_dim, 4, seed=9)
    serial = paged_attention_numba(q, k_cache, v_cache, metadata, 0.2)
    monkeypatch.setattr(attention_numba, "PARALLEL_MIN_WORK", 0)
    assert torch.equal(paged_attention_numba(q, k_cache, v_cache, metadata, 0.2), serial)


def test_attention_items_are_whole_rows_only_where_the_rows_keep_every_worker_busy():
    assert attention_numba.kv_heads_per_item(8, 3, 4) == 3
    assert attention_numba.kv_heads_per_item(7, 3, 4) == 1
    assert attention_numba.kv_heads_per_item(1, 3, 1) == 1


def test_numba_paged_attention_runs_from_several_threads_at_once(monkeypatch):
    monkeypatch.setattr(attention_numba, "PARALLEL_MIN_WORK", 0)      # the parallel kernel, which takes a lock
    # Engines may step in threads of one process; numba's workqueue pool takes one kernel at a time.
    q, k_cache, v_cache, metadata = _random_step([3, 1], [40, 17], 4, 2, 16, 4, seed=5)
    want = paged_attention_numba(q, k_cache, v_cache, metadata, 0.25)
    results: list[bool] = []

    def attend() -> None:
        results.extend(torch.equal(paged_attention_numba(q, k_cache, v_cache, metadata, 0.25), want)
                       for _ in range(40))

    threads = [threading.Thread(target=attend) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [True] * 120


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("query_lens, context_lens, num_heads, num_kv_heads, head_dim, block_size, cache_dtype", [
    ([1, 1], [19, 3], 4, 2, 16, 4, torch.float32),                # decodes
    ([6, 1], [11, 30], 6, 3, 40, 8, torch.float32),               # a chunk on top of cached context beside a decode
    ([6, 1], [11, 30], 6, 3, 64, 8, torch.float16),               # the same into a float16 cache, vector path
])
def test_numba_rotary_store_and_attend_matches_the_torch_reference(qk_norm, query_lens, context_lens, num_heads,
                                                                   num_kv_heads, head_dim, block_size, cache_dtype):
    _, k_cache, v_cache, metadata = _random_step(query_lens, context_lens, num_heads, num_kv_heads, head_dim,
                                                 block_size, seed=len(context_lens) + head_dim)
    k_cache, v_cache = k_cache.to(cache_dtype), v_cache.to(cache_dtype)
    starts = metadata.query_start_loc.tolist()
    positions = torch.cat([torch.arange(length - (end - start), length)
                           for start, end, length in zip(starts, starts[1:], context_lens)])
    slots = torch.tensor([int(metadata.block_tables[b, p // block_size]) * block_size + p % block_size
                          for b, (start, end) in enumerate(zip(starts, starts[1:]))
                          for p in positions[start:end].tolist()])
    slots[-1] = -1                                  # a padding row: its k and v are not stored
    metadata.slot_mapping = slots
    qkv = torch.randn(len(positions), num_heads + 2 * num_kv_heads, head_dim)   # the fused projection's rows
    qkv[0, num_heads + num_kv_heads:] *= 1e4      # v near float16's top (65504), where its steps are 16 and 32
    cos_sin = rope_cos_sin_cache(head_dim, 64, 10000.0, None)
    norms = (torch.rand(head_dim) + 0.5, torch.rand(head_dim) + 0.5, 1e-6) if qk_norm else (None, None, 0.0)
    results = []
    for attend in (rotary_store_and_attend_torch, rotary_store_and_attend_numba):
        caches = (k_cache.clone(), v_cache.clone())
        q, k, v = qkv.clone().split([num_heads, num_kv_heads, num_kv_heads], dim=1)
        results.append((attend(q, k, v, positions, cos_sin, *caches, metadata, head_dim ** -0.5, *norms), *caches))
    (want, want_k, want_v), (got, got_k, got_v) = results
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)   # RoPE and the store: the same bits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---- the int4 matmul (quant_numba.py) ----------------------------------------------------------

int4_kernel = pytest.mark.skipif(not int4_numba_supported(), reason="numba's int4 kernel needs AVX-512 VNNI")


def _random_int4(out_features: int, in_features: int, seed: int):
    """-> (codes [N, K] in 0..15, scale, low [N, K / 32]) of a random Q4_1-style weight."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out_features, in_features), generator=generator)
    scale = torch.rand(out_features, in_features // 32, generator=generator) * 0.1
    low = torch.randn(out_features, in_features // 32, generator=generator) * 0.2
    return q, scale, low


@pytest.mark.parametrize("levels", [quant_numba.ACTIVATION_LEVELS, quant_numba.INT8_LEVELS])
@pytest.mark.parametrize("rows, in_features", [(1, 32), (3, 96), (5, 1536)])
def test_numba_activation_rounding_matches_its_reference(rows, in_features, levels):
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_features, generator=generator) * 3
    x[0, :32] = 0.0                                          # an all-zero group: dx 0, xq 0
    x[-1, -32:] = torch.tensor([float(levels), 2.5, 3.5, -2.5, -0.5, 1e-3] + [0.25] * 26)   # dx 1: ties to even
    int16 = levels == quant_numba.ACTIVATION_LEVELS
    xq = np.empty((rows, in_features), np.int16 if int16 else np.int8)
    dx, sx = np.empty((rows, in_features // 32), np.float32), np.empty((rows, in_features // 32), np.float32)
    quant_numba._quantize_activation_into(x.numpy(), xq, dx, sx)
    want_xq, want_dx, want_sx = quant_numba.quantize_activation_torch(x, levels)
    natural = torch.from_numpy(xq)
    if int16:                                                # runs of 8 in _SLOT order (its own inverse)
        slot = torch.as_tensor(quant_numba._SLOT)
        natural = natural.reshape(rows, -1, 8)[..., slot].reshape(rows, in_features)
    assert torch.equal(natural, want_xq)
    assert torch.equal(torch.from_numpy(dx), want_dx)
    # sx is summed by halves (the reference in another order): within float32 rounding of the sum of |x|.
    bound = 4e-7 * x.abs().reshape(rows, -1, 32).sum(dim=-1)
    assert (torch.from_numpy(sx) - want_sx).abs().le(bound).all()


@int4_kernel
@pytest.mark.parametrize("rows, out_features, in_features", [
    (1, 16, 32),          # one tile, one group
    (3, 48, 96),          # three tiles
    (1, 192, 576),        # the embedded model's k/v projection
    (7, 80, 1536),        # ragged batch, down_proj's K
])
@pytest.mark.parametrize("activation_bits, error", [(16, 1e-4), (8, 2e-2)])
def test_numba_int4_linear_matches_its_reference(rows, out_features, in_features, activation_bits, error):
    q, scale, low = _random_int4(out_features, in_features, seed=rows + out_features)
    x = torch.randn(rows, in_features) * 3
    x[0, :32] = 0.0                                 # an all-zero group of the activation
    got = int4_linear_numba(x, tiles_from_codes(q, scale, low), activation_bits)
    levels = quant_numba.ACTIVATION_LEVELS if activation_bits == 16 else quant_numba.INT8_LEVELS
    want = int4_linear_int16_torch(x, q, scale, low, levels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    # The int16 activation keeps the product within 1e-4 of the float32 one, int8 within 2e-2.
    exact = x @ (q.float().reshape(out_features, -1, 32) * scale[..., None] + low[..., None]).reshape(
        out_features, in_features).T
    torch.testing.assert_close(got, exact, rtol=0, atol=error * exact.abs().max().item())


def test_activation_widths_other_than_8_and_16_bits_are_refused():
    assert quant_numba.activation_dtype(16) is np.int16 and quant_numba.activation_dtype(8) is np.int8
    with pytest.raises(ValueError, match="8 or 16 bits"):
        quant_numba.activation_dtype(4)


@int4_kernel
@pytest.mark.parametrize("out_features, in_features", [(64, 32), (192, 96), (576, 64)])
def test_torch_int4_layout_unpacks_to_its_codes(out_features, in_features):
    q, _, _ = _random_int4(out_features, in_features, seed=in_features)
    assert torch.equal(unpack_torch_int4(pack_int4(q.to(torch.int32)), in_features), q.to(torch.uint8))


@int4_kernel
def test_numba_int4_linear_gives_a_row_the_same_bits_serial_or_parallel_and_whatever_the_batch(monkeypatch):
    q, scale, low = _random_int4(64, 96, seed=7)
    tiles = tiles_from_codes(q, scale, low)
    x = torch.randn(9, 96)
    alone = torch.cat([int4_linear_numba(x[i:i + 1], tiles) for i in range(9)])    # serial, one row each
    monkeypatch.setattr(quant_numba, "PARALLEL_MIN_MACS", 0)                        # every call parallel
    for rows in (1, 2, 5, 9):
        assert torch.equal(int4_linear_numba(x[:rows], tiles), alone[:rows]), f"rows={rows}"


@int4_kernel
def test_packed_linear_int4_runs_numba_and_matches_the_reference():
    torch.manual_seed(3)
    weight = torch.randn(128, 160)
    layer = PackedLinear.from_weight(weight, "int4", bias=torch.randn(128).to(torch.bfloat16))
    assert layer.kernel == "numba"
    x = torch.randn(4, 160)
    scale, zero = layer.scales.float().transpose(0, 1).unbind(-1)
    want = int4_linear_int16_torch(x, unpack_torch_int4(layer.packed, 160), scale, zero - 8 * scale) + layer.bias
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-4)
    layer.kernel = "torch"                          # torch's packed kernel: the same weights, bfloat16 activations
    torch.testing.assert_close(layer(x), want, rtol=0.02, atol=0.05 * want.abs().max().item())
