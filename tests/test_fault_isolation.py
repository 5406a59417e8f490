"""One request's fault stays its own: a request whose sampling row cannot be built ends alone with an
error while the requests batched with it finish as they would have alone, in the engine and over HTTP."""
from __future__ import annotations

import pytest

from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams
from conftest import engine_over

HEALTHY_PROMPTS = [[1, 5, 9, 13], [2, 6, 10], [3, 7, 11, 15, 19], [4, 8]]


def healthy_params(index: int) -> SamplingParams:
    # Sampled with top-k, so the rows share the int64 top_k tensor the poisoned row overflows.
    return SamplingParams(temperature=0.8, top_k=20, seed=100 + index, max_tokens=12, ignore_eos=True)


def run_to_end(engine) -> dict[str, RequestOutput]:
    finals = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finals[output.request_id] = output
    return finals


@pytest.mark.parametrize("poison", [
    dict(top_k=2**63),                                   # the top_k row overflows int64
    dict(min_tokens=4, stop_token_ids=[2**63]),          # the suppressed-token row overflows int64
])
def test_a_poisoned_request_ends_alone_and_four_healthy_ones_finish_as_alone(tiny_llama_loaded, poison):
    alone = {}
    for index, prompt in enumerate(HEALTHY_PROMPTS):
        engine = engine_over(tiny_llama_loaded, device="cpu", max_model_len=128)
        engine.add_request("alone", prompt, healthy_params(index))
        alone[index] = run_to_end(engine)["alone"].outputs[0].token_ids

    engine = engine_over(tiny_llama_loaded, device="cpu", max_model_len=128)
    poisoned = SamplingParams(temperature=0.8, top_k=5, min_tokens=4, max_tokens=12, seed=1)
    for index, prompt in enumerate(HEALTHY_PROMPTS[:2]):
        engine.add_request(f"healthy-{index}", prompt, healthy_params(index))
    engine.add_request("poisoned", [1, 2, 3], poisoned)
    for index, prompt in enumerate(HEALTHY_PROMPTS[2:], start=2):
        engine.add_request(f"healthy-{index}", prompt, healthy_params(index))
    for name, value in poison.items():   # past admission's checks, as a value that slipped through would be
        setattr(poisoned, name, value)
    finals = run_to_end(engine)

    assert finals["poisoned"].outputs[0].finish_reason == "error"
    assert finals["poisoned"].error
    for index in range(len(HEALTHY_PROMPTS)):
        final = finals[f"healthy-{index}"]
        assert final.error is None and final.outputs[0].finish_reason == "length"
        assert final.outputs[0].token_ids == alone[index]
    assert engine.scheduler.block_manager.usage().used_blocks == 0


def test_a_step_that_fails_for_everyone_still_fails_everyone(tiny_llama_loaded, monkeypatch):
    engine = engine_over(tiny_llama_loaded, device="cpu", max_model_len=128)
    for index, prompt in enumerate(HEALTHY_PROMPTS):
        engine.add_request(f"healthy-{index}", prompt, healthy_params(index))
    monkeypatch.setattr(engine.runner, "launch", lambda batch: (_ for _ in ()).throw(RuntimeError("device lost")))
    finals = run_to_end(engine)
    assert {final.outputs[0].finish_reason for final in finals.values()} == {"error"}
    assert all("device lost" in final.error for final in finals.values())


def test_stop_token_ids_outside_the_vocabulary_are_refused_at_admission(tiny_llama_loaded):
    engine = engine_over(tiny_llama_loaded, device="cpu", max_model_len=128)
    vocab_size = engine.model_config.vocab_size
    with pytest.raises(ValueError, match=rf"stop_token_ids \[{vocab_size}\] are not in the vocabulary"):
        engine.add_request("r", [1, 2], SamplingParams(stop_token_ids=[1, vocab_size]))
    assert not engine.has_unfinished_requests()
