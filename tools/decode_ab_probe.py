"""Probe: a batch-1 decode step's GPU time under several sets of module settings, from one model load.

Builds the engine (dummy weights, --quantization), prefills a prompt of 128 tokens and decodes a few
steps, then for each set applies its settings (MODULE.NAME=VALUE, as tools/bench_with.py; the names
any set touches go back to their defaults first), captures the one-row decode graph again and times
its replays with CUDA events: the whole step on the GPU (forward, LM head, sampling). Rounds alternate
the sets, so that drift meets them all; the median of the rounds is printed, with what it would be in
tokens a second.

    python tools/decode_ab_probe.py --dummy llama-3.2-1b --quantization fp8 --set as-is \\
        --set split-32=nanovllm.ops.quant_linear_triton.ROW_GEMV_PROGRAMS_PER_SM=32 [--json out.json]

A set is NAME, or NAME=SETTING[,SETTING...]; a setting's value may be a set, as PDL_BETWEEN's is.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from bench_with import parse_setting        # tools/, beside this file
from nanovllm.bench.harness import make_engine
from nanovllm.config import EngineConfig
from nanovllm.sampling_params import SamplingParams


def split_settings(text: str) -> list[str]:
    """'MODULE.X=1,MODULE.Y={"a", "b"}' -> ['MODULE.X=1', 'MODULE.Y={"a", "b"}']: the commas outside
    brackets and quotes."""
    parts, depth, quote, start = [], 0, None, 0
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [part for part in parts if part]


def parse_set(text: str) -> tuple[str, list[tuple[object, str, object]]]:
    """'NAME=MODULE.X=1,MODULE.Y=2' -> (NAME, [(module, X, 1), (module, Y, 2)]); a value may be a set
    or a tuple ('NAME=nanovllm.ops.PDL_BETWEEN={"norm", "partials"}')."""
    name, _, rest = text.partition("=")
    return name, [parse_setting(setting) for setting in split_settings(rest)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dummy", default="llama-3.2-1b")
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--set", action="append", required=True, dest="sets")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--replays", type=int, default=100)
    parser.add_argument("--json")
    args = parser.parse_args()
    sets = [parse_set(text) for text in args.sets]
    defaults = {(module, attribute): getattr(module, attribute) for _, settings in sets for module, attribute, _ in settings}
    engine = make_engine(EngineConfig(model=args.dummy, load_format="dummy", device="cuda", max_num_seqs=1,
                                      num_kv_blocks=64, quantization=args.quantization))
    params = SamplingParams(temperature=0.0, max_tokens=512, ignore_eos=True)
    engine.add_requests([("ab", [(7 * j) % 1000 for j in range(128)], params)], stream=False)
    for _ in range(20):
        engine.step()
    torch.cuda.synchronize()
    graphs = engine.runner.decode_graphs
    times: dict[str, list[float]] = {name: [] for name, _ in sets}
    for _ in range(args.rounds):
        for name, settings in sets:
            for (module, attribute), value in defaults.items():
                setattr(module, attribute, value)
            for module, attribute, value in settings:
                setattr(module, attribute, value)
            graphs.release()
            graphs._capture()
            graph = graphs.graphs[1]
            for _ in range(10):
                graph.replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.replays):
                graph.replay()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) * 1000 / args.replays)
    print(f"card: {torch.cuda.get_device_name()}, {args.dummy} ({args.quantization or 'bf16'}), batch 1, "
          f"context about 150, {args.rounds} rounds of {args.replays} replays")
    first = statistics.median(times[sets[0][0]])
    result = []
    for name, settings in sets:
        us = statistics.median(times[name])
        print(f"  {name:28} {us:8.1f} us a step ({1e6 / us:7.1f} tok/s) {first / us:5.3f}x the first  "
              f"rounds: {' '.join(f'{t:.1f}' for t in times[name])}", flush=True)
        result.append({"set": name, "settings": {f"{m.__name__}.{a}": v for m, a, v in settings}, "us": us,
                       "rounds_us": times[name]})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "model": args.dummy,
                       "quantization": args.quantization, "sets": result}, f, indent=1,
                      default=lambda value: sorted(value) if isinstance(value, (set, frozenset)) else str(value))
    graphs.max_batch = graphs.sizes[-1]         # (release() set it to 0)
    engine.abort_request("ab")
    while engine.has_unfinished_requests():
        engine.step()
    engine.shutdown()


if __name__ == "__main__":
    main()
