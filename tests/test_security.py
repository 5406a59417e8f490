"""The server's guards (nanovllm/server/security.py): the API key on every route but /health, JSON
required on POST, the Host check against DNS rebinding, web origins refused unless allowed (CORS),
and connections that never finish their head or body closed on time. The timeouts are checked on a
real socket, against uvicorn running the app with the server's own protocol settings."""
from __future__ import annotations

import socket
import time
from contextlib import contextmanager
from typing import Iterator

import pytest
from fastapi.testclient import TestClient

from nanovllm.server import security
from nanovllm.server.security import SecurityConfig, default_allowed_hosts, uvicorn_settings
from conftest import serving

KEY = "s3cret-key"


COMPLETION = {"model": "m", "prompt": "Hi", "max_tokens": 2}


# ---- the API key -----------------------------------------------------------------------------

GUARDED = [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
           ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/metrics"), ("GET", "/docs"),
           ("GET", "/openapi.json"), ("GET", "/version"), ("GET", "/no-such-route")]


def test_the_api_key_guards_every_route_but_health(make_app):
    with TestClient(make_app(api_key=KEY)) as client:
        for method, path in GUARDED:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                            {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"}):
                response = client.request(method, path, json={}, headers=headers)
                assert response.status_code == 401, (method, path, headers)
                assert response.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/health").status_code == 200


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_the_bearer_scheme_is_read_in_any_case(make_app, scheme):
    with TestClient(make_app(api_key=KEY)) as client:
        headers = {"Authorization": f"{scheme} {KEY}"}
        assert client.get("/v1/models", headers=headers).status_code == 200
        assert client.get("/metrics", headers=headers).status_code == 200
        assert client.post("/v1/completions", json=COMPLETION, headers=headers).status_code == 200
        assert client.post("/tokenize", json={"prompt": "hi"}, headers=headers).status_code == 200


def test_the_key_is_compared_in_constant_time(make_app, monkeypatch):
    compared = []
    real = security.hmac.compare_digest
    monkeypatch.setattr(security.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    with TestClient(make_app(api_key=KEY)) as client:
        client.get("/v1/models", headers={"Authorization": "Bearer nope"})
        client.get("/v1/models", headers={"Authorization": "Basic nope"})
    assert compared == [(b"nope", KEY.encode())] * 2   # compared even when the scheme is wrong


# ---- what a web page can send ----------------------------------------------------------------


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonx"])
def test_a_post_that_is_not_json_gets_415(make_app, content_type):
    import json
    with TestClient(make_app()) as client:
        headers = {} if content_type is None else {"Content-Type": content_type}
        response = client.post("/v1/completions", content=json.dumps(COMPLETION), headers=headers)
        assert response.status_code == 415 and response.json()["error"]["code"] == "unsupported_media_type"
        ok = client.post("/v1/completions", content=json.dumps(COMPLETION),
                         headers={"Content-Type": "Application/JSON; charset=utf-8"})
        assert ok.status_code == 200


def test_a_foreign_web_origin_is_refused_by_default_and_same_origin_passes(make_app):
    with TestClient(make_app()) as client:
        for origin in ("http://evil.example", "null", "http://testserver.evil.example"):
            response = client.post("/v1/completions", json=COMPLETION, headers={"Origin": origin})
            assert response.status_code == 403 and response.json()["error"]["code"] == "origin_not_allowed"
            assert "access-control-allow-origin" not in response.headers
        preflight = client.options("/v1/completions", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in preflight.headers
        assert client.post("/v1/completions", json=COMPLETION, headers={"Origin": "http://testserver"}).status_code == 200


def test_allowed_origins_get_cors_headers_and_preflights_pass_without_the_key(make_app):
    app = make_app(api_key=KEY, security=SecurityConfig(allowed_origins=["http://app.example"]))
    with TestClient(app) as client:
        preflight = client.options("/v1/chat/completions", headers={
            "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://app.example"
        response = client.post("/v1/completions", json=COMPLETION,
                               headers={"Origin": "http://app.example", "Authorization": f"Bearer {KEY}"})
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "http://app.example"
        assert client.post("/v1/completions", json=COMPLETION, headers={
            "Origin": "http://other.example", "Authorization": f"Bearer {KEY}"}).status_code == 403


def test_the_host_header_must_name_the_server(make_app):
    app = make_app(security=SecurityConfig(allowed_hosts=default_allowed_hosts("127.0.0.1")))
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        for host in ("127.0.0.1:8000", "localhost:8000", "LOCALHOST", "[::1]:8000"):
            assert client.get("/health", headers={"Host": host}).status_code == 200, host
        for host in ("rebind.evil.example:8000", "127.0.0.1.evil.example", "", "[::2]:8000"):
            response = client.post("/v1/completions", json=COMPLETION, headers={"Host": host})
            assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_host", host


def test_the_default_allowed_hosts_follow_the_bound_address():
    assert set(default_allowed_hosts("127.0.0.1")) == {"localhost", "127.0.0.1", "::1"}
    assert set(default_allowed_hosts("::1")) == {"localhost", "127.0.0.1", "::1"}
    assert default_allowed_hosts("192.168.1.5") == ["192.168.1.5"]
    assert default_allowed_hosts("0.0.0.0") == default_allowed_hosts("::") == ["*"]


@pytest.mark.parametrize("name", ["header_timeout", "body_timeout", "keep_alive_timeout"])
def test_impossible_timeouts_raise_with_a_sentence(name):
    with pytest.raises(ValueError, match=f"{name} must be a positive number of seconds"):
        SecurityConfig(**{name: 0})


# ---- connections that never finish (a real socket) -------------------------------------------

TIMEOUT = 0.6


@pytest.fixture(scope="module")
def live_url(make_app) -> Iterator[tuple[str, int]]:
    settings = SecurityConfig(allowed_hosts=default_allowed_hosts("127.0.0.1"), header_timeout=TIMEOUT,
                              body_timeout=TIMEOUT, keep_alive_timeout=TIMEOUT)
    with serving(make_app(security=settings), **uvicorn_settings(settings)) as address:
        yield address


@contextmanager
def connection(address: tuple[str, int]) -> Iterator[socket.socket]:
    sock = socket.create_connection(address, timeout=10 * TIMEOUT)
    try:
        yield sock
    finally:
        sock.close()


def read_until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and the seconds that took."""
    start, received = time.monotonic(), b""
    while chunk := sock.recv(65536):
        received += chunk
    return received, time.monotonic() - start


def test_an_idle_connection_is_closed_after_the_header_timeout(live_url):
    with connection(live_url) as sock:
        received, seconds = read_until_closed(sock)
    assert received == b"" and TIMEOUT * 0.8 < seconds < TIMEOUT * 5


def test_half_sent_headers_are_closed_after_the_header_timeout(live_url):
    with connection(live_url) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n")
        time.sleep(TIMEOUT / 3)
        sock.sendall(b"X-Slow: 1\r\n")   # a byte now and then must not keep the connection open
        received, seconds = read_until_closed(sock)
    assert received == b"" and seconds < TIMEOUT * 5


def test_a_half_sent_body_gets_408_and_the_connection_closes(live_url):
    with connection(live_url) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"model\": ")
        received, seconds = read_until_closed(sock)
    assert received.startswith(b"HTTP/1.1 408 ") and b"request_timeout" in received
    assert seconds < TIMEOUT * 5


def test_an_idle_keep_alive_connection_is_closed_and_a_prompt_one_is_served(live_url):
    body = b'{"model": "m", "prompt": "Hi", "max_tokens": 2}'
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    with connection(live_url) as sock:
        sock.sendall(request)
        received, seconds = read_until_closed(sock)   # served, then closed once idle
    assert received.startswith(b"HTTP/1.1 200 ") and b'"finish_reason":"length"' in received


@pytest.mark.parametrize("argv, hosts, origins", [
    (["--host", "127.0.0.1"], {"localhost", "127.0.0.1", "::1"}, []),
    (["--host", "0.0.0.0"], {"*"}, []),
    (["--host", "10.0.0.7", "--allowed-hosts", "llm.example, 10.0.0.7", "--allowed-origins", "https://app.example"],
     {"llm.example", "10.0.0.7"}, ["https://app.example"]),
])
def test_serve_flags_make_the_security_settings(argv, hosts, origins):
    import argparse

    from nanovllm.server.cli import add_arguments
    from nanovllm.server.security import security_config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = security_config_from_args(parser.parse_args([*argv, "--header-timeout", "3"]))
    assert set(config.allowed_hosts) == hosts and config.allowed_origins == origins
    assert config.header_timeout == 3 and config.body_timeout == SecurityConfig().body_timeout


def test_a_web_pages_requests_are_refused_on_a_real_socket(live_url):
    import httpx

    host, port = live_url
    url = f"http://{host}:{port}/v1/completions"
    body = b'{"model": "m", "prompt": "Hi", "max_tokens": 2}'
    # The simple cross-origin POST a page can send without a preflight, and the same page's rebinding.
    page = httpx.post(url, content=body, headers={"Content-Type": "text/plain", "Origin": "http://evil.example"})
    rebound = httpx.post(url, content=body, headers={"Content-Type": "application/json",
                                                     "Host": f"evil.example:{port}"})
    plain = httpx.post(url, content=body, headers={"Content-Type": "text/plain"})
    assert (page.status_code, rebound.status_code, plain.status_code) == (403, 400, 415)
    assert httpx.post(url, content=body, headers={"Content-Type": "application/json"}).status_code == 200
