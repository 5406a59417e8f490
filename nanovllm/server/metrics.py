"""What the server tells an operator: Prometheus metrics and a periodic log line.

`/metrics` is read by Prometheus every few seconds. Two kinds of numbers:

- the engine's state and counters (requests running and waiting, KV blocks in
  use, prefix-cache hits, preemptions, tokens), read from the async engine's
  latest stats snapshot when scraped: `EngineCollector`;
- per-request latencies (time to first token, time per output token, end to
  end), observed into histograms as each request finishes: `RequestMetrics`.

Each app has its own `CollectorRegistry`, so one process (a test) can hold
several servers. Names follow vLLM's (`vllm:` becomes `nanovllm:`) so its
dashboards need only a prefix change.

`StatLogger` writes vLLM's familiar line every few seconds while there is work:
prompt and generation throughput, running and waiting sequences, KV-cache
usage, prefix-cache hit rate.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from nanovllm.engine.async_engine import AsyncLLMEngine
from nanovllm.outputs import RequestOutput

logger = logging.getLogger("nanovllm.server")

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0)


class EngineCollector(Collector):
    """The engine's stats snapshot as Prometheus gauges and counters, computed at scrape time."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str):
        self.engine = engine
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats
        kv = stats.kv_usage

        def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(f"nanovllm:{name}", documentation, labels=["model_name"])
            family.add_metric([self.model_name], value)
            return family

        def counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(f"nanovllm:{name}", documentation, labels=["model_name"])
            family.add_metric([self.model_name], value)
            return family

        yield gauge("num_requests_running", "Sequences holding KV blocks.", stats.num_running)
        yield gauge("num_requests_waiting", "Sequences waiting to run (new, preempted, or waiting for their "
                    "prompt's prefill).", stats.num_waiting)
        yield gauge("num_unfinished_requests", "Requests the server is still serving.",
                    self.engine.num_unfinished_requests)
        yield gauge("kv_cache_usage_perc", "Fraction of the KV-cache blocks in use (1 = full).",
                    stats.kv_cache_usage)
        yield gauge("kv_cache_num_blocks", "KV-cache blocks in the pool.", kv.num_blocks)
        yield gauge("kv_cache_capacity_tokens", "Tokens the KV-cache pool holds (blocks x block size).",
                    kv.total_slots)
        info = GaugeMetricFamily("nanovllm:cache_config_info", "The KV cache's configuration, in its labels.",
                                 labels=["model_name", "cache_dtype", "block_size"])
        info.add_metric([self.model_name, self.engine.info.kv_cache_dtype, str(kv.block_size)], 1)
        yield info
        yield gauge("kv_cache_used_blocks", "KV-cache blocks held by live sequences.", kv.used_blocks)
        yield gauge("kv_cache_free_blocks", "KV-cache blocks free (including cached prefixes kept for reuse).",
                    kv.free_blocks)
        yield gauge("prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / prompt tokens looked up.",
                    kv.prefix_cache_hit_rate)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      kv.prefix_cache_queries)
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", kv.prefix_cache_hits)
        yield counter("num_preemptions", "Sequences preempted (KV freed, recomputed later).",
                      stats.num_preemptions)
        yield counter("prompt_tokens", "Prompt tokens of the requests received.", stats.prompt_tokens_total)
        yield counter("generation_tokens", "Tokens generated.", stats.generation_tokens_total)
        yield counter("num_steps", "Engine steps run.", stats.num_steps)


class RequestMetrics:
    """Histograms and counters observed once per finished request (the async engine's on_finished)."""

    def __init__(self, registry: CollectorRegistry, model_name: str):
        self.model_name = model_name
        labels = ["model_name"]
        self.time_to_first_token = Histogram(
            "nanovllm:time_to_first_token_seconds", "Arrival to first generated token.", labels,
            registry=registry, buckets=_LATENCY_BUCKETS)
        self.time_per_output_token = Histogram(
            "nanovllm:time_per_output_token_seconds", "Mean time between a request's generated tokens.", labels,
            registry=registry, buckets=_LATENCY_BUCKETS)
        self.e2e_request_latency = Histogram(
            "nanovllm:e2e_request_latency_seconds", "Arrival to the last token (or the abort).", labels,
            registry=registry, buckets=_LATENCY_BUCKETS)
        self.request_success = Counter(
            "nanovllm:request_success", "Requests finished, by finish reason.", labels + ["finished_reason"],
            registry=registry)

    def observe(self, output: RequestOutput) -> None:
        metrics = output.metrics
        model = self.model_name
        if metrics.time_to_first_token is not None:
            self.time_to_first_token.labels(model).observe(metrics.time_to_first_token)
        times = metrics.token_times
        if len(times) > 1:
            self.time_per_output_token.labels(model).observe((times[-1] - times[0]) / (len(times) - 1))
        end = metrics.finish_time if metrics.finish_time is not None else time.time()
        self.e2e_request_latency.labels(model).observe(end - metrics.arrival_time)
        for completion in output.outputs:
            self.request_success.labels(model, completion.finish_reason or "abort").inc()


def make_registry(engine: AsyncLLMEngine, model_name: str) -> tuple[CollectorRegistry, RequestMetrics]:
    """A fresh registry with the engine's collector, the request histograms and the process's memory/CPU."""
    registry = CollectorRegistry()
    registry.register(EngineCollector(engine, model_name))
    ProcessCollector(registry=registry)
    return registry, RequestMetrics(registry, model_name)


class StatLogger:
    """Logs throughput and load every `interval` seconds while the engine has work (silent when idle)."""

    def __init__(self, engine: AsyncLLMEngine, interval: float):
        self.engine = engine
        self.interval = interval

    async def run(self) -> None:
        stats = self.engine.stats
        last_time, last_prefill, last_generation = time.monotonic(), stats.prefill_tokens_total, \
            stats.generation_tokens_total
        while True:
            await asyncio.sleep(self.interval)
            stats, now = self.engine.stats, time.monotonic()
            prefill = stats.prefill_tokens_total - last_prefill
            generation = stats.generation_tokens_total - last_generation
            if prefill or generation or stats.num_running or stats.num_waiting:
                elapsed = now - last_time
                logger.info("Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
                            "Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%, "
                            "Prefix cache hit rate: %.1f%%", prefill / elapsed, generation / elapsed,
                            stats.num_running, stats.num_waiting, 100 * stats.kv_cache_usage,
                            100 * stats.prefix_cache_hit_rate)
            last_time, last_prefill, last_generation = now, stats.prefill_tokens_total, \
                stats.generation_tokens_total
