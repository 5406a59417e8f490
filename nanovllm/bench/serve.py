"""Serving benchmark: a client that sends requests to an OpenAI-compatible server as users would.

Users do not arrive all at once: requests come at random moments, on average R
per second. Independent arrivals at rate R form a Poisson process, whose gaps
are exponentially distributed with mean 1/R, so the client waits a random
`expovariate(R)` before sending each next request (R = inf sends all at once).
Each request streams (`"stream": true`, Server-Sent Events on /v1/completions),
and the client notes when every chunk arrives:

- TTFT, time to first token: from sending to the first chunk with text.
- TPOT, time per output token: (latency - TTFT) / (output tokens - 1), the
  decode speed one user sees, excluding the first token.
- ITL, inter-token latency: every gap between consecutive chunks.

Each as mean, median and p99, under the names vLLM's serving benchmark prints.
The client only measures; `--launch` starts the local server first.

A client written in Python can itself be the bottleneck: parsing thousands of
SSE chunks a second costs CPU. So before the real runs the client measures its
own *ceiling*: the same requests, all at once, against a stub server
(`StubServer`) that streams tokens as fast as it can. The figure is printed
beside the result: a server measured near the ceiling is limited by the client,
not by itself. `--client-processes N` spreads the requests over N client
processes (each its share, at its share of the rate) when one cannot keep up.
"""
from __future__ import annotations

import asyncio
import json
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

from tqdm import tqdm

from nanovllm.bench.workloads import Request, Workload

DEFAULT_URL = "http://127.0.0.1:8000"


@dataclass
class RequestRecord:
    prompt_len: int
    success: bool = False
    output_tokens: int = 0
    ttft: float = 0.0                                   # seconds
    latency: float = 0.0                                # seconds, send to last chunk
    itl: list[float] = field(default_factory=list)      # seconds between consecutive chunks
    error: str = ""


@dataclass
class ServeResult:
    request_rate: float
    duration: float                                     # seconds, first send to last response
    records: list[RequestRecord]
    client_ceiling: float | None = None                 # output tok/s this client reaches against a stub server

    def as_dict(self) -> dict:
        """vLLM's names (benchmark_serving's JSON)."""
        done = [r for r in self.records if r.success]
        output_tokens = sum(r.output_tokens for r in done)
        input_tokens = sum(r.prompt_len for r in done)
        metrics = {"request_rate": self.request_rate, "duration": self.duration, "completed": len(done),
                   "failed": len(self.records) - len(done), "total_input_tokens": input_tokens,
                   "total_output_tokens": output_tokens, "request_throughput": len(done) / self.duration,
                   "output_throughput": output_tokens / self.duration,
                   "total_token_throughput": (input_tokens + output_tokens) / self.duration,
                   "client_ceiling_output_throughput": self.client_ceiling}
        samples = {"ttft": [r.ttft for r in done],
                   "tpot": [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1],
                   "itl": [gap for r in done for gap in r.itl],
                   "e2el": [r.latency for r in done]}
        for name, values in samples.items():
            metrics[f"mean_{name}_ms"] = statistics.fmean(values) * 1e3 if values else 0.0
            metrics[f"median_{name}_ms"] = statistics.median(values) * 1e3 if values else 0.0
            metrics[f"std_{name}_ms"] = statistics.pstdev(values) * 1e3 if values else 0.0
            metrics[f"p99_{name}_ms"] = percentile(values, 99) * 1e3 if values else 0.0
        errors = sorted({r.error for r in self.records if not r.success})
        if errors:
            metrics["errors"] = errors
        return metrics

    def summary(self) -> str:
        """The block vLLM's serving benchmark prints."""
        m = self.as_dict()
        lines = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="="),
                 f"{'Request rate (req/s):':<40}{self.request_rate:<10}",
                 f"{'Successful requests:':<40}{m['completed']:<10}",
                 f"{'Benchmark duration (s):':<40}{m['duration']:<10.2f}",
                 f"{'Total input tokens:':<40}{m['total_input_tokens']:<10}",
                 f"{'Total generated tokens:':<40}{m['total_output_tokens']:<10}",
                 f"{'Request throughput (req/s):':<40}{m['request_throughput']:<10.2f}",
                 f"{'Output token throughput (tok/s):':<40}{m['output_throughput']:<10.2f}",
                 f"{'Total Token throughput (tok/s):':<40}{m['total_token_throughput']:<10.2f}"]
        if self.client_ceiling is not None:
            lines.append(f"{'Client ceiling, stub server (tok/s):':<40}{self.client_ceiling:<10.2f}")
        for name, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                            ("itl", "Inter-token Latency")):
            lines.append("{s:{c}^50}".format(s=title, c="-"))
            for stat in ("mean", "median", "p99"):
                label = f"{stat.capitalize() if stat != 'p99' else 'P99'} {name.upper()} (ms):"
                lines.append(f"{label:<40}{m[f'{stat}_{name}_ms']:<10.2f}")
        lines.append("=" * 50)
        return "\n".join(lines)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile with linear interpolation between ranks (numpy's default)."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def parse_rates(text: str) -> list[float]:
    """"1,4,inf" -> [1.0, 4.0, inf]."""
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--request-rate takes numbers separated by commas (inf: all at once), got {text!r}") from None
    if not rates or any(rate <= 0 for rate in rates):
        raise ValueError(f"--request-rate needs positive rates, got {text!r}")
    return rates


# ---- the client -----------------------------------------------------------------------------

async def send_request(client, url: str, model: str, request: Request, temperature: float) -> RequestRecord:
    """One streaming /v1/completions request; the record notes each chunk's arrival."""
    record = RequestRecord(prompt_len=len(request.prompt_token_ids))
    body = {"model": model, "prompt": request.prompt_token_ids, "max_tokens": request.max_tokens,
            "temperature": temperature, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    start = last = time.perf_counter()
    chunks_with_text, usage_tokens = 0, None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:200]}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                if not any(choice.get("text") for choice in chunk.get("choices") or []):
                    continue
                now = time.perf_counter()
                if chunks_with_text == 0:
                    record.ttft = now - start
                else:
                    record.itl.append(now - last)
                last = now
                chunks_with_text += 1
    except Exception as error:   # a failed request is counted, not fatal
        record.error = f"{type(error).__name__}: {error}"
        return record
    record.latency = last - start
    record.output_tokens = usage_tokens if usage_tokens is not None else chunks_with_text
    record.success = chunks_with_text > 0
    if not record.success:
        record.error = "the stream carried no text"
    return record


async def run_serve(url: str, model: str, workload: Workload, request_rate: float, seed: int = 0,
                    use_tqdm: bool = True) -> ServeResult:
    """Send every request of `workload` at Poisson times of rate `request_rate`; wait for all."""
    records, start, end = await _send_all(url, model, workload.requests, workload.temperature, request_rate, seed,
                                          use_tqdm)
    return ServeResult(request_rate, end - start, records)


async def _send_all(url: str, model: str, requests: list[Request], temperature: float, request_rate: float,
                    seed: int, use_tqdm: bool) -> tuple[list[RequestRecord], float, float]:
    """-> the records, and the wall-clock times (time.time()) of the first send and the last response."""
    import httpx

    rng = random.Random(seed)
    timeout = httpx.Timeout(None, connect=30.0)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    bar = tqdm(total=len(requests), desc=f"serve @ {request_rate} req/s", disable=not use_tqdm,
               dynamic_ncols=True)

    async def tracked(client, request: Request) -> RequestRecord:
        record = await send_request(client, url, model, request, temperature)
        bar.update(1)
        return record

    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        start = time.time()
        tasks = []
        for i, request in enumerate(requests):
            if i > 0 and request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))
            tasks.append(asyncio.create_task(tracked(client, request)))
        records = await asyncio.gather(*tasks)
        end = time.time()
    bar.close()
    return list(records), start, end


def run_serve_processes(url: str, model: str, workload: Workload, request_rate: float, num_processes: int,
                        seed: int = 0, use_tqdm: bool = True) -> ServeResult:
    """`run_serve` spread over `num_processes` client processes: process i sends requests i, i + N, ...
    at rate request_rate / N (a Poisson process split N ways is N Poisson processes)."""
    if num_processes == 1:
        return asyncio.run(run_serve(url, model, workload, request_rate, seed, use_tqdm))
    import multiprocessing

    shares = [(url, model, workload.requests[i::num_processes], workload.temperature, request_rate / num_processes,
               seed + i) for i in range(num_processes)]
    with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
        results = pool.starmap(_send_share, shares)
    records = [record for share_records, _, _ in results for record in share_records]
    start, end = min(r[1] for r in results), max(r[2] for r in results)
    return ServeResult(request_rate, end - start, records)


def _send_share(url: str, model: str, requests: list[Request], temperature: float, request_rate: float,
                seed: int) -> tuple[list[RequestRecord], float, float]:
    return asyncio.run(_send_all(url, model, requests, temperature, request_rate, seed, use_tqdm=False))


def measure_client_ceiling(workload: Workload, num_processes: int, use_tqdm: bool = True) -> float:
    """Output tok/s of this client sending `workload` all at once to a stub server that streams as fast
    as it can: above this the client, not the server, would be the limit."""
    with StubServer() as stub:
        result = run_serve_processes(stub.url, StubServer.MODEL, workload, float("inf"), num_processes,
                                     use_tqdm=use_tqdm)
    if result.as_dict()["failed"]:
        raise RuntimeError(f"the stub server failed requests: {result.as_dict().get('errors')}")
    return result.as_dict()["output_throughput"]


class StubServer:
    """An OpenAI-shaped server in a child process that does no work: each streamed completion is
    `max_tokens` one-token SSE chunks, sent as fast as the event loop allows."""

    MODEL = "stub"

    def __init__(self) -> None:
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "StubServer":
        import httpx

        self.process = subprocess.Popen([sys.executable, "-m", "uvicorn", "nanovllm.bench.serve:stub_app",
                                         "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                httpx.get(self.url + "/v1/models", timeout=1.0)
                return self
            except httpx.HTTPError:
                time.sleep(0.2)
        self.__exit__()
        raise RuntimeError("the stub server did not start within 60 s")

    def __exit__(self, *exc_info) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait()


async def stub_app(scope, receive, send) -> None:
    """The stub server's ASGI app (plain ASGI: the framework would cost more than the stub)."""
    if scope["type"] != "http":
        return
    if scope["path"] == "/v1/models":
        body = json.dumps({"object": "list", "data": [{"id": StubServer.MODEL, "object": "model"}]}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})
        return
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    max_tokens = json.loads(b"".join(chunks))["max_tokens"]
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    token = b'data: {"id":"stub","object":"text_completion","choices":[{"index":0,"text":"x","finish_reason":null}]}\n\n'
    for _ in range(max_tokens - 1):
        await send({"type": "http.response.body", "body": token, "more_body": True})
    last = ('data: {"id":"stub","object":"text_completion","choices":[{"index":0,"text":"x","finish_reason":"length"}],'
            f'"usage":{{"prompt_tokens":1,"completion_tokens":{max_tokens},"total_tokens":{max_tokens + 1}}}}}\n\n'
            'data: [DONE]\n\n')
    await send({"type": "http.response.body", "body": last.encode()})


def served_model_name(url: str) -> str:
    """The first model the server lists at /v1/models."""
    import httpx

    try:
        response = httpx.get(url + "/v1/models", timeout=30.0)
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as error:
        raise ValueError(f"no model listed at {url}/v1/models ({error}); is an OpenAI-compatible server "
                         "running there? start one with `nano-vllm serve` or pass --launch") from None


# ---- launching the local server -------------------------------------------------------------

class LocalServer:
    """`nano-vllm serve` in a child process, for the length of a `with` block."""

    def __init__(self, serve_args: list[str], port: int, startup_timeout: float = 600.0):
        self.url = f"http://127.0.0.1:{port}"
        self.command = [sys.executable, "-m", "nanovllm.cli", "serve", *serve_args,
                        "--host", "127.0.0.1", "--port", str(port)]
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "LocalServer":
        import importlib.util

        import httpx

        if importlib.util.find_spec("nanovllm.server.cli") is None:
            raise ValueError("this nano-vllm has no server (nanovllm.server.cli) to launch; start an "
                             "OpenAI-compatible server yourself and pass --url")
        self.process = subprocess.Popen(self.command)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.process.returncode} while starting: "
                                   f"{' '.join(self.command)}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.__exit__()
        raise RuntimeError(f"the server did not answer {self.url}/health within {self.startup_timeout:.0f} s")

    def __exit__(self, *exc_info) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
