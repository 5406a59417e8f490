"""How much of a decode step is the host's, on a GPU.

    python -m nanovllm.bench.host_overhead --dummy llama-3.2-1b --batch-sizes 1 64 256

For each batch size it fills the engine with that many sequences (prompt 128),
lets them reach the decode phase, then times whole `engine.step()` calls, and
separately replays the step's CUDA graph alone (the forward pass with nothing
around it). The difference is what the host adds per step: scheduling, input
preparation, the LM head and sampling, postprocessing, outputs. With async
scheduling off (the default) the host's work adds to the GPU's; on, it hides
behind it, and what remains is the LM head, sampling and any host excess.
"""
from __future__ import annotations

import argparse
import time

import torch

from nanovllm.bench.harness import make_engine
from nanovllm.config import EngineConfig
from nanovllm.sampling_params import SamplingParams


def measure(engine, batch_size: int, steps: int = 50, profile: bool = False) -> dict:
    params = SamplingParams(temperature=0.6, max_tokens=10_000, ignore_eos=True)
    ids = [f"overhead-{batch_size}-{i}" for i in range(batch_size)]
    engine.add_requests([(rid, [(7 * i + j) % 1000 for j in range(128)], params) for i, rid in enumerate(ids)],
                        stream=False)
    while engine.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens
                                          for s in engine.scheduler.running):
        engine.step()
    for _ in range(3):
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - start) / steps * 1e3
    graphs = engine.runner.decode_graphs
    size = next(s for s in graphs.sizes if s >= batch_size)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        graphs.graphs[size].replay()
    torch.cuda.synchronize()
    forward_ms = (time.perf_counter() - start) / steps * 1e3
    table = None
    if profile:   # where the host's time goes: Python ops and CUDA runtime calls (syncs, launches, allocations)
        from torch.profiler import ProfilerActivity
        with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(20):
                engine.step()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40)
    for rid in ids:
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()
    return {"batch": batch_size, "step_ms": step_ms, "graph_forward_ms": forward_ms,
            "host_ms": step_ms - forward_ms, "host_share": (step_ms - forward_ms) / step_ms, "profile": table}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dummy", default="llama-3.2-1b")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--profile", action="store_true",
                        help="also profile 20 steps per batch size: the host's busiest calls (CUDA runtime included)")
    parser.add_argument("--async-scheduling", choices=("on", "off"), default="off",
                        help="measure with async scheduling on or off (the engine's default); one engine per process")
    args = parser.parse_args(argv)
    async_scheduling = args.async_scheduling == "on"
    engine = make_engine(EngineConfig(model=args.dummy, load_format="dummy", device="cuda",
                                      max_num_seqs=max(args.batch_sizes), num_kv_blocks=8192,
                                      async_scheduling=async_scheduling))
    print(f"card: {torch.cuda.get_device_name()}, model: {args.dummy} (dummy weights, bf16)")
    print("| async scheduling | batch | engine step ms | graph forward ms | step - forward ms | share |")
    print("|------------------|------:|---------------:|-----------------:|------------------:|------:|")
    for batch_size in args.batch_sizes:
        r = measure(engine, batch_size, profile=args.profile)
        print(f"| {args.async_scheduling} | {r['batch']} | {r['step_ms']:.3f} | {r['graph_forward_ms']:.3f} "
              f"| {r['host_ms']:.3f} | {r['host_share']:.0%} |")
        if args.profile:
            print(r["profile"])


if __name__ == "__main__":
    main()
