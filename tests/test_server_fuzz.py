"""Arbitrary JSON against both generation endpoints, over real HTTP: the server never answers 500 (nor
ends a stream with a server error), a healthy stream running all along finishes normally, and /health
stays responsive. Bodies come from hypothesis strategies over the request schemas: a few fields with
plausible values of their type (boundaries included: 0, -1, 2**63, 2**64), now and then one of them
replaced by any JSON at all, an unknown field, or no schema at all; the examples are fixed
(derandomized) and bounded."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanovllm.server.app import ServerConfig, build_app
from conftest import engine_over, serving

MODEL = "m"
# Integers at the edges of the ranges the server bounds (int64, 64-bit seeds) and just past them.
BOUNDARY_INTS = [-1, 0, 320, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -2**63 - 1]

ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.sampled_from(BOUNDARY_INTS)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8)
TEXT = st.text(max_size=24)
TOKEN_IDS = st.lists(st.integers(0, 319), min_size=1, max_size=6)

# Values each field may validly take (edges included); a body spoils at most one of them.
SAMPLING_FIELDS = {
    "n": st.integers(1, 3), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "top_k": st.integers(-1, 50),
    "min_p": st.floats(0, 1), "seed": st.integers(-2**63, 2**64 - 1), "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2), "repetition_penalty": st.floats(0.5, 2),
    "stop": TEXT | st.lists(TEXT, max_size=3), "stop_token_ids": TOKEN_IDS | st.just([]),
    "max_tokens": st.integers(1, 16) | st.none(), "min_tokens": st.integers(0, 4), "ignore_eos": st.booleans(),
    "skip_special_tokens": st.booleans(), "include_stop_str_in_output": st.booleans(), "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}), "user": TEXT,
}
COMPLETION_FIELDS = {
    "prompt": TEXT | TOKEN_IDS | st.lists(TEXT, min_size=1, max_size=3) | st.lists(TOKEN_IDS, min_size=1, max_size=3),
    "logprobs": st.integers(0, 5), "echo": st.booleans(),
}
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool"])},
    optional={"content": TEXT | st.none() | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}),
                                                     max_size=2),
              "name": TEXT})
CHAT_FIELDS = {
    "messages": st.lists(MESSAGE, min_size=1, max_size=3), "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 5), "max_completion_tokens": st.integers(1, 16),
}
# Where an integer sits in each field, for the spoiled bodies.
INTEGER_SLOTS = {
    "n": lambda v: v, "top_k": lambda v: v, "seed": lambda v: v, "max_tokens": lambda v: v,
    "min_tokens": lambda v: v, "stop_token_ids": lambda v: [5, v], "logprobs": lambda v: v,
    "top_logprobs": lambda v: v, "max_completion_tokens": lambda v: v, "prompt": lambda v: [1, v],
}
UNKNOWN_FIELDS = st.dictionaries(st.text(min_size=1, max_size=8), ANY_JSON, min_size=1, max_size=2)


@st.composite
def request_body(draw, required: str, fields: dict[str, st.SearchStrategy]) -> dict:
    """The model, the required field and up to 5 others, valid; then maybe one spoiled: an integer at
    a boundary, any JSON for a value or the model, or unknown fields beside."""
    every = {**SAMPLING_FIELDS, **fields}
    chosen = draw(st.lists(st.sampled_from(sorted(every)), max_size=5, unique=True))
    body = {"model": MODEL, required: draw(every[required])}
    body.update({name: draw(every[name]) for name in chosen})
    spoil = draw(st.sampled_from(["none", "boundary", "boundary", "boundary", "value", "unknown", "model"]))
    if spoil == "boundary":
        name = draw(st.sampled_from(sorted(set(INTEGER_SLOTS) & set(every))))
        body[name] = INTEGER_SLOTS[name](draw(st.sampled_from(BOUNDARY_INTS)))
    elif spoil == "value":
        body[draw(st.sampled_from(sorted(body)))] = draw(ANY_JSON)
    elif spoil == "unknown":
        body.update(draw(UNKNOWN_FIELDS))
    elif spoil == "model":
        body["model"] = draw(ANY_JSON)
    return body


BODIES = (st.tuples(st.just("/v1/completions"), request_body("prompt", COMPLETION_FIELDS))
          | st.tuples(st.just("/v1/chat/completions"), request_body("messages", CHAT_FIELDS))
          | st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), ANY_JSON))


class Watchers:
    """A healthy stream after another, and /health polled, on threads, while the fuzz runs."""

    def __init__(self, url: str):
        self.url = url
        self.stop = threading.Event()
        self.stream_results: list[str] = []
        self.health_latencies: list[float] = []
        self.threads = [threading.Thread(target=self._streams, daemon=True),
                        threading.Thread(target=self._health, daemon=True)]

    def __enter__(self) -> "Watchers":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def _streams(self) -> None:
        body = {"model": MODEL, "prompt": "healthy", "max_tokens": 24, "stream": True, "ignore_eos": True,
                "temperature": 0.8, "seed": 1}
        while not self.stop.is_set():
            finish = "no finish"
            with httpx.stream("POST", f"{self.url}/v1/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[len("data: "):])
                        if "error" in chunk:
                            finish = f"error: {chunk['error']}"
                        elif chunk["choices"] and chunk["choices"][0]["finish_reason"]:
                            finish = chunk["choices"][0]["finish_reason"]
            self.stream_results.append(finish if response.status_code == 200 else f"HTTP {response.status_code}")

    def _health(self) -> None:
        while not self.stop.is_set():
            start = time.monotonic()
            status = httpx.get(f"{self.url}/health", timeout=30).status_code
            self.health_latencies.append(time.monotonic() - start if status == 200 else float("inf"))
            time.sleep(0.1)


@pytest.fixture(scope="module")
def live(tiny_llama_loaded):
    engine = engine_over(tiny_llama_loaded, device="cpu", max_model_len=128)
    with serving(build_app(server_config=ServerConfig(served_model_name=MODEL), engine=engine)) as (host, port):
        url = f"http://{host}:{port}"
        with httpx.Client(base_url=url, timeout=60) as client, Watchers(url) as watchers:
            yield client, watchers
        assert watchers.stream_results and set(watchers.stream_results) == {"length"}, watchers.stream_results
        assert max(watchers.health_latencies) < 2.0


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(request=BODIES)
def test_arbitrary_json_never_gets_a_server_error(live, request):
    client, watchers = live
    path, body = request
    content = json.dumps(body, allow_nan=True).encode()   # NaN and Infinity are not JSON: a 400 too
    response = client.post(path, content=content, headers={"Content-Type": "application/json"})
    assert response.status_code < 500, (body, response.text)
    if response.status_code != 200:
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"]
    else:
        assert "server_error" not in response.text, (body, response.text)
