"""A/B of the fused CPU LM head (model/llama_numba.py): decode steps of the embedded model with the
head's compiled call and with RefinedLMHead's torch forward, alternated in one process so that both
see the same machine.

    python tools/cpu_head_pairs.py [--rounds 3] [--batch 1,16] [--threads 2]

Prints, per batch size and round, the mean step time and the part outside the compiled calls
(bench/step_overhead.py), then the median of each side and the load average.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from nanovllm.bench.step_overhead import load_average_text, measure_step_overhead
from nanovllm.config import EngineConfig
from nanovllm.engine.engine import LLMEngine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", default="1,16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = LLMEngine(EngineConfig(dtype="int4", device="cpu", max_model_len=512))
    measure_step_overhead(engine, 1, steps=4)                       # compiles, and makes the fused decoder
    fused = engine.runner.model._fused
    if not fused or fused.head is None:
        raise SystemExit("the fused CPU LM head does not apply here (numba, AVX-512 VNNI, the int4 embedded model)")
    head = fused.head
    for batch in (int(b) for b in args.batch.split(",")):
        times: dict[str, list[float]] = {"fused head": [], "torch head": []}
        for round_ in range(args.rounds):
            for side in times:
                fused.head = head if side == "fused head" else None
                result = measure_step_overhead(engine, batch, steps=args.steps)
                times[side].append(result.step_ms)
                print(f"batch {batch:2d} round {round_} {side}: step {result.step_ms:6.2f} ms, outside the compiled "
                      f"calls {result.outside_compiled_ms:5.2f} ms")
        medians = {side: statistics.median(values) for side, values in times.items()}
        print(f"batch {batch:2d} median: " + ", ".join(f"{side} {ms:.2f} ms" for side, ms in medians.items())
              + f"; {load_average_text()}")
    fused.head = head


if __name__ == "__main__":
    main()
