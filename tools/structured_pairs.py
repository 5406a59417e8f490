"""Throughput with half the requests under a JSON schema against none, in alternation, in one engine.

`nano-vllm bench throughput --dummy llama-3.2-1b --tokenizer DIR --dataset random --num-prompts 512
--input-len 256 --output-len 256 --structured-output-ratio R` for R = 0 and 0.5, run as the bench runs
them (`run_throughput`: the same kind of workload, warm-up and token check), but alternating in one
process (0, 0.5, 0, 0.5, ...) so that a slow stretch of the machine touches both figures alike; one
untimed round of each first. Each run draws prompts of its own, so that none is served from the prefix
cache. Single runs of either vary by 10% or more from one process to the next, so the loss is the ratio
of the medians (and, beside it, the median of each pair's loss).

    python tools/structured_pairs.py --tokenizer DIR [--rounds 3] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics

from nanovllm.bench.harness import make_engine
from nanovllm.bench.throughput import run_throughput
from nanovllm.bench.workloads import random_workload
from nanovllm.config import EngineConfig

RATIOS = (0.0, 0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dummy", default="llama-3.2-1b")
    parser.add_argument("--tokenizer", required=True, help="a HuggingFace tokenizer directory, for the grammar")
    parser.add_argument("--num-prompts", type=int, default=512)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    engine = make_engine(EngineConfig(model=args.dummy, load_format="dummy", tokenizer=args.tokenizer))
    seeds = itertools.count(1)

    def run(ratio: float) -> float:
        """-> output tokens per second of one run at `ratio`, on prompts of its own: a run on the prompts
        of an earlier one would find them in the prefix cache and skip their prefill."""
        workload = random_workload(args.num_prompts, args.input_len, args.output_len, engine.model_config.vocab_size,
                                   seed=next(seeds))
        workload.structured_output_ratio = ratio
        return run_throughput(engine, workload, use_tqdm=False).output_tokens_per_second

    for ratio in RATIOS:   # untimed: the grammar process started, every kernel and shape warm
        run(ratio)
    rounds: dict[float, list[float]] = {ratio: [] for ratio in RATIOS}
    for round_number in range(args.rounds):
        for ratio in RATIOS:
            rounds[ratio].append(run(ratio))
        none, half = rounds[0.0][-1], rounds[0.5][-1]
        print(f"round {round_number + 1}: ratio 0 {none:9,.0f}  ratio 0.5 {half:9,.0f} output tok/s  "
              f"loss {100 * (1 - half / none):5.1f}%", flush=True)
    medians = {ratio: statistics.median(values) for ratio, values in rounds.items()}
    loss = 1 - medians[0.5] / medians[0.0]
    pair_loss = statistics.median(1 - half / none for none, half in zip(rounds[0.0], rounds[0.5]))
    print(f"median: ratio 0 {medians[0.0]:,.0f}, ratio 0.5 {medians[0.5]:,.0f} output tok/s; "
          f"loss {100 * loss:.1f}% (median of the pairs' losses {100 * pair_loss:.1f}%; target: at most 10%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rounds": {str(ratio): values for ratio, values in rounds.items()},
                       "median_output_tokens_per_s": {str(ratio): value for ratio, value in medians.items()},
                       "loss_of_medians": loss, "median_pair_loss": pair_loss, "config": vars(args)}, f, indent=2)
    engine.shutdown()


if __name__ == "__main__":
    main()
