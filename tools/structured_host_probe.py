"""Probe: the engine thread's host time per step with half the batch under a JSON schema, on the CPU.

On the GPU a step of 256 rows is bound by the host when the engine's Python outruns the
forward (about 2.9 ms for Llama-3.2-1B on an H200), so every microsecond of Python that a
constrained row adds counts. This runs `bench throughput`'s shape on a tiny random Llama (byte
vocabulary, CPU, async scheduling on as on one GPU): all rows plain, then every second row under
BENCH_JSON_SCHEMA, and times the engine's phases. The forward and the waits for the grammar
process are timed too and subtracted: what is left is the Python a GPU step would run.

    phase                what it times
    schedule             Scheduler.schedule
    launch: inputs       ModelRunner.prepare_inputs (the GPU's decode graph fills its own instead)
    launch: forward      the model and its LM head (subtracted)
    launch: settings     ModelRunner.prepare_sampling (a decode graph's step of plain and grammar rows
                         takes the graph's temperatures and keys instead)
    launch: sampler      Sampler.sample (a decode graph samples plain rows itself)
    grammar: start       GrammarBitmask.start (the step's tokens to the grammar process)
    grammar: finish      GrammarBitmask.finish less its wait (the status, the copy of the masks)
    grammar: wait        the wait for the grammar process (subtracted)
    advance, complete    Scheduler.advance, LLMEngine._complete (tokens in, stop checks)
    host                 engine.step less forward and waits

    python tools/structured_host_probe.py [--requests 256] [--output-len 64] [--profile]
"""
from __future__ import annotations

import argparse
import cProfile
import collections
import pstats
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from nanovllm.bench.harness import generate
from nanovllm.bench.workloads import BENCH_JSON_SCHEMA
from nanovllm.config import EngineConfig
from nanovllm.engine.engine import LLMEngine
from nanovllm.engine.scheduler import Scheduler
from nanovllm.model.llama import LlamaForCausalLM
from nanovllm.runner.model_runner import ModelRunner
from nanovllm.runner.sampler import Sampler
from nanovllm.sampling_params import SamplingParams
from nanovllm.structured.grammar_process import GrammarBitmask

TIMES: dict[str, float] = collections.defaultdict(float)   # the step running: seconds per phase
STEPS: list[dict[str, float]] = []                            # each step's, once it has run


def timed(owner: type, attribute: str, name: str) -> None:
    """Wrap owner.attribute so that its calls add their seconds to TIMES[name]; the step's wrapper
    ("step") then files the step's times in STEPS."""
    function = getattr(owner, attribute)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            TIMES[name] += time.perf_counter() - start
            if name == "step":
                STEPS.append(dict(TIMES))
                TIMES.clear()
    setattr(owner, attribute, wrapper)


def medians(steps: list[dict[str, float]]) -> dict[str, float]:
    """Per phase, the median over the steps of its milliseconds; "host": the step less its forward and
    its wait for the grammar process, "grammar: finish" less that wait. Medians: on a shared CPU a
    step now and then takes several times its usual time."""
    def phases(step: dict[str, float]) -> dict[str, float]:
        wait = step.get("grammar: wait", 0.0)
        derived = {"host": step["step"] - step.get("launch: forward", 0.0) - wait}
        if "grammar: finish" in step:
            derived["grammar: finish"] = step["grammar: finish"] - wait
        return {**step, **derived}
    per_step = [phases(step) for step in steps]
    names = {name for step in per_step for name in step}
    return {name: 1e3 * statistics.median(step.get(name, 0.0) for step in per_step) for name in names}


def tiny_llama() -> str:
    """A random tiny Llama with a byte-level tokenizer (tests/conftest.py's), in a temporary directory."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import write_tiny_model
    return str(write_tiny_model(Path(tempfile.mkdtemp()) / "tiny-llama", max_position_embeddings=1024))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=256, help="all in one batch (max_num_seqs)")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="of each workload, alternating")
    parser.add_argument("--profile", action="store_true", help="cProfile one round of each; top functions")
    args = parser.parse_args()
    torch.set_num_threads(1)
    engine = LLMEngine(EngineConfig(model=tiny_llama(), device="cpu", dtype="float32", async_scheduling=True,
                                    max_num_seqs=args.requests, max_model_len=args.input_len + args.output_len + 8,
                                    max_num_batched_tokens=max(2048, args.requests * args.input_len)))
    timed(Scheduler, "schedule", "schedule")
    timed(ModelRunner, "prepare_inputs", "launch: inputs")
    timed(LlamaForCausalLM, "forward", "launch: forward")
    timed(LlamaForCausalLM, "compute_logits", "launch: forward")
    timed(ModelRunner, "prepare_sampling", "launch: settings")
    timed(Sampler, "sample", "launch: sampler")
    timed(GrammarBitmask, "start", "grammar: start")
    timed(GrammarBitmask, "finish", "grammar: finish")
    timed(GrammarBitmask, "_wait", "grammar: wait")
    timed(Scheduler, "advance", "advance")
    timed(LLMEngine, "_complete", "complete")
    timed(LLMEngine, "step_with_deltas", "step")
    rng = random.Random(0)
    prompts = [[rng.randrange(256) for _ in range(args.input_len)] for _ in range(args.requests)]

    def workload(share: int) -> list[SamplingParams]:
        return [SamplingParams(temperature=1.0, seed=i, max_tokens=args.output_len, ignore_eos=True,
                               structured_outputs={"json": BENCH_JSON_SCHEMA} if share and i % share == 0 else None)
                for i in range(args.requests)]

    workloads = {"none constrained": workload(0), "half constrained": workload(2)}
    for params in workloads.values():   # warm-up: the grammar process started, the schema compiled
        generate(engine, prompts, params)
    steps: dict[str, list[dict[str, float]]] = {label: [] for label in workloads}
    for _ in range(args.rounds):
        for label, params in workloads.items():
            STEPS.clear()
            generate(engine, prompts, params)
            steps[label] += STEPS
    best = {label: medians(label_steps) for label, label_steps in steps.items()}
    names = ["schedule", "launch: inputs", "launch: forward", "launch: settings", "launch: sampler", "grammar: start",
             "grammar: finish", "grammar: wait", "advance", "complete", "step", "host"]
    print(f"{args.requests} rows, {args.input_len}/{args.output_len} tokens; ms per step, median over the steps of "
          f"{args.rounds} rounds")
    print(f"{'phase':20s}" + "".join(f"{label:>18s}" for label in best))
    for name in names:
        print(f"{name:20s}" + "".join(f"{values.get(name, 0.0):18.3f}" for values in best.values()))
    extra = best["half constrained"]["host"] - best["none constrained"]["host"]
    print(f"host time the constrained rows add: {extra:.3f} ms per step")
    if args.profile:
        for label, params in workloads.items():
            profiler = cProfile.Profile()
            profiler.enable()
            generate(engine, prompts, params)
            profiler.disable()
            print(f"\n== {label}: top functions by own time")
            stats = pstats.Stats(profiler).sort_stats("tottime")
            stats.print_stats(25)
            print(f"== {label}: the runner's, sampler's and grammar's functions, by cumulative time")
            stats.sort_stats("cumulative").print_stats("model_runner|sampler|grammar|sampling|bitmask", 30)
    engine.shutdown()


if __name__ == "__main__":
    main()
