"""Our decoder over a paged KV cache computes what transformers computes, for every tiny model family.

Each TINY_MODELS entry is written by transformers as safetensors, loaded by
both, and compared on full-prompt logits, on 16 decode steps, on a decode
batch of different lengths, on a chunked prefill, and on 32 greedy tokens (the
fixture guarantees sharp attention and varied greedy tokens, so these
comparisons can fail); `linear` RoPE scaling too. The prompt (21 tokens, blocks of 8) ends in
the middle of a block, and the block table is scattered.
"""
from __future__ import annotations

import pytest
import torch
from conftest import (TINY_MODELS, TINY_VOCAB, PagedSequence, assert_discriminates, assert_logits_close,
                      decode_together)

from nanovllm.model.loader import load_model

PROMPT_LEN = 21
NUM_DECODE_STEPS = 16
NUM_GREEDY_STEPS = 32


@pytest.fixture(scope="module", params=sorted(TINY_MODELS))
def models(request, tiny_model_factory):
    """(ours, transformers') on the same tiny checkpoint, float32."""
    from transformers import AutoModelForCausalLM

    path = tiny_model_factory(request.param)
    ours, _ = load_model(str(path))
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return ours, theirs


def random_tokens(n: int, vocab_size: int, seed: int) -> list[int]:
    return torch.randint(0, vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def reference_logits(theirs, token_ids: list[int]) -> torch.Tensor:
    return theirs(torch.tensor([token_ids])).logits[0]   # [T, V]


def test_prompt_logits_match_transformers(models):
    ours, theirs = models
    prompt = random_tokens(PROMPT_LEN, ours.config.vocab_size, seed=1)
    assert_logits_close(PagedSequence(ours).step(prompt), reference_logits(theirs, prompt))


def test_each_decode_step_matches_transformers(models):
    ours, theirs = models
    tokens = random_tokens(PROMPT_LEN + NUM_DECODE_STEPS, ours.config.vocab_size, seed=2)
    expected = reference_logits(theirs, tokens)
    sequence = PagedSequence(ours)
    sequence.step(tokens[:PROMPT_LEN])
    for position in range(PROMPT_LEN, len(tokens)):
        assert_logits_close(sequence.step([tokens[position]])[0], expected[position])


def test_decode_steps_with_products_split_along_k_match_transformers(models, monkeypatch):
    """At a few rows on a GPU, o_proj and down_proj return partial products over slices of K that
    the next add_rms_norm adds up (ops/linear.py). Forced here on the CPU for every step of up to
    8 rows: the same logits as transformers'."""
    import nanovllm.ops.linear as linear
    split = []

    def four_slices_at_few_rows(rows, n, k, device):
        if rows > 8 or k % 4:
            return 1
        split.append(rows)
        return 4

    monkeypatch.setattr(linear, "split_k_count", four_slices_at_few_rows)
    ours, theirs = models
    tokens = random_tokens(PROMPT_LEN + 4, ours.config.vocab_size, seed=5)
    expected = reference_logits(theirs, tokens)
    sequence = PagedSequence(ours)
    sequence.step(tokens[:PROMPT_LEN])                  # 21 rows: not split
    for position in range(PROMPT_LEN, len(tokens)):
        assert_logits_close(sequence.step([tokens[position]])[0], expected[position])
    assert len(split) == 4 * 2 * ours.config.num_hidden_layers      # o_proj and down_proj of every decode step


def test_a_decode_batch_of_different_lengths_matches_transformers(models):
    """Three sequences (5, 21 and 12 tokens, the shorter ones ending mid-block) prefilled alone, then
    decoded together for 4 steps over one cache whose blocks they share out: each row must see exactly
    its own keys, no slot past its end (stale KV sits there) and none short of it."""
    ours, theirs = models
    lengths, num_steps, block_size = [5, 21, 12], 4, 8
    tokens = [random_tokens(n + num_steps, ours.config.vocab_size, seed=7 + i) for i, n in enumerate(lengths)]
    blocks = torch.randperm(12, generator=torch.Generator().manual_seed(0)).tolist()
    shared = PagedSequence(ours, block_size, num_blocks=12)
    shared.kv_caches = [(k.normal_(), v.normal_()) for k, v in shared.kv_caches]   # stale KV everywhere
    sequences = [PagedSequence(ours, block_size, kv_caches=shared.kv_caches, block_table=blocks[4 * i:4 * i + 4])
                 for i in range(len(lengths))]
    for sequence, ids, n in zip(sequences, tokens, lengths):
        sequence.step(ids[:n])
    for step in range(num_steps):
        logits = decode_together(sequences, [ids[n + step] for ids, n in zip(tokens, lengths)])
        for row, (ids, n) in enumerate(zip(tokens, lengths)):
            assert_logits_close(logits[row], reference_logits(theirs, ids[:n + step + 1])[-1])


def test_chunked_prefill_matches_transformers(models):
    ours, theirs = models
    tokens = random_tokens(PROMPT_LEN + 7, ours.config.vocab_size, seed=3)
    expected = reference_logits(theirs, tokens)
    sequence = PagedSequence(ours)
    start = 0
    for chunk in (5, 11, 1, 11):   # chunk edges fall mid-block and on a block edge (16)
        assert_logits_close(sequence.step(tokens[start:start + chunk]), expected[start:start + chunk])
        start += chunk


def test_greedy_tokens_match_transformers_for_32_steps(models):
    ours, theirs = models
    prompt = random_tokens(PROMPT_LEN, ours.config.vocab_size, seed=4)
    theirs.generation_config.eos_token_id = None   # run all 32 steps even if EOS comes up
    generated = theirs.generate(torch.tensor([prompt]), max_new_tokens=NUM_GREEDY_STEPS, do_sample=False,
                                pad_token_id=0)
    assert PagedSequence(ours).greedy(prompt, NUM_GREEDY_STEPS) == generated[0, PROMPT_LEN:].tolist()


@pytest.mark.parametrize("factor", [2.0, 8.0])
def test_linear_rope_scaling_matches_transformers(tiny_model_factory, factor):
    """`linear` divides every RoPE frequency by the factor (llama3-scaled covers the other kind)."""
    from transformers import AutoModelForCausalLM

    path = tiny_model_factory("llama-gqa4", rope_scaling={"rope_type": "linear", "factor": factor})
    ours, _ = load_model(str(path))
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens = random_tokens(PROMPT_LEN + 4, ours.config.vocab_size, seed=6)
    expected = reference_logits(theirs, tokens)
    sequence = PagedSequence(ours)
    assert_logits_close(sequence.step(tokens[:PROMPT_LEN]), expected[:PROMPT_LEN])
    for position in range(PROMPT_LEN, len(tokens)):
        assert_logits_close(sequence.step([tokens[position]])[0], expected[position])


@pytest.mark.parametrize("name", ["llama-mha-hd80", "qwen3"])
def test_the_fixture_check_rejects_default_initialised_weights(name):
    """transformers' own initialisation gives near-uniform attention and, when tied, greedy tokens
    that copy the input: the check every tiny model passes must refuse it."""
    import transformers

    config_cls, shape = TINY_MODELS[name]
    config = getattr(transformers, config_cls)(vocab_size=TINY_VOCAB, intermediate_size=256, num_hidden_layers=2,
                                               **shape)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with pytest.raises(AssertionError, match="near uniform|input token"):
        assert_discriminates(model)


def test_tiny_models_cover_the_variants_the_issue_names():
    shapes = [shape for _, shape in TINY_MODELS.values()]
    assert any(s["num_attention_heads"] == 4 * s["num_key_value_heads"] for s in shapes)
    assert any(s["num_attention_heads"] == s["num_key_value_heads"] for s in shapes)
    assert {s.get("head_dim") for s in shapes} >= {64, 80}
    assert {s["tie_word_embeddings"] for s in shapes} == {True, False}
    assert any((s.get("rope_scaling") or {}).get("rope_type") == "llama3" for s in shapes)
    assert {cls for cls, _ in TINY_MODELS.values()} >= {"LlamaConfig", "Qwen2Config", "Qwen3Config"}
