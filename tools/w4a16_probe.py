"""Probe: the W4A16 decode product on the FMA units (`_w4a16_gemv_kernel`, 1 to 4 rows; `tl.dot`'s
`_w4a16_gemm_kernel` above) against the tensor-core GEMV (`_w4a16_dot_gemv_kernel`, up to 16 rows).

First checks the tensor-core GEMV against the torch reference (given float32 x) on the GPU at
Llama's shapes, its output poisoned with NaN first; then times each decode linear of
Llama-3.1-8B and Llama-3.2-1B at 1, 2, 4 and 16 rows as tools/quant_gemv_probe.py does (CUDA
graphs, each call on its own copy of the weight, so that it comes from HBM), the sum of K's
partial products included: cuBLAS bfloat16, the FMA GEMV (or GEMM) with the tiles it had, and the
tensor-core GEMV at a sweep of tiles and splits. Prints microseconds and weights a second.

    python tools/w4a16_probe.py [--json out.json] [--rows 1,2,4,16]
"""
from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F

from nanovllm.ops import quant_linear_triton as kernels
from nanovllm.ops.quant_linear import pack_int4, w4a16_linear_torch
from quant_gemv_probe import copy_past_l2, cycled_us

SHAPES = {"llama-3.1-8b": {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (28672, 4096),
                           "down_proj": (4096, 14336)},
          "llama-3.2-1b": {"qkv_proj": (3072, 2048), "o_proj": (2048, 2048), "gate_up_proj": (16384, 2048),
                           "down_proj": (2048, 8192)}}
DOT_TILES = ((128, 4, 3), (64, 4, 3), (128, 4, 2), (64, 4, 2), (64, 2, 3), (32, 1, 3), (128, 4, 4), (128, 8, 3),
             (256, 8, 3))    # (BLOCK_N, warps, stages); at more than one row the first two


def four_bit(n: int, k: int, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (pack_int4(torch.randint(0, 16, (n, k), device="cuda")),
            torch.rand(n, k // group_size, device="cuda") * 0.01,
            torch.randint(0, 16, (n, k // group_size), device="cuda").to(torch.uint8))


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def check(shapes: dict) -> None:
    """The tensor-core GEMV against w4a16_linear_torch given float32 x: bfloat16 and float16 x, 1 to 16
    rows, split and unsplit, groups of 128 and whole rows; the outputs start as NaN."""
    make = kernels._output
    kernels._output = lambda *args: make(*args).fill_(float("nan"))
    worst = 0.0
    try:
        for name, (n, k) in shapes.items():
            for group_size in (128, k):
                weight = four_bit(n, k, group_size)
                for dtype in (torch.bfloat16, torch.float16):
                    for m in (1, 3, 16):
                        x = torch.randn(m, k, device="cuda", dtype=dtype)
                        ref = w4a16_linear_torch(x.float(), *weight)
                        for split_k in (2, 4):      # float32 partials
                            tiles = kernels.Tiles(16, 128, 128, split_k, num_warps=4, num_stages=3, planes=True)
                            out = kernels.w4a16_linear_tiles(x, *weight, None, tiles).sum(0)
                            error = relative_error(out, ref)
                            worst = max(worst, error)
                            assert not out.isnan().any() and error < 1e-5, (name, group_size, dtype, m, split_k, error)
                        engine = kernels.w4a16_linear_triton(x, *weight)     # the engine's path, in x's dtype
                        assert relative_error(engine, ref) < 1e-2
    finally:
        kernels._output = make
    print(f"tensor-core GEMV matches the reference: worst relative error {worst:.2e} (float32 outputs)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--rows", default="1,2,4,16")
    args = parser.parse_args()
    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    check(SHAPES["llama-3.2-1b"])
    sms = kernels.sm_count(torch.device("cuda"))
    rows = []
    for model, shapes in SHAPES.items():
        for name, (n, k) in shapes.items():
            bf16 = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02]
            w4 = [four_bit(n, k)]
            for copies, nbytes in ((bf16, 2), (w4, 0.5)):
                copy_past_l2(copies, n * k * nbytes)
            for m in map(int, args.rows.split(",")):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                row = {"model": model, "layer": name, "n": n, "k": k, "m": m}
                row["bf16_us"] = cycled_us(lambda i: (lambda w=bf16[i % len(bf16)]: F.linear(x, w)), 2 * n * k)
                fma = kernels.choose_w4a16_tiles(m, n, k // 128, 128, x.device)      # the tiles before
                row["before_tiles"] = str(fma)
                row["before_us"] = cycled_us(lambda i: (lambda w=w4[i % len(w4)]: kernels.sum_partials(
                    kernels.w4a16_linear_tiles(x, *w, None, fma), x.dtype)), n * k / 2)
                row["engine_us"] = cycled_us(lambda i: (lambda w=w4[i % len(w4)]: kernels.w4a16_linear_triton(x, *w)),
                                             n * k / 2)
                best = (math.inf, None)
                for block_n, warps, stages in DOT_TILES if m == 1 else DOT_TILES[:2]:
                    for split_k in (1, 2, 4, 8):
                        if k // 128 < split_k or math.ceil(n / block_n) * split_k > 12 * sms:
                            continue
                        tiles = kernels.Tiles(16, block_n, 128, split_k, num_warps=warps, num_stages=stages,
                                              planes=True)
                        us = cycled_us(lambda i: (lambda w=w4[i % len(w4)]: kernels.sum_partials(
                            kernels.w4a16_linear_tiles(x, *w, None, tiles), x.dtype)), n * k / 2)
                        rows.append({"model": model, "layer": name, "m": m, "dot_tiles": str(tiles), "dot_us": us})
                        print(f"  dot {model} {name} m={m} BN={block_n} warps={warps} stages={stages} split={split_k}: "
                              f"{us:.2f} us {n * k / us / 1e6:.2f}e12 weights/s", flush=True)
                        if us < best[0]:
                            best = (us, tiles)
                row["best_dot_us"], row["best_dot_tiles"] = best[0], str(best[1])
                rows.append(row)
                print(f"{model} {name} m={m}: engine's tiles {kernels.choose_w4a16_dot_tiles(m, n, k // 128, x.device)}, bf16 {row['bf16_us']:.2f} us, before {row['before_us']:.2f} us "
                      f"({n * k / row['before_us'] / 1e6:.2f}e12 w/s), engine now {row['engine_us']:.2f} us, "
                      f"best dot {best[0]:.2f} us ({n * k / best[0] / 1e6:.2f}e12 w/s) {best[1]}", flush=True)
    print("\n| model | layer | rows | bf16 | before | engine now | best tensor-core tile |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if "bf16_us" in row:
            tiles = row["best_dot_tiles"]
            tiles = tiles[tiles.index("block_n"):tiles.index(", prefetch")] if tiles != "None" else ""
            print(f"| {row['model']} | {row['layer']} | {row['m']} | {row['bf16_us']:.1f} | {row['before_us']:.1f} | "
                  f"{row['engine_us']:.1f} | {row['best_dot_us']:.1f} ({tiles}) |")
    if args.json:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
