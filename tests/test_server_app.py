"""The server's app in-process (FastAPI's TestClient, no socket): several apps in one process keep
their own metrics, a failing step becomes a 500 or an error event while the server goes on, and the
served name and server settings are derived and checked as documented."""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from nanovllm.config import EngineConfig
from nanovllm.engine.engine import LLMEngine
from nanovllm.model.loader import EMBEDDED_MODEL, load_model
from nanovllm.server.app import ServerConfig, build_app, default_served_model_name


def complete(client: TestClient, **body) -> dict:
    response = client.post("/v1/completions", json={"model": "m", "prompt": "Hi", "max_tokens": 3, **body})
    return {"status": response.status_code, **response.json()}


def metric(client: TestClient, name: str) -> float:
    lines = [line for line in client.get("/metrics").text.splitlines() if line.startswith(name + "{")]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def test_two_apps_in_one_process_keep_their_own_metrics(make_app):
    with TestClient(make_app()) as first, TestClient(make_app()) as second:
        assert complete(first)["status"] == 200
        assert complete(first)["status"] == 200
        assert metric(first, "nanovllm:e2e_request_latency_seconds_count") == 2
        assert metric(second, "nanovllm:e2e_request_latency_seconds_count") == 0
        assert metric(first, "nanovllm:generation_tokens_total") == 6


def test_a_failing_step_answers_500_or_an_error_event_and_the_server_goes_on(make_app, monkeypatch):
    app = make_app()
    runner = app.state.server.async_engine.thread.engine.runner   # the core runs in a thread here
    with TestClient(app) as client:
        with monkeypatch.context() as patch:
            patch.setattr(runner, "launch", lambda batch: (_ for _ in ()).throw(RuntimeError("device lost")))
            failed = complete(client)
            with client.stream("POST", "/v1/completions",
                               json={"model": "m", "prompt": "Hi", "max_tokens": 3, "stream": True}) as response:
                events = response.read().decode().split("\n\n")
        assert failed["status"] == 500
        assert failed["error"]["type"] == "server_error" and "device lost" in failed["error"]["message"]
        assert response.status_code == 200 and events[-2:] == ["data: [DONE]", ""]
        assert "device lost" in json.loads(events[-3][len("data: "):])["error"]["message"]
        assert complete(client)["choices"][0]["finish_reason"] == "length"
        assert client.get("/health").status_code == 200


def test_the_served_name_defaults_to_the_model_directory_or_file_stem(tmp_path, tiny_llama):
    assert default_served_model_name(str(tiny_llama)) == tiny_llama.name
    assert default_served_model_name(str(tmp_path / "qwen2.5-0.5b.Q4_K_M.gguf")) == "qwen2.5-0.5b.Q4_K_M"
    assert default_served_model_name(None) == default_served_model_name(EMBEDDED_MODEL) == EMBEDDED_MODEL


@pytest.mark.parametrize("server_args, message", [
    (dict(max_request_bytes=0), "max_request_bytes must be a positive integer"),
    (dict(max_waiting=-1), "max_waiting must be a positive integer"),
    (dict(log_interval=0), "log_interval must be a positive number"),
    (dict(api_key=""), "the API key is empty"),
])
def test_impossible_server_settings_raise_with_a_sentence(server_args, message):
    with pytest.raises(ValueError, match=message):
        ServerConfig(**server_args)


def test_a_dummy_model_is_served_under_its_builtin_name(tiny_llama):
    assert default_served_model_name("qwen3-0.6b", load_format="dummy") == "qwen3-0.6b"


def test_a_model_without_a_tokenizer_serves_token_ids_and_refuses_text_with_a_400(tiny_llama, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_llama, bare)
    (bare / "tokenizer.json").unlink()
    app = build_app(EngineConfig(model=str(bare), device="cpu", max_model_len=64), ServerConfig(served_model_name="m"))
    with TestClient(app) as client:
        assert complete(client, prompt=[5, 6, 7])["status"] == 200
        refused = complete(client, prompt="text")
        assert refused["status"] == 400 and "send prompts as token ids" in refused["error"]["message"]


@pytest.mark.parametrize("skip_tokenizer_init", [False, True])
def test_a_stream_without_a_tokenizer_is_decoded_by_the_api_process_as_the_engine_decodes_it_whole(
        tiny_llama, tmp_path, monkeypatch, skip_tokenizer_init):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_llama, bare)
    (bare / "tokenizer.json").unlink()   # token ids decoded as "<id>"; with skip_tokenizer_init no text at all
    model, _ = load_model(str(bare))
    engine = LLMEngine(EngineConfig(model=str(bare), device="cpu", max_model_len=64,
                                    skip_tokenizer_init=skip_tokenizer_init), model=model)
    asked_for_text = []
    add_requests = engine.add_requests
    monkeypatch.setattr(engine, "add_requests", lambda *args, **kwargs: (
        asked_for_text.append(kwargs["detokenize"]), add_requests(*args, **kwargs))[1])
    body = {"prompt": [5, 6, 7], "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    with TestClient(build_app(server_config=ServerConfig(served_model_name="m"), engine=engine)) as client:
        whole = complete(client, **body)["choices"][0]["text"]
        with client.stream("POST", "/v1/completions", json={"model": "m", **body, "stream": True}) as response:
            events = [json.loads(event[len("data: "):]) for event in response.read().decode().split("\n\n")
                      if event.startswith("data: {")]
    streamed = "".join(choice["text"] for event in events for choice in event["choices"])
    assert streamed == whole and whole.count("<") == (0 if skip_tokenizer_init else 6)
    assert asked_for_text == [True, skip_tokenizer_init], "the stream's text is made in the API process"
