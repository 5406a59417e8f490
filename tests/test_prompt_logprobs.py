"""Prompt log-probabilities (SamplingParams.prompt_logprobs) equal HF transformers' on the same
weights, whether the prompt's KV came from the prefix cache or not and however it was chunked:
the figure lm-evaluation-harness sums for a log-likelihood task."""
from __future__ import annotations

import math

import pytest
import torch

from nanovllm import SamplingParams
from conftest import engine_over

PROMPT = "The quick brown fox jumps over the lazy dog, then naps in the sun."


@pytest.fixture(scope="module")
def hf_logprobs(tiny_llama) -> tuple[list[int], list[float], torch.Tensor]:
    """(prompt ids, log p(token i | tokens < i) for i >= 1, log-softmax [L, V]) from transformers in float32."""
    from transformers import AutoModelForCausalLM
    from nanovllm.tokenizer import Tokenizer
    ids = Tokenizer.load(str(tiny_llama)).encode(PROMPT)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, torch_dtype=torch.float32)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)   # [L, V]
    return ids, [logprobs[i - 1, ids[i]].item() for i in range(1, len(ids))], logprobs


def _run(engine, request_id: str, prompt_logprobs: int | None = 2):
    engine.add_request(request_id, PROMPT, SamplingParams(temperature=0, max_tokens=1,
                                                          prompt_logprobs=prompt_logprobs))
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                return output
    raise AssertionError("the request never finished")


@pytest.mark.parametrize("chunk", [None, 16])
def test_prompt_logprobs_equal_transformers_with_the_prefix_cache_cold_and_warm(tiny_llama_loaded, hf_logprobs,
                                                                                chunk):
    ids, expected, full = hf_logprobs
    engine = engine_over(tiny_llama_loaded, max_model_len=128, block_size=8, enable_prefix_caching=True,
                         **({} if chunk is None else {"max_num_batched_tokens": chunk}))
    for request_id in ("cold", "warm"):
        output = _run(engine, request_id)
        if request_id == "cold":   # a plain request finds the prompt in the cache: it is warm now
            assert _run(engine, "plain", prompt_logprobs=None).num_cached_tokens >= 32
        entries = output.prompt_logprobs
        assert len(entries) == len(ids) and entries[0] is None
        for i, entry in enumerate(entries[1:], start=1):
            assert entry[ids[i]] == pytest.approx(expected[i - 1], abs=1e-4)
            top = full[i - 1].topk(2)
            for value, token in zip(top.values.tolist(), top.indices.tolist()):
                assert entry[token] == pytest.approx(value, abs=1e-4)
        log_likelihood = sum(entry[ids[i]] for i, entry in enumerate(entries) if i >= 1)
        assert log_likelihood == pytest.approx(math.fsum(expected), abs=1e-4 * len(expected))


def test_prompt_logprobs_are_checked():
    with pytest.raises(ValueError, match="prompt_logprobs must be between 0 and 20"):
        SamplingParams(prompt_logprobs=21)
