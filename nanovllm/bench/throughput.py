"""Offline throughput: submit every request at once, time until the last token.

This is what a batch job sees: the engine may order and batch the requests as
it likes (continuous batching, chunked prefill), and only the wall time from
submitting the first request to receiving the last token counts. The figures
carry the names of vLLM's `benchmark_throughput`: requests/s, total tokens/s
(prompt + output) and output tokens/s, the one docs/benchmarks.md compares.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from nanovllm.bench.harness import generate
from nanovllm.bench.workloads import BENCH_JSON_SCHEMA, Workload
from nanovllm.engine.engine import LLMEngine
from nanovllm.sampling_params import SamplingParams

WARMUP_MAX_TOKENS = 16


@dataclass
class ThroughputResult:
    elapsed_time: float            # seconds, from submit to the last token
    num_requests: int
    total_input_tokens: int
    total_output_tokens: int       # tokens actually generated

    @property
    def requests_per_second(self) -> float:
        return self.num_requests / self.elapsed_time

    @property
    def tokens_per_second(self) -> float:
        """Prompt and output tokens per second (vLLM's "total tokens/s")."""
        return (self.total_input_tokens + self.total_output_tokens) / self.elapsed_time

    @property
    def output_tokens_per_second(self) -> float:
        return self.total_output_tokens / self.elapsed_time

    def as_dict(self) -> dict:
        return {"elapsed_time": self.elapsed_time, "num_requests": self.num_requests,
                "total_input_tokens": self.total_input_tokens, "total_output_tokens": self.total_output_tokens,
                "total_num_tokens": self.total_input_tokens + self.total_output_tokens,
                "requests_per_second": self.requests_per_second, "tokens_per_second": self.tokens_per_second,
                "output_tokens_per_second": self.output_tokens_per_second}

    def summary(self) -> str:
        """vLLM's line."""
        return (f"Throughput: {self.requests_per_second:.2f} requests/s, {self.tokens_per_second:.2f} total tokens/s, "
                f"{self.output_tokens_per_second:.2f} output tokens/s")


def run_throughput(engine: LLMEngine, workload: Workload, use_tqdm: bool = True) -> ThroughputResult:
    """One warm-up request, then every request of `workload` at once (EOS ignored; its share under the JSON
    schema constrained). The warm-up is under the schema too when some requests are, so that the grammar
    process has started (seconds: it imports torch and xgrammar) and compiled it before the clock starts."""
    first = workload.requests[0]
    constrained = workload.structured_output_ratio > 0
    generate(engine, [first.prompt_token_ids], [SamplingParams(
        temperature=workload.temperature, ignore_eos=True, max_tokens=min(first.max_tokens, WARMUP_MAX_TOKENS),
        structured_outputs={"json": BENCH_JSON_SCHEMA} if constrained else None)])
    prompts = [r.prompt_token_ids for r in workload.requests]
    params = [SamplingParams(temperature=workload.temperature, ignore_eos=True, max_tokens=r.max_tokens,
                             structured_outputs={"json": BENCH_JSON_SCHEMA} if workload.constrained(i) else None)
              for i, r in enumerate(workload.requests)]
    start = time.perf_counter()
    outputs = generate(engine, prompts, params, use_tqdm, desc=f"nano-vllm {workload.name}")
    elapsed = time.perf_counter() - start
    generated = sum(len(output.outputs[0].token_ids) for output in outputs)
    if generated != workload.output_tokens:
        raise RuntimeError(f"the engine generated {generated} tokens where the workload asks for "
                           f"{workload.output_tokens} (EOS ignored); the figure would be wrong")
    return ThroughputResult(elapsed, len(outputs), workload.input_tokens, generated)
