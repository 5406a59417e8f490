"""Probe: where a step's time goes when half the batch is under a JSON schema.

Runs tools/structured_throughput.py's two workloads once each (after a warm-up) with timers
around the grammar work: on the engine's side the wait for the last step's samples (their
tokens are sent to the grammar process), the sending of the step's tokens (start), the wait of
the next launch for the masks (finish, which queues their copy), and engine.step as a whole; in
the grammar process its accepting and filling (structured/grammar_process.py). Around the rest of
the engine thread's work too (nested timers overlap: a launch holds the graph's and the
sampler's): scheduling, the decode graph's host inputs and its copies and replay, the sampling
settings built on the host, the deferred sampling queued by the next launch, and completing a
step. Prints per-step means.

    python tools/structured_breakdown.py --dummy llama-3.2-1b --tokenizer DIR
"""
from __future__ import annotations

import argparse
import collections
import random
import time

import nanovllm.runner.model_runner as model_runner
from nanovllm.bench.harness import generate
from nanovllm.engine.scheduler import Scheduler
from nanovllm.runner.cuda_graph import DecodeGraphs
from nanovllm.runner.model_runner import ModelRunner
from nanovllm.runner.sampler import DeferredSamples, Sampler
from nanovllm.bench.workloads import BENCH_JSON_SCHEMA
from nanovllm.config import EngineConfig
from nanovllm.engine.engine import LLMEngine
from nanovllm.sampling_params import SamplingParams
from nanovllm.structured.grammar_process import GrammarBitmask

TIMES: dict[str, float] = collections.defaultdict(float)
COUNTS: dict[str, int] = collections.defaultdict(int)


def timed(name, function):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            TIMES[name] += time.perf_counter() - start
            COUNTS[name] += 1
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dummy", default="llama-3.2-1b")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--num-requests", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--shares", default="0,2,0,2", help="every k-th request constrained, one run each (0: none)")
    args = parser.parse_args()
    engine = LLMEngine(EngineConfig(model=args.dummy, load_format="dummy", tokenizer=args.tokenizer))
    GrammarBitmask.start = timed("start (send the step's tokens)", GrammarBitmask.start)
    GrammarBitmask.finish = timed("finish (launch waits for masks)", GrammarBitmask.finish)
    model_runner._newest_token_ids = timed("wait last samples", model_runner._newest_token_ids)
    engine.step = timed("engine.step", engine.step)
    for owner, name, label in [(Scheduler, "schedule", "schedule"), (ModelRunner, "launch", "launch (all of it)"),
                               (DecodeGraphs, "prepare", "  graph: host inputs"),
                               (DecodeGraphs, "run", "  graph: copies, replay"),
                               (ModelRunner, "prepare_sampling", "  sampling settings built"),
                               (DeferredSamples, "finish", "  deferred sampling queued"),
                               (Sampler, "sample", "    sampler queued"),
                               (LLMEngine, "_complete", "complete (tokens in, stop checks)")]:
        setattr(owner, name, timed(label, getattr(owner, name)))
    vocab = min(engine.tokenizer.vocab_size, engine.model_config.vocab_size)
    rng = random.Random(0)
    prompts = [[rng.randrange(vocab) for _ in range(256)] for _ in range(args.num_requests)]
    for share in [int(k) for k in args.shares.split(",")]:
        params = [SamplingParams(temperature=1.0, seed=i, max_tokens=args.output_len, ignore_eos=True,
                                 structured_outputs={"json": BENCH_JSON_SCHEMA} if share and i % share == 0 else None)
                  for i in range(args.num_requests)]
        TIMES.clear(); COUNTS.clear()
        masks = engine.runner.grammar_masks
        busy = masks.busy_seconds() if masks is not None else (0.0, 0.0)
        start = time.perf_counter()
        outputs = generate(engine, prompts, params)
        elapsed = time.perf_counter() - start
        masks = engine.runner.grammar_masks
        if masks is not None:
            accept, fill = masks.busy_seconds()
            TIMES["grammar process: accept"], TIMES["grammar process: fill"] = accept - busy[0], fill - busy[1]
            COUNTS["grammar process: accept"] = COUNTS["grammar process: fill"] = COUNTS["finish (launch waits for masks)"]
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        steps = COUNTS["engine.step"]
        print(f"share {share}: {tokens / elapsed:,.0f} tok/s, {elapsed:.2f} s, {steps} steps, "
              f"{1e3 * elapsed / steps:.2f} ms/step")
        for name in TIMES:
            print(f"   {name:34s} {1e3 * TIMES[name] / max(steps, 1):7.3f} ms/step  ({COUNTS[name]} calls)")


if __name__ == "__main__":
    main()
