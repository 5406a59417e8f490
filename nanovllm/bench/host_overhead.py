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
    tables = None
    if profile:   # where the host's time goes (Python ops, CUDA runtime calls), and the GPU's (kernels)
        from torch.profiler import ProfilerActivity
        with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                engine.step()
            torch.cuda.synchronize()
        averages = prof.key_averages()
        tables = [averages.table(sort_by=key, row_limit=15, max_name_column_width=40)
                  for key in ("self_cpu_time_total", "self_cuda_time_total")]
    for rid in ids:
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()
    return {"batch": batch_size, "step_ms": step_ms, "graph_forward_ms": forward_ms,
            "host_ms": step_ms - forward_ms, "host_share": (step_ms - forward_ms) / step_ms, "profile": tables}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dummy", default="llama-3.2-1b")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--profile", action="store_true",
                        help="also profile 20 steps per batch size: the host's busiest calls (CUDA runtime included)")
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
        r = measure(engine, batch_size, profile=args.profile)
        print(f"| {mode} | {r['batch']} | {r['step_ms']:.3f} | {r['graph_forward_ms']:.3f} "
              f"| {r['host_ms']:.3f} | {r['host_share']:.0%} |")
        for table in r["profile"] or []:
            print(table)
    engine.shutdown()


if __name__ == "__main__":
    main()
