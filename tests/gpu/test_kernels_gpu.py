"""The Triton kernels on a CUDA GPU, in bfloat16 at real model sizes, against the torch
references (attention against a float32 reference, by relative error of the whole output).

Shapes: Llama-3.2-1B (32 query heads, 8 KV heads, head_dim 64), Qwen3-0.6B (16/8/128),
head_dim 80 and GQA 7; contexts past 4096; decode graphs replayed with new contexts.
Run on a CUDA machine: `python3 -m pytest -q -m gpu tests/gpu`.
"""
from __future__ import annotations

import pytest
import torch

from nanovllm.ops import activation_triton, attention_triton, rmsnorm_triton, rotary_triton
from nanovllm.ops.activation import silu_and_mul_torch
from nanovllm.ops.attention import AttentionMetadata, paged_attention, paged_attention_torch
from nanovllm.ops.linear import linear_partials, split_k_count
from nanovllm.ops.rmsnorm import add_rms_norm_torch, rms_norm_torch
from nanovllm.ops.rotary import apply_rotary_torch, qk_norm_rotary_torch, rope_cos_sin_cache, rotary_and_store_kv_torch
from conftest import PoisonedTorch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEVICE = "cuda"
BF16 = dict(rtol=1.6e-2, atol=1.6e-2)       # one bfloat16 rounding step of the outputs
# (query heads, KV heads, head_dim)
LLAMA_3_2_1B, QWEN3_0_6B, HEAD_DIM_80, GQA_7 = (32, 8, 64), (16, 8, 128), (16, 4, 80), (28, 4, 128)


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    for module in (attention_triton, rmsnorm_triton, rotary_triton, activation_triton):
        monkeypatch.setattr(module, "torch", PoisonedTorch())


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "the kernel left NaN in its output"
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def make_batch(q_lens: list[int], context_lens: list[int], shape: tuple[int, int, int], block_size: int,
               spare_blocks: int = 0):
    """Random bf16 q (a view of a fused qkv buffer) and caches over a shuffled block pool."""
    num_heads, num_kv_heads, head_dim = shape
    seq_lens = [c + q for c, q in zip(context_lens, q_lens)]
    needed = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(needed) + spare_blocks + 1
    order = torch.randperm(num_blocks, device=DEVICE)
    block_tables = torch.full((len(q_lens), max(needed) + spare_blocks), -1, dtype=torch.int32, device=DEVICE)
    used = 0
    for b, n in enumerate(needed):
        block_tables[b, :n] = order[used:used + n]
        used += n
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, device=DEVICE, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    num_tokens = sum(q_lens)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, device=DEVICE, dtype=torch.bfloat16)
    q = qkv[:, :num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    query_start_loc = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    metadata = AttentionMetadata(query_start_loc=query_start_loc,
                                 seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
                                 slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=DEVICE),
                                 block_tables=block_tables, max_query_len=max(q_lens), max_seq_len=max(seq_lens))
    return q, k_cache, v_cache, metadata


def reference(q, k_cache, v_cache, metadata, scale):
    return paged_attention_torch(q.float(), k_cache.float(), v_cache.float(), metadata, scale)


@pytest.mark.parametrize("shape", [LLAMA_3_2_1B, QWEN3_0_6B, HEAD_DIM_80, GQA_7])
def test_decode_attention_matches_reference_at_model_sizes(shape):
    torch.manual_seed(0)
    context_lens = torch.randint(1, 5000, (48,)).tolist()
    q, k_cache, v_cache, metadata = make_batch([1] * 48, context_lens, shape, 16)
    scale = shape[2] ** -0.5
    out = paged_attention(q, k_cache, v_cache, metadata, scale)
    assert relative_error(out, reference(q, k_cache, v_cache, metadata, scale)) < 1e-2


@pytest.mark.parametrize("shape", [LLAMA_3_2_1B, QWEN3_0_6B])
def test_long_context_decodes_split_the_context_and_match_reference(shape):
    torch.manual_seed(1)
    q, k_cache, v_cache, metadata = make_batch([1, 1], [8191, 5000], shape, 16)
    splits = attention_triton.decode_kv_splits(2, shape[1], metadata.block_tables.shape[1] * 16, q.device)
    assert splits > 1
    scale = shape[2] ** -0.5
    out = paged_attention(q, k_cache, v_cache, metadata, scale)
    assert relative_error(out, reference(q, k_cache, v_cache, metadata, scale)) < 1e-2


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("shape", [LLAMA_3_2_1B, QWEN3_0_6B, HEAD_DIM_80, GQA_7])
def test_mixed_prefill_and_decode_attention_matches_reference(shape, block_size):
    torch.manual_seed(2)
    q_lens, context_lens = [512, 1, 1000, 1, 37], [3000, 4200, 0, 17, 4100]
    q, k_cache, v_cache, metadata = make_batch(q_lens, context_lens, shape, block_size)
    scale = shape[2] ** -0.5
    out = paged_attention(q, k_cache, v_cache, metadata, scale)
    assert relative_error(out, reference(q, k_cache, v_cache, metadata, scale)) < 1e-2


@pytest.mark.parametrize("batch", [2, 64])
def test_decode_attention_replays_in_a_cuda_graph_with_new_contexts(batch):
    """The graph is captured once with a block table wide enough for 4096 tokens; replays with
    other lengths and other blocks give the reference's answer (split path at batch 2)."""
    torch.manual_seed(3)
    shape, block_size, width = LLAMA_3_2_1B, 16, 4096 // 16
    q, k_cache, v_cache, metadata = make_batch([1] * batch, [4095] * batch, shape, block_size)
    scale = shape[2] ** -0.5
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        paged_attention(q, k_cache, v_cache, metadata, scale)            # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_attention(q, k_cache, v_cache, metadata, scale)
    for trial in range(3):
        seq_lens = torch.randint(1, 4097, (batch,), device=DEVICE, dtype=torch.int32)
        metadata.seq_lens.copy_(seq_lens)
        metadata.block_tables.copy_(torch.randint(0, k_cache.shape[0], (batch, width), device=DEVICE,
                                                  dtype=torch.int32))
        q.copy_(torch.randn_like(q))
        graph.replay()
        now = AttentionMetadata(metadata.query_start_loc, seq_lens, metadata.slot_mapping, metadata.block_tables,
                                1, int(seq_lens.max()))
        assert relative_error(out, reference(q, k_cache, v_cache, now, scale)) < 1e-2, f"replay {trial}"


def test_cuda_tensors_are_dispatched_to_the_triton_kernel():
    torch.manual_seed(4)
    q, k_cache, v_cache, metadata = make_batch([1] * 4, [100, 200, 300, 400], LLAMA_3_2_1B, 16)
    assert torch.equal(paged_attention(q, k_cache, v_cache, metadata, 0.125),
                       attention_triton.paged_attention_triton(q, k_cache, v_cache, metadata, 0.125))


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("shape", [LLAMA_3_2_1B, QWEN3_0_6B, HEAD_DIM_80])
def test_rotary_and_store_kv_matches_rotary_then_store(shape, qk_norm):
    """The fused op against the references in turn: q, k and the k cache to bf16 rounding (the
    rotation), v and every cache row not written (slot -1 rows among them) exactly."""
    num_heads, num_kv_heads, head_dim = shape
    cos_sin_cache = rope_cos_sin_cache(head_dim, 8192, 500000.0, None).to(DEVICE)
    qkv = torch.randn(1000, num_heads + 2 * num_kv_heads, head_dim, device=DEVICE, dtype=torch.bfloat16)
    positions = torch.randint(0, 8192, (1000,), device=DEVICE)
    slot_mapping = torch.randperm(300 * 16, device=DEVICE)[:1000]
    slot_mapping[::7] = -1
    norm = (*torch.randn(2, head_dim, device=DEVICE, dtype=torch.bfloat16).unbind(0), 1e-6) if qk_norm else ()
    caches = torch.randn(2, 300, 16, num_kv_heads, head_dim, device=DEVICE, dtype=torch.bfloat16)
    ref, ref_caches = qkv.clone(), caches.clone()
    rotary_triton.rotary_and_store_kv_triton(*qkv.split([num_heads, num_kv_heads, num_kv_heads], dim=1),
                                             positions, cos_sin_cache, *caches, slot_mapping, *norm)
    rotary_and_store_kv_torch(*ref.split([num_heads, num_kv_heads, num_kv_heads], dim=1),
                              positions, cos_sin_cache, *ref_caches, slot_mapping, *norm)
    torch.testing.assert_close(qkv, ref, **BF16)
    torch.testing.assert_close(caches[0], ref_caches[0], **BF16)
    assert torch.equal(caches[1], ref_caches[1])
    written = torch.zeros(300 * 16, dtype=torch.bool, device=DEVICE)
    written[slot_mapping[slot_mapping >= 0]] = True
    assert torch.equal(caches.flatten(1, 2)[:, ~written], ref_caches.flatten(1, 2)[:, ~written])


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("shape,batch", [(LLAMA_3_2_1B, 1), (LLAMA_3_2_1B, 4), (QWEN3_0_6B, 3), (HEAD_DIM_80, 48)])
def test_fused_decode_rotary_store_and_attention_matches_the_steps_in_turn(shape, batch, qk_norm):
    """A decode step in one kernel (RoPE on q and k, the cache write, attention with the new key from
    registers) against the references in turn; batch 1 and 4 take the split-KV path at these contexts,
    batch 48 one program per sequence and KV head (where the engine would not fuse).
    Each new slot starts as NaN: the kernel must not read it before writing it."""
    torch.manual_seed(batch)
    num_heads, num_kv_heads, head_dim = shape
    context_lens = torch.randint(1, 5000, (batch,)).tolist()
    _, k_cache, v_cache, metadata = make_batch([1] * batch, context_lens, shape, 16)
    qkv = torch.randn(batch, num_heads + 2 * num_kv_heads, head_dim, device=DEVICE, dtype=torch.bfloat16)
    positions = metadata.seq_lens.long() - 1
    blocks = metadata.block_tables[torch.arange(batch, device=DEVICE), positions // 16].long()
    metadata.slot_mapping = blocks * 16 + positions % 16
    cos_sin_cache = rope_cos_sin_cache(head_dim, 8192, 500000.0, None).to(DEVICE)
    norm = (*torch.randn(2, head_dim, device=DEVICE, dtype=torch.bfloat16).unbind(0), 1e-6) if qk_norm else ()
    ref_caches = (k_cache.clone(), v_cache.clone())
    for cache in (k_cache, v_cache):
        cache.view(-1, num_kv_heads, head_dim)[metadata.slot_mapping] = float("nan")
    split = [num_heads, num_kv_heads, num_kv_heads]
    before = qkv.clone()
    out = attention_triton.rotary_store_and_attend_triton(*qkv.split(split, dim=1), positions, cos_sin_cache,
                                                          k_cache, v_cache, metadata, head_dim ** -0.5, *norm,
                                                          fused=True)
    q_ref, k_ref, v_ref = qkv.clone().split(split, dim=1)
    rotary_and_store_kv_torch(q_ref, k_ref, v_ref, positions, cos_sin_cache, *ref_caches, metadata.slot_mapping,
                              *norm)
    assert relative_error(out, reference(q_ref, *ref_caches, metadata, head_dim ** -0.5)) < 1e-2
    assert torch.equal(qkv, before)
    torch.testing.assert_close(k_cache, ref_caches[0], **BF16)
    assert torch.equal(v_cache, ref_caches[1])


@pytest.mark.parametrize("hidden", [1024, 2048, 3072])
def test_rms_norm_and_add_rms_norm_match_reference(hidden):
    x, residual = torch.randn(2, 777, hidden, device=DEVICE, dtype=torch.bfloat16).unbind(0)
    weight = torch.randn(hidden, device=DEVICE, dtype=torch.bfloat16)
    torch.testing.assert_close(rmsnorm_triton.rms_norm_triton(x, weight, 1e-5), rms_norm_torch(x, weight, 1e-5),
                               **BF16)
    out, new_residual = rmsnorm_triton.add_rms_norm_triton(x, residual, weight, 1e-5)
    ref_out, ref_residual = add_rms_norm_torch(x, residual, weight, 1e-5)
    assert torch.equal(new_residual, ref_residual)
    torch.testing.assert_close(out, ref_out, **BF16)


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_add_rms_norm_adds_the_partial_products_of_a_split_k_matmul(rows):
    partials = torch.randn(8, rows, 2048, device=DEVICE)                  # float32, as the split bmm writes them
    residual = torch.randn(rows, 2048, device=DEVICE, dtype=torch.bfloat16)
    weight = torch.randn(2048, device=DEVICE, dtype=torch.bfloat16)
    out, new_residual = rmsnorm_triton.add_rms_norm_triton(partials, residual, weight, 1e-5)
    ref_out, ref_residual = add_rms_norm_torch(partials, residual, weight, 1e-5)
    assert new_residual.dtype == out.dtype == torch.bfloat16
    torch.testing.assert_close(new_residual, ref_residual, **BF16)
    torch.testing.assert_close(out, ref_out, **BF16)


@pytest.mark.parametrize("rows", [1, 2, 8])
@pytest.mark.parametrize("n,k", [(3072, 2048), (2048, 2048), (2048, 8192), (1024, 3072)])
def test_split_k_partial_products_add_up_to_the_product(n, k, rows):
    """Llama-3.2-1B's qkv, o and down products and Qwen3-0.6B's down, split as the model splits them."""
    x = torch.randn(rows, k, device=DEVICE, dtype=torch.bfloat16)
    weight = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16)
    splits = split_k_count(rows, n, k, x.device)
    assert splits > 1
    partials = linear_partials(x, weight, splits)
    assert partials.shape == (splits, rows, n) and partials.dtype == torch.float32
    assert relative_error(partials.sum(0), x.float() @ weight.float().T) < 1e-5


@pytest.mark.parametrize("shape,scaling", [
    (LLAMA_3_2_1B, {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}),
    (QWEN3_0_6B, None), (HEAD_DIM_80, None)])
def test_rotary_matches_reference_in_place(shape, scaling):
    num_heads, num_kv_heads, head_dim = shape
    cache = rope_cos_sin_cache(head_dim, 131072, 500000.0, scaling).to(DEVICE)
    qkv = torch.randn(513, (num_heads + 2 * num_kv_heads) * head_dim, device=DEVICE, dtype=torch.bfloat16)
    ref = qkv.clone()
    positions = torch.randint(0, 131072, (513,), device=DEVICE)

    def views(buffer):
        q = buffer[:, :num_heads * head_dim].view(513, num_heads, head_dim)
        k = buffer[:, num_heads * head_dim:(num_heads + num_kv_heads) * head_dim].view(513, num_kv_heads, head_dim)
        return q, k

    rotary_triton.apply_rotary_triton(*views(qkv), positions, cache)
    apply_rotary_torch(*views(ref), positions, cache)
    torch.testing.assert_close(qkv, ref, **BF16)
    weights = torch.randn(2, head_dim, device=DEVICE, dtype=torch.bfloat16)
    rotary_triton.qk_norm_rotary_triton(*views(qkv), positions, cache, weights[0], weights[1], 1e-6)
    qk_norm_rotary_torch(*views(ref), positions, cache, weights[0], weights[1], 1e-6)
    torch.testing.assert_close(qkv, ref, **BF16)


@pytest.mark.parametrize("intermediate", [3072, 8192])
def test_silu_and_mul_matches_reference(intermediate):
    x = torch.randn(333, 2 * intermediate, device=DEVICE, dtype=torch.bfloat16) * 3
    torch.testing.assert_close(activation_triton.silu_and_mul_triton(x), silu_and_mul_torch(x), **BF16)


@pytest.mark.parametrize("vocab_size", [128256, 151936, 5001])
@pytest.mark.parametrize("greedy", [True, False])
@pytest.mark.parametrize("num_rows", [1, 64, 300])    # 64 and 1 rows split each row's vocabulary, 300 do not
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_sampling_kernel_matches_reference_at_model_sizes(vocab_size, greedy, num_rows, dtype):
    """Tokens exactly (the seeded draw is the CPU's), log-probabilities and the log-normalizer to
    float32 rounding; bfloat16 is how the engine hands the logits over."""
    from nanovllm.ops.sampling import sample_from_logits_torch
    from nanovllm.ops.sampling_triton import sample_from_logits_triton
    gen = torch.Generator(device="cuda").manual_seed(vocab_size)
    logits = (torch.randn(num_rows, vocab_size, device="cuda", generator=gen) * 3).to(dtype)
    temperature = torch.rand(num_rows, device="cuda", generator=gen) + 0.2
    keys = torch.randint(0, 2**32, (num_rows,), device="cuda", generator=gen, dtype=torch.int64)
    args = (None, None) if greedy else (keys, temperature)
    tokens, logprobs, lse = sample_from_logits_triton(logits, *args)
    expected_tokens, expected_logprobs, expected_lse = sample_from_logits_torch(logits, *args)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(logprobs, expected_logprobs, rtol=1e-6, atol=1e-5)
    cpu_tokens, _, _ = sample_from_logits_torch(logits.cpu(), *(a if a is None else a.cpu() for a in args))
    assert torch.equal(tokens.cpu(), cpu_tokens)
