"""Probe: where does a batch-1 decode step of a quantized Llama spend its time, linear by linear?

Times each linear of Llama-3.1-8B and Llama-3.2-1B at 1 and 4 rows as the engine runs it (the
whole op: FP8's activation quantization and the sum of K's partial products included), inside
CUDA graphs (no launch overhead between the calls of one replay), each call on another copy of
the weight so that it comes from HBM and not from the 60 MB L2; against cuBLAS bfloat16, and
with a sweep of the few-row tiles; W8A16 with int8 codes (GGUF's Q8_0) and e4m3 codes (block-scaled
FP8) beside them. Prints microseconds and the weight bytes read per second.
`--old PATH` also times the kernels of another checkout's quant_linear_triton.py (before/after).

    python tools/quant_gemv_probe.py [--old ../nanovllm/ops/quant_linear_triton.py] [--json out.json]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys

import torch
import torch.nn.functional as F

from nanovllm.bench.graph_timing import graph_time_us
from nanovllm.ops import quant_linear_triton as kernels
from nanovllm.ops.quant_linear import pack_int4, quantize_fp8_per_channel

SHAPES = {"llama-3.1-8b": {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (28672, 4096),
                           "down_proj": (4096, 14336), "lm_head": (128256, 4096)},
          "llama-3.2-1b": {"qkv_proj": (3072, 2048), "o_proj": (2048, 2048), "gate_up_proj": (16384, 2048),
                           "down_proj": (2048, 8192), "lm_head": (128256, 2048)}}
L2_BYTES = 200e6          # weights cycled through copies of at least this many bytes


def sweep_splits(n: int, k: int, block_n: int, block_k: int, sms: int, unsplit_at_any_width: bool) -> list[int]:
    """The splits of K (1, 2, 4, 8) a sweep times at an [n, k] layer's [block_n, block_k] tile: no more
    than K's steps, and at most 8 programs an SM (the unsplit product at any width where
    unsplit_at_any_width, as the LM head's)."""
    programs = math.ceil(n / block_n)
    return [split_k for split_k in (1, 2, 4, 8)
            if k // block_k >= split_k and (split_k == 1 and unsplit_at_any_width or programs * split_k <= 8 * sms)]


def copy_past_l2(copies: list, nbytes: float) -> None:
    """Append clones of copies[0] (a tensor or a tuple of them, nbytes a copy) until they hold at least
    L2_BYTES: distinct copies, of which L2 holds none by the time a cycle returns to one."""
    while len(copies) < math.ceil(L2_BYTES / nbytes):
        first = copies[0]
        copies.append(first.clone() if isinstance(first, torch.Tensor) else tuple(t.clone() for t in first))


def cycled_us(make_call, bytes_per_copy: float) -> float:
    """Mean microseconds of one call, each call on its own copy of the weight (make_call(i) -> fn)."""
    copies = max(1, math.ceil(L2_BYTES / bytes_per_copy))
    calls = [make_call(i) for i in range(copies)]
    try:
        return graph_time_us(lambda: [call() for call in calls], replays=10, warmup=2) / copies
    except Exception as error:        # a tile over shared memory, a compile error
        print("  not timed:", str(error).splitlines()[0][:200], flush=True)
        return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--old", help="another quant_linear_triton.py to time beside this one")
    parser.add_argument("--json")
    parser.add_argument("--sweep", action="store_true", help="also a sweep of the one-row GEMV tiles")
    parser.add_argument("--sweep-formats", default="fp8,w4a16",
                        help="the formats --sweep covers (fp8, w4a16, w8a16)")
    parser.add_argument("--gemm", action="store_true", help="also a sweep of FP8 W8A8 tiles at 8 to 64 rows (8B)")
    parser.add_argument("--row-gemv", action="store_true",
                        help="only W4A16 at one row: the GEMV as chosen against the row GEMV's tiles")
    args = parser.parse_args()
    old = None
    if args.old:
        spec = importlib.util.spec_from_file_location("old_quant_linear_triton", args.old)
        old = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = old          # dataclasses look their module up there
        spec.loader.exec_module(old)
    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    rows = []
    if args.row_gemv:
        sweep_row_gemv(rows)
        if args.json:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, open(args.json, "w"), indent=1)
        return
    for model, shapes in SHAPES.items():
        for name, (n, k) in shapes.items():
            bf16 = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02]
            fp8 = [quantize_fp8_per_channel(bf16[0])]
            w4 = [(pack_int4(torch.randint(0, 16, (n, k), device="cuda")),
                   torch.rand(n, k // 128, device="cuda") * 0.01,
                   torch.randint(0, 16, (n, k // 128), device="cuda").to(torch.uint8))]
            # W8A16 as GGUF's Q8_0 loads (int8, a scale per 32) and as block-scaled FP8 does (e4m3, a scale per 128)
            w8 = [(torch.randint(-127, 128, (n, k), device="cuda").to(torch.int8),
                   torch.rand(n, k // 32, device="cuda") * 0.01)]
            w8_e4m3 = [(bf16[0].float().mul(100).clamp(-448, 448).to(torch.float8_e4m3fn),
                        torch.rand(n, k // 128, device="cuda") * 0.01)]
            # W4A16 as GGUF's 4-bit types load (Q4_K: a float32 scale and offset per 32)
            w4_gguf = [(w4[0][0], torch.rand(n, k // 32, device="cuda") * 0.01, torch.rand(n, k // 32, device="cuda"))]
            for copies, nbytes in ((bf16, 2), (fp8, 1), (w4, 0.5), (w8, 1), (w8_e4m3, 1), (w4_gguf, 0.75)):
                copy_past_l2(copies, n * k * nbytes)
            for m in (1, 4):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                row = {"model": model, "layer": name, "n": n, "k": k, "m": m}
                fp8_op, w4a16_op = kernels.fp8_linear_triton, kernels.w4a16_linear_triton
                row["bf16_us"] = cycled_us(lambda i: (lambda w=bf16[i % len(bf16)]: F.linear(x, w)), 2 * n * k)
                row["fp8_us"] = cycled_us(lambda i: (lambda w=fp8[i % len(fp8)]: fp8_op(x, *w)), n * k)
                row["w4a16_us"] = cycled_us(lambda i: (lambda w=w4[i % len(w4)]: w4a16_op(x, *w)), n * k / 2)
                row["w4a16_gguf_us"] = cycled_us(lambda i: (lambda w=w4_gguf[i % len(w4_gguf)]: w4a16_op(x, *w)), n * k / 2)
                w8a16_op = kernels.w8a16_linear_triton
                row["w8a16_us"] = cycled_us(lambda i: (lambda w=w8[i % len(w8)]: w8a16_op(x, *w)), n * k)
                row["w8a16_e4m3_us"] = cycled_us(lambda i: (lambda w=w8_e4m3[i % len(w8_e4m3)]: w8a16_op(x, *w)), n * k)
                if old is not None:
                    old_fp8, old_w4a16 = old.fp8_linear_triton, old.w4a16_linear_triton
                    row["old_fp8_us"] = cycled_us(lambda i: (lambda w=fp8[i % len(fp8)]: old_fp8(x, *w)), n * k)
                    row["old_w4a16_us"] = cycled_us(lambda i: (lambda w=w4[i % len(w4)]: old_w4a16(x, *w)), n * k / 2)
                    row["old_w4a16_gguf_us"] = cycled_us(
                        lambda i: (lambda w=w4_gguf[i % len(w4_gguf)]: old_w4a16(x, *w)), n * k / 2)
                    old_w8a16 = old.w8a16_linear_triton
                    row["old_w8a16_us"] = cycled_us(lambda i: (lambda w=w8[i % len(w8)]: old_w8a16(x, *w)), n * k)
                for key, nbytes in (("bf16", 2), ("fp8", 1), ("w4a16", 0.5 + 5 / 128), ("w8a16", 1 + 4 / 32),
                                    ("w8a16_e4m3", 1 + 4 / 128), ("old_fp8", 1), ("old_w4a16", 0.5 + 5 / 128),
                                    ("old_w8a16", 1 + 4 / 32), ("w4a16_gguf", 0.5 + 8 / 32),
                                    ("old_w4a16_gguf", 0.5 + 8 / 32)):
                    if f"{key}_us" in row:
                        row[f"{key}_TBps"] = round(n * k * nbytes / row[f"{key}_us"] / 1e6, 3)
                rows.append(row)
                print(" ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                               for key, value in row.items()), flush=True)
                if args.sweep and m == 1:
                    sweep(rows, model, name, n, k, m, x, fp8, w4, w8, args.sweep_formats)
            if args.gemm and model == "llama-3.1-8b" and name != "lm_head":
                sweep_fp8_gemm(rows, model, name, n, k, fp8, bf16)
    if args.json:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, open(args.json, "w"), indent=1)


def sweep(rows: list, model: str, name: str, n: int, k: int, m: int, x, fp8, w4, w8, formats: str) -> None:
    """One row: the FP8 GEMV's tiles, the W4A16 GEMV's with and without the prefetch of the next
    step's words, and the W8A16 GEMV's (int8, a scale per 32), each timed with the sum of its partials."""
    Tiles, sms, block_m = kernels.Tiles, kernels.sm_count(x.device), 1
    for block_n, block_k, warps in ((8, 512, 4), (16, 256, 4), (32, 256, 4), (16, 512, 4), (16, 512, 8),
                                    (8, 1024, 4), (8, 1024, 8), (4, 1024, 4)) if "fp8" in formats else ():
        for split_k in sweep_splits(n, k, block_n, block_k, sms, unsplit_at_any_width=True):
            tiles = Tiles(block_m, block_n, block_k, split_k, num_warps=warps, num_stages=1)
            us = cycled_us(lambda i: (lambda w=fp8[i % len(fp8)]: kernels.sum_partials(
                kernels.fp8_linear_tiles(x, *w, None, tiles), x.dtype)), n * k)
            rows.append({"model": model, "layer": name, "m": m, "fp8_tiles": str(tiles), "fp8_us": us})
            print(f"  sweep fp8 {name} m={m} {tiles}: {us:.2f} us {n * k / us / 1e6:.2f} TB/s", flush=True)
    # K steps past the group size (256, 512) hold runs of whole groups, each loading its scale and zero once
    for block_n, block_k, warps in ((32, 128, 4), (64, 128, 4), (128, 128, 4), (128, 128, 8), (256, 128, 8),
                                    (32, 256, 4), (64, 256, 4), (16, 512, 4), (32, 512, 4)) if "w4a16" in formats else ():
        for split_k in sweep_splits(n, k, block_n, block_k, sms, unsplit_at_any_width=False):
            for prefetch in (False, True) if block_k == 128 else (True,):
                tiles = Tiles(block_m, block_n, block_k, split_k, num_warps=warps, num_stages=1, prefetch=prefetch)
                us = cycled_us(lambda i: (lambda w=w4[i % len(w4)]: kernels.sum_partials(
                    kernels.w4a16_linear_tiles(x, *w, None, tiles), x.dtype)), n * k / 2)
                rows.append({"model": model, "layer": name, "m": m, "w4a16_tiles": str(tiles), "w4a16_us": us})
                print(f"  sweep w4a16 {name} m={m} {tiles}: {us:.2f} us {n * k * 0.539 / us / 1e6:.2f} TB/s",
                      flush=True)
    for block_n, block_k, warps in ((8, 512, 4), (4, 1024, 4), (16, 256, 4), (8, 1024, 4), (16, 512, 4),
                                    (32, 128, 4)) if "w8a16" in formats else ():
        for split_k in sweep_splits(n, k, block_n, block_k, sms, unsplit_at_any_width=True):
            tiles = Tiles(block_m, block_n, block_k, split_k, num_warps=warps, num_stages=1)
            us = cycled_us(lambda i: (lambda w=w8[i % len(w8)]: kernels.sum_partials(
                kernels.w8a16_linear_tiles(x, *w, None, None, tiles), x.dtype)), n * k)
            rows.append({"model": model, "layer": name, "m": m, "w8a16_tiles": str(tiles), "w8a16_us": us})
            print(f"  sweep w8a16 {name} m={m} {tiles}: {us:.2f} us {n * k * 1.125 / us / 1e6:.2f} TB/s", flush=True)


def sweep_row_gemv(rows: list) -> None:
    """One row, layer by layer, W4A16 (groups of 128, zero points) and GGUF's 4-bit layout (groups of 32,
    float32 scales and offsets): the GEMV as the engine chose it before the row GEMV (kernels.ROW_GEMV
    off), against _w4a16_row_gemv_kernel at rows a thread x warps and programs an SM (the split of K that
    follows), each with the sum of its partials."""
    row_gemv = kernels.ROW_GEMV
    for model, shapes in SHAPES.items():
        for name, (n, k) in shapes.items():
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            codes = pack_int4(torch.randint(0, 16, (n, k), device="cuda"))
            layouts = {"w4a16": ((codes, (torch.rand(n, k // 128, device="cuda") * 0.01).to(torch.bfloat16),
                                  torch.randint(0, 16, (n, k // 128), device="cuda").to(torch.uint8)), 0.5 + 3 / 128),
                       "gguf": ((codes, torch.rand(n, k // 32, device="cuda") * 0.01,
                                 torch.rand(n, k // 32, device="cuda")), 0.5 + 8 / 32)}
            for layout, (first, per_weight) in layouts.items():
                if name == "lm_head" and layout == "gguf":
                    continue                  # (GGUF's head is 6- or 8-bit)
                weights = [first]
                copy_past_l2(weights, n * k / 2)
                nbytes = n * k * per_weight
                kernels.ROW_GEMV = False
                before = cycled_us(lambda i: (lambda w=weights[i % len(weights)]: kernels.w4a16_linear_triton(x, *w)),
                                   n * k / 2)
                print(f"row-gemv {model} {name} {layout} [{n}, {k}] before: {before:.2f} us "
                      f"{nbytes / before / 1e6:.2f} TB/s", flush=True)
                rows.append({"model": model, "layer": name, "layout": layout, "n": n, "k": k, "before_us": before})
                for per_thread, warps, per_sm, block_k in ((4, 1, 32, 128), (8, 1, 16, 256), (8, 1, 16, 512),
                                                           (4, 1, 32, 512), (4, 2, 16, 512), (8, 2, 8, 512)):
                    tiles = kernels.choose_w4a16_row_tiles(n, k // block_k, x.device, per_thread, warps, per_sm,
                                                           block_k)
                    us = cycled_us(lambda i: (lambda w=weights[i % len(weights)]: kernels.sum_partials(
                        kernels.w4a16_linear_tiles(x, *w, None, tiles), x.dtype)), n * k / 2)
                    rows.append({"model": model, "layer": name, "layout": layout, "row_tiles": str(tiles),
                                 "rows_a_thread": per_thread, "programs_per_sm": per_sm, "row_us": us})
                    print(f"  row-gemv {name} {layout} k{block_k} {per_thread} rows x {warps} warps, {per_sm}/SM, split "
                          f"{tiles.split_k}: {us:.2f} us {nbytes / us / 1e6:.2f} TB/s ({before / us:.2f}x)", flush=True)
    kernels.ROW_GEMV = row_gemv


def sweep_fp8_gemm(rows: list, model: str, name: str, n: int, k: int, fp8, bf16) -> None:
    """FP8 W8A8 at a decode batch's rows (8 to 64): the tiles and splits of K, against cuBLAS bfloat16
    and the tiles choose_tiles picks (the activation quantization and the partials' sum included)."""
    Tiles, sms = kernels.Tiles, kernels.sm_count(torch.device("cuda"))
    for m in (8, 16, 32, 64):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        bf16_us = cycled_us(lambda i: (lambda w=bf16[i % len(bf16)]: F.linear(x, w)), 2 * n * k)
        chosen_us = cycled_us(lambda i: (lambda w=fp8[i % len(fp8)]: kernels.fp8_linear_triton(x, *w)), n * k)
        print(f"  gemm fp8 {model} {name} m={m}: bf16 {bf16_us:.2f} us, chosen tiles {chosen_us:.2f} us", flush=True)
        rows.append({"model": model, "layer": name, "m": m, "bf16_us": bf16_us, "fp8_chosen_us": chosen_us})
        for block_m, block_n, warps, stages in ((16, 32, 4, 4), (16, 64, 4, 4), (32, 64, 4, 4), (64, 64, 4, 4),
                                                (64, 128, 4, 3), (32, 128, 4, 3)):
            if not max(16, m // 2) <= block_m <= max(16, m):
                continue
            for split_k in (1, 2, 4, 8):
                if split_k > 1 and math.ceil(m / block_m) * math.ceil(n / block_n) * split_k > 8 * sms:
                    continue
                tiles = Tiles(block_m, block_n, 128, split_k, num_warps=warps, num_stages=stages)
                us = cycled_us(lambda i: (lambda w=fp8[i % len(fp8)]: kernels.sum_partials(
                    kernels.fp8_linear_tiles(x, *w, None, tiles), x.dtype)), n * k)
                rows.append({"model": model, "layer": name, "m": m, "fp8_gemm_tiles": str(tiles), "fp8_us": us})
                print(f"  gemm fp8 {name} m={m} {tiles}: {us:.2f} us {n * k / us / 1e6:.2f} TB/s", flush=True)


if __name__ == "__main__":
    main()
