"""Throughput with half the requests under a JSON schema against none constrained.

The cost of structured outputs in a full batch: each constrained row's grammar matcher
takes its last token and fills its bitmask on the host every step (after the step's
forward is queued, so while the device computes), the mask goes to the device in one
copy and is applied to the constrained rows' logits. Both workloads generate the same
number of tokens (EOS ignored; a grammar that has finished allows only EOS).

Dummy weights of a built-in config, with a real tokenizer's vocabulary for the grammar
(--tokenizer, else the embedded SmolLM2's, else a byte-level one). Both workloads run
once untimed first (kernels compiled, CUDA graphs and the grammar warm), then
`--rounds` times each, alternating; each keeps its best round.

    python tools/structured_throughput.py --dummy llama-3.2-1b --json OUT.json
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from nanovllm.bench.harness import generate
from nanovllm.bench.workloads import BENCH_JSON_SCHEMA
from nanovllm.config import EngineConfig
from nanovllm.engine.engine import LLMEngine
from nanovllm.sampling_params import SamplingParams



def tokenizer_path() -> str:
    from nanovllm.model.loader import resolve_model
    try:
        return resolve_model(None)   # the embedded SmolLM2 GGUF: its tokenizer
    except (ValueError, OSError):
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from conftest import save_byte_tokenizer
        directory = tempfile.mkdtemp()
        save_byte_tokenizer(Path(directory))
        return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dummy", default="llama-3.2-1b")
    parser.add_argument("--tokenizer", default=None, help="a HuggingFace tokenizer directory (default: SmolLM2's)")
    parser.add_argument("--num-requests", type=int, default=512)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    tokenizer = args.tokenizer or tokenizer_path()
    engine = LLMEngine(EngineConfig(model=args.dummy, load_format="dummy", tokenizer=tokenizer))
    vocab = min(engine.tokenizer.vocab_size, engine.model_config.vocab_size)
    rng = random.Random(0)
    prompts = [[rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(args.num_requests)]

    def workload(constrained_share: int) -> list[SamplingParams]:
        """Every `constrained_share`-th request under the schema (0: none)."""
        return [SamplingParams(temperature=1.0, seed=i, max_tokens=args.output_len, ignore_eos=True,
                               structured_outputs={"json": BENCH_JSON_SCHEMA}
                               if constrained_share and i % constrained_share == 0 else None)
                for i in range(args.num_requests)]

    def run(params: list[SamplingParams]) -> float:
        """-> output tokens per second."""
        start = time.perf_counter()
        outputs = generate(engine, prompts, params)
        elapsed = time.perf_counter() - start
        return sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed

    workloads = {"none": workload(0), "half": workload(2)}
    for params in workloads.values():   # warm-up: the same shapes as the measured runs
        run(params)
    rounds: dict[str, list[float]] = {name: [] for name in workloads}
    for _ in range(args.rounds):
        for name, params in workloads.items():
            rounds[name].append(run(params))
    best = {name: max(values) for name, values in rounds.items()}
    loss = 1 - best["half"] / best["none"]
    print(f"tokenizer {tokenizer} ({vocab} tokens under {engine.model_config.vocab_size} logits)")
    print(f"{'none constrained':>18s} {'half constrained':>18s} {'loss':>8s}   (output tok/s, best of {args.rounds})")
    print(f"{best['none']:18,.0f} {best['half']:18,.0f} {100 * loss:7.1f}%   (target: at most 10%)")
    print("rounds: " + "; ".join(f"{name} " + ", ".join(f"{v:,.0f}" for v in values)
                                 for name, values in rounds.items()))
    if args.json:
        results = {"output_tokens_per_s": best, "rounds": rounds, "loss_half_constrained": loss,
                   "config": {**vars(args), "tokenizer": tokenizer,
                              "async_scheduling": engine.config.async_scheduling}}
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
