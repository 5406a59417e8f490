"""Log-probabilities of tokens that are pieces of a character (byte fallback): each token reports its
real bytes, shown as OpenAI's `bytes:\\xNN` when they are not whole characters, and `text_offset`
indexes the returned text. The oracles: the UTF-8 encoding of the text (the tokens' bytes must join
up to it) and the text itself (each offset must point where the token's character starts)."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from nanovllm.config import EngineConfig
from nanovllm.engine.async_engine import OutputStream
from nanovllm.engine.engine import LLMEngine
from nanovllm.model.loader import load_model
from nanovllm.outputs import CompletionOutput, RequestMetrics, RequestOutput
from nanovllm.server.app import ServerConfig, build_app
from nanovllm.tokenizer import Tokenizer, TokenOffsets

TEXT = "a😀é b"   # 1-, 4-, 2- and 1-byte characters


@pytest.fixture(scope="module")
def byte_tokenizer(tiny_llama) -> Tokenizer:
    return Tokenizer.load(str(tiny_llama))   # byte-level BPE without merges: one token per byte


@pytest.mark.parametrize("text", [TEXT, "日本語 naïve", "plain ascii"])
def test_token_bytes_join_up_to_the_text(byte_tokenizer, text):
    ids = byte_tokenizer.encode(text, add_special_tokens=False)
    assert b"".join(byte_tokenizer.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_the_embedded_tokenizers_merged_tokens_join_up_to_the_text():
    tokenizer = Tokenizer.load(None)   # SmolLM2's byte-level BPE, whose merges cut characters apart
    text = "Hi 😀 é naïve 日本 ✓"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert any(not _is_utf8(tokenizer.token_bytes(i)) for i in ids)   # the text does split characters
    assert b"".join(tokenizer.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_token_offsets_point_where_each_tokens_character_starts(byte_tokenizer):
    ids = byte_tokenizer.encode(TEXT, add_special_tokens=False)
    offsets = TokenOffsets(byte_tokenizer)
    assert offsets.add(ids[:3]) + offsets.add(ids[3:]) == [0, 1, 1, 1, 1, 2, 2, 3, 4]


@pytest.fixture
def client_with_output(tiny_llama, byte_tokenizer, monkeypatch):
    """A server whose engine answers every request with TEXT's byte tokens (the model's own choice
    could be anything): what is under test is how the API reports them."""
    model, _ = load_model(str(tiny_llama))
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), device="cpu", max_model_len=128), model=model,
                       tokenizer=byte_tokenizer)
    app = build_app(server_config=ServerConfig(served_model_name="m"), engine=engine)
    async_engine = app.state.server.async_engine
    ids = byte_tokenizer.encode(TEXT, add_special_tokens=False)

    async def answer(requests, stream=True):
        outputs = OutputStream(async_engine, [request_id for request_id, _, _ in requests])
        for request_id, prompt, _ in requests:
            logprobs = [{token_id: -0.5, (token_id + 1) % 256: -1.5} for token_id in ids]
            outputs.put(RequestOutput(
                request_id=request_id, prompt=None, prompt_token_ids=prompt, finished=True,
                outputs=[CompletionOutput(index=0, text=TEXT, token_ids=ids, cumulative_logprob=-0.5 * len(ids),
                                          logprobs=logprobs, finish_reason="length")],
                metrics=RequestMetrics(arrival_time=0.0)))
        return outputs

    monkeypatch.setattr(async_engine, "add_requests", answer)
    with TestClient(app) as client:
        yield client, ids


def test_completion_logprobs_report_byte_tokens_and_offsets_that_index_the_text(client_with_output):
    client, ids = client_with_output
    choice = client.post("/v1/completions", json={"model": "m", "prompt": "x", "logprobs": 1}).json()["choices"][0]
    logprobs = choice["logprobs"]
    assert choice["text"] == TEXT
    assert logprobs["tokens"] == ["a", "bytes:\\xf0", "bytes:\\x9f", "bytes:\\x98", "bytes:\\x80",
                                  "bytes:\\xc3", "bytes:\\xa9", " ", "b"]
    assert logprobs["text_offset"] == [0, 1, 1, 1, 1, 2, 2, 3, 4]
    assert [TEXT[offset] for offset in logprobs["text_offset"]] == ["a", *"😀" * 4, *"é" * 2, " ", "b"]
    assert all(len(top) == 1 for top in logprobs["top_logprobs"])   # distinct byte tokens stay distinct keys


def test_chat_logprobs_carry_each_tokens_real_bytes(client_with_output):
    client, ids = client_with_output
    response = client.post("/v1/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 2})
    content = response.json()["choices"][0]["logprobs"]["content"]
    assert b"".join(bytes(entry["bytes"]) for entry in content) == TEXT.encode("utf-8")
    assert [entry["bytes"] for entry in content][1:5] == [[0xF0], [0x9F], [0x98], [0x80]]
    for entry in content:
        for top in entry["top_logprobs"]:
            assert top["token"].encode() == bytes(top["bytes"]) or top["token"].startswith("bytes:")


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_ids_past_the_tokenizers_vocabulary_stand_for_no_bytes(byte_tokenizer):
    # The tiny model's vocabulary (320) is padded past its tokenizer's, as real models' often are.
    assert byte_tokenizer.token_bytes(byte_tokenizer.vocab_size + 5) == b""
    assert byte_tokenizer.token_text(byte_tokenizer.vocab_size + 5) == ""
