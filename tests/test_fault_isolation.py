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


@pytest.fixture(scope="module")
def alone(tiny_llama_loaded) -> dict[int, list[int]]:
    """The tokens each healthy request samples with the engine to itself."""
    engine = engine_over(tiny_llama_loaded, device="cpu", max_model_len=128)
    tokens = {}
    for index, prompt in enumerate(HEALTHY_PROMPTS):
        engine.add_request(f"alone-{index}", prompt, healthy_params(index))
        tokens[index] = run_to_end(engine)[f"alone-{index}"].outputs[0].token_ids
    return tokens


@pytest.mark.parametrize("poison", [
    dict(top_k=2**63),                                   # the top_k row overflows int64
    dict(min_tokens=4, stop_token_ids=[2**63]),          # the suppressed-token row overflows int64
])
def test_a_poisoned_request_ends_alone_and_four_healthy_ones_finish_as_alone(tiny_llama_loaded, alone, poison):
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
    assert finals["poisoned"].error and finals["poisoned"].error_in_request   # its own fault: a client error
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
    assert not any(final.error_in_request for final in finals.values())      # the engine's fault, not theirs


def test_stop_token_ids_outside_the_vocabulary_are_refused_at_admission(tiny_llama_loaded):
    engine = engine_over(tiny_llama_loaded, device="cpu", max_model_len=128)
    vocab_size = engine.model_config.vocab_size
    with pytest.raises(ValueError, match=rf"stop_token_ids \[{vocab_size}\] are not in the vocabulary"):
        engine.add_request("r", [1, 2], SamplingParams(stop_token_ids=[1, vocab_size]))
    assert not engine.has_unfinished_requests()


async def healthy_stream(client, index: int) -> tuple[str, int]:
    """A sampled 24-token stream beside the faulty request -> (its finish reason, its completion tokens)."""
    stream = await client.completions.create(
        model="m", prompt=f"stream {index}", max_tokens=24, stream=True, temperature=0.8,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True, "top_k": 20})
    finish, tokens = None, None
    async for chunk in stream:
        finish = (chunk.choices[0].finish_reason if chunk.choices else None) or finish
        tokens = chunk.usage.completion_tokens if chunk.usage else tokens
    return finish, tokens


def test_poisoned_requests_over_http_get_400_while_four_streams_finish(tiny_llama_loaded):
    import asyncio

    import openai

    from nanovllm.server.app import ServerConfig, build_app
    from conftest import serving

    engine = engine_over(tiny_llama_loaded, device="cpu", max_model_len=128)
    app = build_app(server_config=ServerConfig(served_model_name="m"), engine=engine)
    poisons = [{"top_k": 2**63}, {"min_tokens": 1, "stop_token_ids": [2**63]},
               {"stop_token_ids": [engine.model_config.vocab_size]}, {"seed": 2**64}]

    async def scenario(url: str) -> tuple[list[tuple[str, int]], list[int]]:
        async with openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60) as client:
            async def poisoned(fields: dict) -> int:
                await asyncio.sleep(0.05)   # while the streams run
                try:
                    await client.completions.create(model="m", prompt="poison", max_tokens=8, extra_body=fields)
                except openai.APIStatusError as error:
                    return error.status_code
                return 200

            results = await asyncio.gather(*[healthy_stream(client, i) for i in range(4)],
                                           *[poisoned(p) for p in poisons])
            return results[:4], results[4:]

    with serving(app) as (host, port):
        streams, statuses = asyncio.run(scenario(f"http://{host}:{port}/v1"))
    assert streams == [("length", 24)] * 4
    assert statuses == [400] * len(poisons)


def test_a_request_that_fails_inside_a_step_gets_400_over_http_and_the_streams_beside_it_finish(
        tiny_llama_loaded, monkeypatch):
    """A fault admission did not see (here: building the request's sampling row raises) ends that request
    with a 400, not a 500 the openai client would retry, and the four streams batched with it go on."""
    import asyncio

    import openai

    from nanovllm.server.app import ServerConfig, build_app
    from conftest import serving

    engine = engine_over(tiny_llama_loaded, device="cpu", max_model_len=128)
    prepare = engine.runner.prepare_sampling

    def prepare_failing_on_seed_7(batch, **kwargs):
        if any(seq.sampling_params.seed == 7 for seq in batch.sampling_seqs):
            raise OverflowError("Python int too large to convert to C long")
        return prepare(batch, **kwargs)

    monkeypatch.setattr(engine.runner, "prepare_sampling", prepare_failing_on_seed_7)
    app = build_app(server_config=ServerConfig(served_model_name="m"), engine=engine)

    async def scenario(url: str):
        async with openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60) as client:
            async def failing() -> tuple[int, str]:
                await asyncio.sleep(0.05)   # while the streams run
                try:
                    await client.completions.create(model="m", prompt="fails", max_tokens=8, seed=7)
                except openai.APIStatusError as error:
                    return error.status_code, error.body["type"]
                return 200, ""

            return await asyncio.gather(*[healthy_stream(client, i) for i in range(4)], failing())

    with serving(app) as (host, port):
        results = asyncio.run(scenario(f"http://{host}:{port}/v1"))
    assert results[:4] == [("length", 24)] * 4
    assert results[4] == (400, "invalid_request_error")
