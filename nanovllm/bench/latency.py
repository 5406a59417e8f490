"""Latency: one request alone, as a chat user feels it.

Two numbers describe it. The time to first token (TTFT) is the prefill: the
whole prompt in one forward pass, then one sampled token. After that each
token costs one decode step, so the decode speed is

    (output tokens - 1) / (time of the last token - time of the first token)

which leaves the first token out (it belongs to the prefill). Both are the
median of several runs after one warm-up run, so a stray hiccup of a shared
machine does not decide the figure. Every run sends a prompt of its own: a
repeated prompt would be found in the prefix cache and skip its prefill.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

from tqdm import tqdm

from nanovllm.bench.harness import generate
from nanovllm.bench.workloads import Workload
from nanovllm.engine.engine import LLMEngine
from nanovllm.sampling_params import SamplingParams

DEFAULT_NUM_RUNS = 3


@dataclass
class LatencyRun:
    ttft: float                    # seconds from submit to the first token
    decode_time: float             # seconds from the first token to the last
    num_output_tokens: int

    @property
    def decode_tokens_per_second(self) -> float:
        return (self.num_output_tokens - 1) / self.decode_time

    @classmethod
    def from_token_times(cls, start: float, token_times: list[float]) -> "LatencyRun":
        """From the submit time and the time each output token arrived (same clock)."""
        if len(token_times) < 2:
            raise ValueError(f"a latency run needs at least 2 output tokens to time the decode, got "
                             f"{len(token_times)}; raise --output-len")
        return cls(token_times[0] - start, token_times[-1] - token_times[0], len(token_times))


@dataclass
class LatencyResult:
    runs: list[LatencyRun]

    @property
    def ttft(self) -> float:
        """Median seconds to the first token."""
        return statistics.median(run.ttft for run in self.runs)

    @property
    def decode_tokens_per_second(self) -> float:
        """Median decode speed (excluding the first token)."""
        return statistics.median(run.decode_tokens_per_second for run in self.runs)

    def as_dict(self) -> dict:
        return {"median_ttft_ms": self.ttft * 1e3, "median_decode_tokens_per_second": self.decode_tokens_per_second,
                "num_runs": len(self.runs),
                "runs": [{"ttft_ms": run.ttft * 1e3, "decode_time_s": run.decode_time,
                          "num_output_tokens": run.num_output_tokens,
                          "decode_tokens_per_second": run.decode_tokens_per_second} for run in self.runs]}

    def summary(self) -> str:
        return (f"Latency: TTFT {self.ttft * 1e3:.1f} ms, decode {self.decode_tokens_per_second:.2f} tokens/s "
                f"(median of {len(self.runs)} runs)")


def run_latency(engine: LLMEngine, workload: Workload, use_tqdm: bool = True,
                desc: str = "nano-vllm latency") -> LatencyResult:
    """The workload's requests one at a time, greedy with EOS ignored; the first is the untimed warm-up."""
    if len(workload.requests) < 2:
        raise ValueError("a latency workload needs a warm-up request and at least one timed one")
    runs = []
    for i, request in enumerate(tqdm(workload.requests, desc=desc, disable=not use_tqdm, dynamic_ncols=True)):
        params = SamplingParams(temperature=workload.temperature, ignore_eos=True, max_tokens=request.max_tokens)
        output = generate(engine, [request.prompt_token_ids], [params])[0]
        if i > 0:
            metrics = output.metrics
            runs.append(LatencyRun.from_token_times(metrics.arrival_time, metrics.token_times))
    return LatencyResult(runs)
