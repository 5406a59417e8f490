"""Probe: what a step costs when a new prompt joins running decodes (the steady state of a server).

At a steady request rate most steps are decodes from CUDA graphs, but each arrival brings one step
that also prefills its prompt, in eager mode. This runs `--batch` decoding sequences, then adds one
prompt of each length in `--prompts` at a time and times that step and the decode steps around it
(wall time, the device synchronized), then profiles one such step: the host's functions (cProfile,
by own time) and the device's kernels (torch.profiler).

    python tools/mixed_step_probe.py [--dummy llama-3.2-1b] [--batch 40] [--prompts 128,560,1024]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

import torch

from nanovllm.bench.harness import make_engine
from nanovllm.config import EngineConfig
from nanovllm.sampling_params import SamplingParams


def timed_step(engine) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    engine.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dummy", default="llama-3.2-1b")
    parser.add_argument("--batch", type=int, default=40)
    parser.add_argument("--prompts", default="128,560,1024")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    engine = make_engine(EngineConfig(model=args.dummy, load_format="dummy", device="cuda", max_num_seqs=256,
                                      num_kv_blocks=8192, async_scheduling=args.async_scheduling))
    params = SamplingParams(temperature=0.6, max_tokens=100_000, ignore_eos=True)
    engine.add_requests([(f"run-{i}", [(7 * i + j) % 1000 for j in range(300)], params)
                         for i in range(args.batch)], stream=False)
    for _ in range(30):
        engine.step()
    decode = [timed_step(engine) for _ in range(30)]
    print(f"card: {torch.cuda.get_device_name()}, model: {args.dummy}, {args.batch} decoding, "
          f"async scheduling {args.async_scheduling}")
    print(f"decode step: median {statistics.median(decode):.2f} ms, max {max(decode):.2f} ms")
    arrivals = 0
    for length in [int(p) for p in args.prompts.split(",")]:
        times = []
        for repeat in range(6):
            arrivals += 1
            engine.add_requests([(f"new-{arrivals}", [(11 * arrivals + j) % 1000 for j in range(length)],
                                  SamplingParams(max_tokens=4, ignore_eos=True))], stream=False)
            times.append([timed_step(engine) for _ in range(4)])
        first = [t[0] for t in times[1:]]
        second = [t[1] for t in times[1:]]
        print(f"prompt {length:5d}: the step it joins {statistics.median(first):7.2f} ms, the next "
              f"{statistics.median(second):6.2f} ms (median of 5; first arrival {times[0][0]:.2f} ms)")

    length = int(args.prompts.split(",")[1 if "," in args.prompts else 0])
    engine.add_requests([("profiled", [(5 * j) % 1000 for j in range(length)],
                          SamplingParams(max_tokens=4, ignore_eos=True))], stream=False)
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    engine.step()
    engine.step()
    torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    print("\nhost functions of the two steps after an arrival (own time):")
    print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[:6000])

    engine.add_requests([("traced", [(3 * j) % 1000 for j in range(length)],
                          SamplingParams(max_tokens=4, ignore_eos=True))], stream=False)
    from torch.profiler import ProfilerActivity
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.step()
        engine.step()
        torch.cuda.synchronize()
    print("\nthe same, torch.profiler, by device time:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    print("by host time:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
