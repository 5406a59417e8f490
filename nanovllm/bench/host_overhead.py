"""How much of a decode step is the host's, on a GPU.

    python -m nanovllm.bench.host_overhead --dummy llama-3.2-1b --batch-sizes 1 64 256

For each batch size it fills the engine with that many sequences (prompt 128),
lets them reach the decode phase, then times whole `engine.step()` calls, and
separately replays the step's CUDA graph alone (the forward pass with nothing
around it). The difference is what the host adds per step: scheduling, input
preparation, the LM head and sampling, postprocessing, outputs. With async
scheduling off the host's work adds to the GPU's; on (the engine's default on
one GPU), it hides behind it, and what remains is the LM head, sampling and any
host excess.
"""
from __future__ import annotations

import argparse
import time

import torch

from nanovllm.bench.harness import make_engine
from nanovllm.config import EngineConfig
from nanovllm.sampling_params import SamplingParams


def measure(engine, batch_size: int, steps: int = 50, profile: bool = False, trace: str | None = None) -> dict:
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
    forward_ms = float("nan")
    if engine.runner.workers is None:   # with tensor parallelism one rank cannot replay its graph alone
        graphs = engine.runner.decode_graphs
        size = next(s for s in graphs.sizes if s >= batch_size)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            graphs.graphs[size].replay()
        torch.cuda.synchronize()
        forward_ms = (time.perf_counter() - start) / steps * 1e3
    parts = host_breakdown(engine, steps)
    tables = None
    if profile:   # where the host's time goes (Python ops, CUDA runtime calls), and the GPU's (kernels)
        from torch.profiler import ProfilerActivity
        with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                engine.step()
            torch.cuda.synchronize()
        averages = prof.key_averages()
        tables = [averages.table(sort_by=key, row_limit=rows, max_name_column_width=48)
                  for key, rows in (("self_cpu_time_total", 15), ("self_cuda_time_total", 40))]
        # Kernel time per step against the step's wall time: the rest is the GPU waiting (launch gaps, host).
        kernel_us = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0))
                        for e in averages if e.device_type == torch.autograd.DeviceType.CUDA) / 20
        tables.append(f"GPU busy per step (sum of its kernels and copies): {kernel_us / 1e3:.3f} ms")
    if trace:   # a timeline of a few steps (chrome://tracing or ui.perfetto.dev): where the GPU waits
        from torch.profiler import ProfilerActivity
        with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
            for _ in range(4):
                engine.step()
            torch.cuda.synchronize()
        prof.export_chrome_trace(trace.replace("{batch}", str(batch_size)))
    for rid in ids:
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()
    return {"batch": batch_size, "step_ms": step_ms, "graph_forward_ms": forward_ms, "host_parts_ms": parts,
            "host_ms": step_ms - forward_ms, "host_share": (step_ms - forward_ms) / step_ms, "profile": tables}


def host_breakdown(engine, steps: int) -> dict[str, float]:
    """Mean host milliseconds per step in each part of `engine.step()`: scheduling, launching (input
    preparation, the graph launch, the LM head and sampling queued), waiting for the samples, and
    completing (the scheduler's bookkeeping and the outputs). With async scheduling the GPU is busy
    while the host does the other parts, so `wait` is the host's slack: near 0, the host is the limit."""
    totals = {"schedule": 0.0, "launch": 0.0, "wait": 0.0, "complete": 0.0}
    inside = {"launch": False, "wait_in_launch": 0.0}   # a wait inside launch counts as a wait only
    restore = []

    def timed(owner, name: str, part: str) -> None:
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            inside["launch"] = part == "launch"
            try:
                return original(*args, **kwargs)
            finally:
                inside["launch"] = False
                totals[part] += time.perf_counter() - start
        setattr(owner, name, wrapper)
        restore.append((owner, name, original))

    timed(engine.scheduler, "schedule", "schedule")
    timed(engine.runner, "launch", "launch")
    timed(engine.scheduler, "complete", "complete")
    event_sync = torch.cuda.Event.synchronize

    def waiting(event):
        start = time.perf_counter()
        event_sync(event)
        seconds = time.perf_counter() - start
        totals["wait"] += seconds
        if inside["launch"]:
            inside["wait_in_launch"] += seconds
    torch.cuda.Event.synchronize = waiting
    try:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    finally:
        torch.cuda.Event.synchronize = event_sync
        for owner, name, _ in restore:
            delattr(owner, name)   # the wrappers were instance attributes over the class's methods
    totals["launch"] -= inside["wait_in_launch"]
    parts = {name: seconds / steps * 1e3 for name, seconds in totals.items()}
    parts["rest"] = wall / steps * 1e3 - sum(parts.values())
    return parts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dummy", default="llama-3.2-1b")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--profile", action="store_true",
                        help="also profile 20 steps per batch size: the host's busiest calls (CUDA runtime included)")
    parser.add_argument("--trace", metavar="FILE",
                        help="also write a timeline of 4 steps per batch size ({batch} in FILE: the batch size)")
    parser.add_argument("--async-scheduling", choices=("on", "off"), default=None,
                        help="measure with async scheduling on or off (default: the engine's choice, on with one "
                             "GPU); one engine per process")
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="ranks over this machine's GPUs; the forward alone is then not timed (n/a)")
    args = parser.parse_args(argv)
    async_scheduling = None if args.async_scheduling is None else args.async_scheduling == "on"
    engine = make_engine(EngineConfig(model=args.dummy, load_format="dummy", device="cuda",
                                      max_num_seqs=max(args.batch_sizes), num_kv_blocks=8192,
                                      async_scheduling=async_scheduling,
                                      tensor_parallel_size=args.tensor_parallel_size))
    print(f"card: {args.tensor_parallel_size} x {torch.cuda.get_device_name()}, model: {args.dummy} "
          f"(dummy weights, bf16, tensor parallel {args.tensor_parallel_size})")
    print("| async scheduling | batch | engine step ms | graph forward ms | step - forward ms | share |")
    print("|------------------|------:|---------------:|-----------------:|------------------:|------:|")
    mode = "on" if engine.config.async_scheduling else "off"
    for batch_size in args.batch_sizes:
        r = measure(engine, batch_size, profile=args.profile, trace=args.trace)
        print(f"| {mode} | {r['batch']} | {r['step_ms']:.3f} | {r['graph_forward_ms']:.3f} "
              f"| {r['host_ms']:.3f} | {r['host_share']:.0%} |")
        print("  host ms per step: " + ", ".join(f"{name} {ms:.3f}" for name, ms in r["host_parts_ms"].items()))
        for table in r["profile"] or []:
            print(table)
    engine.shutdown()


if __name__ == "__main__":
    main()
