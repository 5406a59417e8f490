"""`batch_invariant=True` on a CUDA GPU: a request's tokens and log-probabilities are the same bits
whatever it is batched with.

The kernels one by one first (the fixed-tile matmul, attention in its one configuration, the sampling
pass with a fixed cut of the vocabulary: a row alone against the same row in a batch), then the engine
in bfloat16 with CUDA graphs: 64 greedy tokens of each prompt, with their log-probabilities, alone and
in a batch of mixed lengths, chunked by a 16-token budget, on prefix-cache hits and under preemption.
"""
from __future__ import annotations

import gc

import pytest
import torch

from nanovllm import LLM, SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GREEDY_64 = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True, logprobs=2)
SAMPLED_64 = SamplingParams(temperature=0.9, top_p=0.95, seed=11, max_tokens=64, ignore_eos=True, logprobs=2)


@pytest.fixture(autouse=True)
def fresh_gpu_memory():
    yield
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("n, k", [(2048, 2048), (3072, 2048), (1000, 576), (128256, 64)])
def test_a_matmul_row_has_the_same_bits_in_any_batch_and_matches_torch(n, k):
    from nanovllm.ops.matmul_triton import matmul_batch_invariant_triton
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    x = torch.randn(300, k, device="cuda", generator=gen).to(torch.bfloat16)
    w = (torch.randn(n, k, device="cuda", generator=gen) * k ** -0.5).to(torch.bfloat16)
    full = matmul_batch_invariant_triton(x, w)
    torch.testing.assert_close(full.float(), x.float() @ w.float().T, rtol=2e-2, atol=2e-2)
    for rows in (1, 3, 16, 64, 65, 129):
        assert torch.equal(matmul_batch_invariant_triton(x[:rows], w), full[:rows]), f"rows={rows}"


def test_attention_gives_a_decode_the_bits_it_gets_beside_prefill_chunks():
    from nanovllm.ops.attention import AttentionMetadata
    from nanovllm.ops.attention_triton import paged_attention_triton
    torch.manual_seed(0)
    num_heads, num_kv_heads, head_dim, block_size = 32, 8, 64, 16
    q_lens, contexts = [300, 1, 57, 1], [0, 700, 20, 33]
    seq_lens = [c + q for c, q in zip(contexts, q_lens)]
    blocks = [-(-s // block_size) for s in seq_lens]
    tables = torch.full((4, max(blocks)), -1, dtype=torch.int32)
    order = torch.randperm(sum(blocks)).int()
    start = 0
    for b, count in enumerate(blocks):
        tables[b, :count], start = order[start:start + count], start + count
    k_cache = torch.randn(sum(blocks), block_size, num_kv_heads, head_dim).to(torch.bfloat16).cuda()
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(sum(q_lens), num_heads, head_dim).to(torch.bfloat16).cuda()
    starts = [0] + torch.tensor(q_lens).cumsum(0).tolist()

    def metadata(rows: list[int]) -> AttentionMetadata:
        lens = [q_lens[b] for b in rows]
        return AttentionMetadata(torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32).cuda(),
                                 torch.tensor([seq_lens[b] for b in rows], dtype=torch.int32).cuda(),
                                 torch.full((sum(lens),), -1, dtype=torch.int64).cuda(), tables[rows].cuda(),
                                 max(lens), max(seq_lens[b] for b in rows))

    mixed = paged_attention_triton(q, k_cache, v_cache, metadata([0, 1, 2, 3]), 0.125, batch_invariant=True)
    for b in (1, 3):   # the decodes, alone in a decode step
        alone = paged_attention_triton(q[starts[b]:starts[b] + 1], k_cache, v_cache, metadata([b]), 0.125,
                                       batch_invariant=True)
        assert torch.equal(alone, mixed[starts[b]:starts[b] + 1]), f"sequence {b}"
    chunk = paged_attention_triton(q[starts[2]:starts[3]], k_cache, v_cache, metadata([2]), 0.125,
                                   batch_invariant=True)
    assert torch.equal(chunk, mixed[starts[2]:starts[3]])


def test_sampling_pass_gives_a_row_the_same_log_probabilities_in_any_batch():
    from nanovllm.ops.sampling import sample_from_logits
    logits = (torch.randn(256, 128256, device="cuda") * 3).to(torch.bfloat16)
    _, full, full_lse = sample_from_logits(logits, None, None, batch_invariant=True)
    for rows in (1, 7, 64):
        _, part, lse = sample_from_logits(logits[:rows], None, None, batch_invariant=True)
        assert torch.equal(part, full[:rows]) and torch.equal(lse, full_lse[:rows]), f"rows={rows}"


def _runs(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> list[tuple[list[int], list]]:
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outputs]


@pytest.mark.parametrize("params", [GREEDY_64, SAMPLED_64], ids=["greedy", "sampled-top_p"])
def test_a_request_gets_the_same_tokens_and_logprobs_alone_batched_chunked_cached_and_preempted(
        tiny_model_factory, params):
    path = str(tiny_model_factory("llama-gqa4"))
    prompts = [list(range(5, 5 + 3 * i + 4)) for i in range(6)] + [list(range(100, 180))]
    fillers = [list(range(7 + i, 40 + 5 * i)) for i in range(20)]
    base = dict(device="cuda", dtype="bfloat16", batch_invariant=True, max_model_len=256, max_num_seqs=32)

    llm = LLM(path, enable_prefix_caching=False, num_kv_blocks=512, **base)
    assert llm.engine.runner.decode_graphs is not None
    alone = [_runs(llm, [prompt], params)[0] for prompt in prompts]
    assert all(len(tokens) == 64 and len(set(tokens)) > 4 for tokens, _ in alone)   # not a constant output
    batched = _runs(llm, prompts + fillers, params)[:len(prompts)]
    assert batched == alone
    del llm

    chunked = LLM(path, enable_prefix_caching=False, num_kv_blocks=512, max_num_batched_tokens=16, **base)
    assert _runs(chunked, fillers[:3] + prompts, params)[3:] == alone
    del chunked

    cached = LLM(path, enable_prefix_caching=True, num_kv_blocks=512, **base)
    _runs(cached, [prompt + [1, 2] for prompt in prompts], params)   # fills the cache with their prefixes
    assert _runs(cached, prompts, params) == alone
    del cached

    tight = LLM(path, enable_prefix_caching=False, num_kv_blocks=48, **base)   # 768 slots for 27 sequences
    assert _runs(tight, prompts + fillers, params)[:len(prompts)] == alone
    assert tight.engine.scheduler.num_preemptions > 0


def test_batch_invariant_refuses_quantization():
    from nanovllm.config import EngineConfig
    with pytest.raises(ValueError, match="float weights only"):
        EngineConfig(device="cuda", batch_invariant=True, quantization="fp8")
