"""Probe: one decode step's GPU timeline (batch 1 by default: the `latency` workload's shape), gaps included.

`host_overhead` gives the step's wall time and the graph's replay alone; the difference is the
LM head, sampling and copies outside the graph, plus any time the GPU waits. This traces a few
greedy steps of one sequence (prompt 128, as `latency`; --batch N: N sequences at temperature 0.6,
as `throughput`), lists every GPU event of one step in
order with the idle time before it, and sums busy and idle time per step, so that the GPU's
waiting is seen where it happens rather than inferred.

    python tools/step_timeline_probe.py [--dummy llama-3.2-1b] [--steps 6] [--batch 1] [--quantization fp8]
        [--kv-cache-dtype fp8] [--set MODULE.NAME=VALUE ...]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile

import torch
from bench_with import apply         # tools/, beside this file

from nanovllm.bench.harness import make_engine
from nanovllm.config import EngineConfig
from nanovllm.sampling_params import SamplingParams

GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}


def gpu_events(trace_path: str) -> list[tuple[float, float, str, float]]:
    """(start us, duration us, name, host lead us) of every kernel, copy and memset, in time order.
    The host lead is how long before the event started the host's call that queued it returned:
    near 0 (or negative), the GPU was waiting for the host."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    launched = {e["args"]["correlation"]: float(e["ts"]) + float(e.get("dur", 0.0)) for e in events
                if e.get("ph") == "X" and e.get("cat") in ("cuda_runtime", "cuda_driver")
                and "correlation" in e.get("args", {})}
    out = []
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES:
            start = float(e["ts"])
            returned = launched.get(e.get("args", {}).get("correlation"))
            out.append((start, float(e.get("dur", 0.0)), e["name"],
                        float("nan") if returned is None else start - returned))
    return sorted(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dummy", default="llama-3.2-1b")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128, help="tokens in each prompt")
    parser.add_argument("--quantization", default=None, help="fp8, w4a16, ...: quantize the dummy weights as they load")
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto (the model's dtype) or fp8")
    parser.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=VALUE",
                        help="a module setting for the run, as tools/bench_with.py takes (repeatable)")
    args = parser.parse_args()
    for setting in args.set:
        apply(setting)
    engine = make_engine(EngineConfig(model=args.dummy, load_format="dummy", device="cuda",
                                      max_num_seqs=max(8, args.batch),
                                      num_kv_blocks=max(2048, (args.prompt_len // 16 + 40) * args.batch),
                                      quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype))
    params = SamplingParams(temperature=0.0 if args.batch == 1 else 0.6, max_tokens=10_000, ignore_eos=True)
    ids = [f"timeline-{i}" for i in range(args.batch)]
    engine.add_requests([(rid, [(7 * i + j) % 1000 for j in range(args.prompt_len)], params)
                         for i, rid in enumerate(ids)], stream=False)
    for _ in range(40):   # prefill, then decode until every kernel has run (and compiled) once
        engine.step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity
    with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    for rid in ids:
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()
    engine.shutdown()

    events = gpu_events(path)
    # A step starts with the copy of its inputs to the device (the first host-to-device copy after a
    # device-to-host one): cut there.
    steps, previous = [], ""
    for event in events:
        if ("HtoD" in event[2] and "DtoH" in previous) or not steps:
            steps.append([])
        steps[-1].append(event)
        previous = event[2]
    full = steps[1:-1]   # the first and last may be cut by the profiler's window
    print(f"card: {torch.cuda.get_device_name()}, model: {args.dummy} ({args.quantization or 'bf16'}, KV {args.kv_cache_dtype}), batch {args.batch}, "
          f"temperature {params.temperature}, {len(full)} whole steps traced")
    for i, step in enumerate(full):
        busy = sum(event[1] for event in step)
        span = step[-1][0] + step[-1][1] - step[0][0]
        nxt = full[i + 1][0][0] if i + 1 < len(full) else None
        to_next = (nxt - (step[-1][0] + step[-1][1])) if nxt is not None else float("nan")
        print(f"step {i}: span {span:.1f} us, busy {busy:.1f} us, idle inside {span - busy:.1f} us, "
              f"idle before the next step {to_next:.1f} us, {len(step)} events")
    step = full[len(full) // 2]
    print("\none step, in order (gap = idle time before the event; kernels of a layer folded):")
    print(f"{'gap us':>8} {'dur us':>8} {'lead us':>8}  name   (lead: host call returned this long before)")
    folded: collections.OrderedDict[str, list[float]] = collections.OrderedDict()
    end = step[0][0]
    rows = []
    for ts, dur, name, lead in step:
        rows.append((ts - end, dur, name, lead))
        end = max(end, ts + dur)
    # print everything that is not a repeated per-layer kernel; sum the repeated ones
    counts = collections.Counter(row[2] for row in rows)
    for gap, dur, name, lead in rows:
        if counts[name] >= 8:
            entry = folded.setdefault(name, [0.0, 0.0, 0])
            entry[0] += gap
            entry[1] += dur
            entry[2] += 1
            continue
        print(f"{gap:8.2f} {dur:8.2f} {lead:8.1f}  {name[:90]}")
    print("\nrepeated kernels (the layers), summed over the step:")
    print(f"{'gaps us':>8} {'time us':>8} {'count':>5}  name")
    for name, (gap, dur, n) in folded.items():
        print(f"{gap:8.2f} {dur:8.2f} {n:5d}  {name[:90]}")


if __name__ == "__main__":
    main()
