"""Every sampling field a client sends reaches the engine's SamplingParams with its value, in both
APIs; the inputs OpenAI and vLLM refuse are refused with a 400 naming the field, never clamped or
wrapped; and chat messages reach the template whole, `name` included.

The capture sits where the API hands requests to the engine (`capture` below), so a field dropped or
renamed anywhere between the JSON body and the engine fails here."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from nanovllm.config import EngineConfig
from nanovllm.engine.engine import LLMEngine
from nanovllm.model.loader import load_model
from nanovllm.sampling_params import SamplingParams
from nanovllm.server.app import ServerConfig, build_app
from nanovllm.tokenizer import Tokenizer

MAX_MODEL_LEN = 128
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
BASE = {COMPLETIONS: {"model": "m", "prompt": "Hi"},
        CHAT: {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}}


@pytest.fixture(scope="module")
def app(tiny_llama):
    model, _ = load_model(str(tiny_llama))
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), device="cpu", max_model_len=MAX_MODEL_LEN), model=model,
                       tokenizer=Tokenizer.load(str(tiny_llama)))
    return build_app(server_config=ServerConfig(served_model_name="m"), engine=engine)


@pytest.fixture
def capture(app, monkeypatch):
    """The SamplingParams of each request the API hands to the engine, in order."""
    engine = app.state.server.async_engine
    captured: list[SamplingParams] = []
    add_requests = engine.add_requests

    async def recording(requests, stream=True):
        captured.extend(params for _, _, params in requests)
        return await add_requests(requests, stream)

    monkeypatch.setattr(engine, "add_requests", recording)
    return captured


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as client:
        yield client


# (JSON fields sent, SamplingParams attribute, the value it must hold). Every value differs from the default.
SAMPLING_FIELDS = {
    "n": ({"n": 2}, "n", 2),
    "temperature": ({"temperature": 0.25}, "temperature", 0.25),
    "top_p": ({"top_p": 0.75}, "top_p", 0.75),
    "top_k": ({"top_k": 7}, "top_k", 7),
    "min_p": ({"min_p": 0.125}, "min_p", 0.125),
    "presence_penalty": ({"presence_penalty": 0.5}, "presence_penalty", 0.5),
    "frequency_penalty": ({"frequency_penalty": -0.75}, "frequency_penalty", -0.75),
    "repetition_penalty": ({"repetition_penalty": 1.25}, "repetition_penalty", 1.25),
    "seed": ({"seed": 2**64 - 1}, "seed", 2**64 - 1),
    "negative seed": ({"seed": -5}, "seed", -5),
    "stop": ({"stop": ["xy", "z"]}, "stop", ["xy", "z"]),
    "stop as a string": ({"stop": "xy"}, "stop", ["xy"]),
    "stop_token_ids": ({"stop_token_ids": [3, 300]}, "stop_token_ids", [3, 300]),
    "max_tokens": ({"max_tokens": 5}, "max_tokens", 5),
    "min_tokens": ({"max_tokens": 5, "min_tokens": 3}, "min_tokens", 3),
    "ignore_eos": ({"ignore_eos": True}, "ignore_eos", True),
    "skip_special_tokens": ({"skip_special_tokens": False}, "skip_special_tokens", False),
    "include_stop_str_in_output": ({"include_stop_str_in_output": True}, "include_stop_str_in_output", True),
}
COMPLETIONS_ONLY = {
    "logprobs": ({"logprobs": 3}, "logprobs", 3),
    "max_tokens null means OpenAI's 16": ({"max_tokens": None}, "max_tokens", 16),
    "max_tokens absent means OpenAI's 16": ({}, "max_tokens", 16),
}
CHAT_ONLY = {
    "logprobs": ({"logprobs": True}, "logprobs", 0),
    "top_logprobs": ({"logprobs": True, "top_logprobs": 4}, "logprobs", 4),
    "max_completion_tokens": ({"max_completion_tokens": 6}, "max_tokens", 6),
    "max_completion_tokens over max_tokens": ({"max_tokens": 9, "max_completion_tokens": 6}, "max_tokens", 6),
    "max_tokens null means up to the context": ({"max_tokens": None}, "max_tokens", None),
}
CASES = ([(COMPLETIONS, name, *case) for name, case in {**SAMPLING_FIELDS, **COMPLETIONS_ONLY}.items()]
         + [(CHAT, name, *case) for name, case in {**SAMPLING_FIELDS, **CHAT_ONLY}.items()])


@pytest.mark.parametrize("path, name, fields, attribute, expected", CASES,
                         ids=[f"{'chat' if path == CHAT else 'completions'}-{name}" for path, name, *_ in CASES])
def test_each_sampling_field_reaches_sampling_params_with_its_value(client, capture, path, name, fields,
                                                                    attribute, expected):
    body = {**BASE[path], "max_tokens": 4, **fields}
    if name == "max_tokens absent means OpenAI's 16":
        del body["max_tokens"]
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    assert len(capture) == 1
    assert getattr(capture[0], attribute) == expected
    if name in SAMPLING_FIELDS:   # the table's value is not the default, so a dropped field shows
        assert getattr(SamplingParams(), attribute) != expected


# ---- inputs refused, never changed -----------------------------------------------------------

REFUSED = {
    "top_k past int64": (COMPLETIONS, {"top_k": 2**63}, "top_k", None),
    "min_tokens past int64": (COMPLETIONS, {"min_tokens": 2**63, "max_tokens": None}, "min_tokens", None),
    "a stop token id past int64": (COMPLETIONS, {"min_tokens": 1, "stop_token_ids": [2**63]}, "stop_token_ids",
                                   None),
    "a stop token id past the vocabulary": (CHAT, {"stop_token_ids": [10**6]}, None, None),
    "a seed of 2**64": (COMPLETIONS, {"seed": 2**64}, "seed", None),
    "a seed below -2**63": (CHAT, {"seed": -2**63 - 1}, "seed", None),
    "n past its cap": (CHAT, {"n": 10**6}, "n", None),
    "max_tokens past int64": (CHAT, {"max_tokens": 2**63}, "max_tokens", None),
    "a prompt token id past int64": (COMPLETIONS, {"prompt": [1, 2**63]}, "prompt", None),
    "a prompt token id past the vocabulary": (COMPLETIONS, {"prompt": [1, 10**6]}, "prompt", None),
    "prompt + max_tokens past the context": (COMPLETIONS, {"prompt": "Hi", "max_tokens": MAX_MODEL_LEN}, "max_tokens",
                                             "context_length_exceeded"),
    "chat prompt + max_tokens past the context": (CHAT, {"max_tokens": MAX_MODEL_LEN}, "max_tokens",
                                                  "context_length_exceeded"),
    "chat prompt + max_completion_tokens past the context": (CHAT, {"max_completion_tokens": MAX_MODEL_LEN},
                                                             "max_tokens", "context_length_exceeded"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_out_of_range_inputs_get_a_400_naming_the_field(client, capture, name):
    path, fields, param, code = REFUSED[name]
    response = client.post(path, json={**BASE[path], **fields})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["code"] == code and error["message"]
    assert capture == [] or name == "a stop token id past the vocabulary"   # refused by the engine itself
    assert client.post(COMPLETIONS, json={**BASE[COMPLETIONS], "max_tokens": 2}).status_code == 200


def test_a_prompt_and_max_tokens_that_just_fit_are_served(client):
    prompt = [5] * (MAX_MODEL_LEN - 3)
    response = client.post(COMPLETIONS, json={"model": "m", "prompt": prompt, "max_tokens": 3, "ignore_eos": True})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3


def test_chat_messages_reach_the_template_with_their_names(app, client, monkeypatch):
    tokenizer = app.state.server.tokenizer
    rendered = []
    render = tokenizer.apply_chat_template
    monkeypatch.setattr(tokenizer, "apply_chat_template",
                        lambda conversation, **kwargs: rendered.append(conversation) or render(conversation, **kwargs))
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi", "name": "alice"},
                {"role": "developer", "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}]}]
    assert client.post(CHAT, json={"model": "m", "messages": messages, "max_tokens": 2}).status_code == 200
    assert rendered == [[{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Hi", "name": "alice"},
                         {"role": "system", "content": "AB"}]]
