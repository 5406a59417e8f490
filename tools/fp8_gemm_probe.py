"""Probe: the FP8 W8A8 GEMM's tiles at a decode batch's rows, Llama-3.1-8B's layers.

Times `fp8_linear_tiles` on rows already quantized (Fp8Rows, as the norms and SiLU-and-mul hand
them over), the sum of K's partial products included, against the tiles `choose_fp8_gemm_tiles`
picks with the transposed kernel off and on (FP8_SWAP_GEMM), cuBLAS bfloat16 and torch._scaled_mm
(row-wise scales, the FP8 baseline to beat); then a sweep of
the pointer kernel's tiles (--pointer) or of the transposed kernel's (--swap) over widths, K steps,
stages, warps and splits of K; each call on another copy of the weight, so that it comes from HBM
and not from the 60 MB L2. Prints microseconds and weight bytes read per second; `--json PATH`
writes every timing and the fastest tiles of each layer and row count.

    python tools/fp8_gemm_probe.py [--rows 16,32,64] [--swap] [--pointer] [--block-m 128,256] [--json out.json]

--block-m sweeps the transposed kernel's row tile too (the engine's alone by default).
"""
from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F
from quant_gemv_probe import L2_BYTES, cycled_us      # tools/, beside this file

from nanovllm.ops import quant_linear_triton as kernels
from nanovllm.ops.quant_linear import quantize_fp8_per_channel, quantize_fp8_rows_torch

LAYERS = {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (28672, 4096),
          "down_proj": (4096, 14336), "lm_head": (128256, 4096)}
POINTER_TILES = ((64, 128, 4, 4), (64, 128, 4, 5), (64, 128, 4, 6), (64, 256, 4, 3), (64, 256, 4, 4),
                 (128, 128, 4, 3), (128, 128, 4, 4), (128, 128, 8, 4), (128, 256, 8, 3), (256, 128, 8, 3),
                 (256, 128, 8, 4), (32, 128, 4, 4), (32, 256, 4, 4))      # (block_n, block_k, warps, stages)
SWAP_TILES = ((64, 128, 4, 3), (64, 128, 4, 5), (64, 256, 4, 3), (64, 256, 4, 5), (64, 256, 4, 6),
              (64, 512, 4, 3), (32, 256, 4, 6), (128, 128, 4, 3), (128, 128, 4, 5), (128, 256, 4, 3),
              (128, 256, 4, 4), (256, 128, 4, 3), (256, 128, 8, 4), (256, 256, 8, 3), (128, 128, 8, 3),
              (128, 128, 8, 4), (64, 128, 8, 4), (128, 64, 8, 6), (256, 64, 8, 5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="64", help="comma-separated row counts (2 to 256)")
    parser.add_argument("--swap", action="store_true", help="sweep the transposed kernel's tiles")
    parser.add_argument("--pointer", action="store_true", help="sweep the pointer kernel's tiles")
    parser.add_argument("--block-m", default="", help="comma-separated row tiles of the transposed sweep")
    parser.add_argument("--layers", default=",".join(LAYERS), help="comma-separated layers of " + ", ".join(LAYERS))
    parser.add_argument("--json")
    args = parser.parse_args()
    sms = kernels.sm_count(torch.device("cuda"))
    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    timings, best = [], {}
    for name in args.layers.split(","):
        n, k = LAYERS[name]
        copies = max(1, math.ceil(L2_BYTES / (n * k)))
        weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        first = quantize_fp8_per_channel(weight)
        fp8 = [first] + [tuple(t.clone() for t in first) for _ in range(copies - 1)]   # as many as cycled_us takes
        bf16_copies = max(1, math.ceil(L2_BYTES / (2 * n * k)))
        bf16 = [weight] + [weight.clone() for _ in range(bf16_copies - 1)]
        for m in map(int, args.rows.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            rows = quantize_fp8_rows_torch(x)
            bf16_us = cycled_us(lambda i: (lambda w=bf16[i]: F.linear(x, w)), 2 * n * k)
            row_scale = rows.scale.reshape(m, 1)
            scaled_mm_us = cycled_us(lambda i: (lambda w=fp8[i]: torch._scaled_mm(
                rows.codes, w[0].t(), row_scale, w[1].reshape(1, n), out_dtype=torch.bfloat16)), n * k)

            def timed(tiles) -> float:         # microseconds a call of the product with these tiles
                return cycled_us(lambda i: (lambda w=fp8[i]: kernels.sum_partials(
                    kernels.fp8_linear_tiles(rows, *w, None, tiles), x.dtype)), n * k)

            chosen, engine_default = {}, kernels.FP8_SWAP_GEMM
            for swap in (False, True):
                kernels.FP8_SWAP_GEMM = swap
                tiles = kernels.choose_fp8_gemm_tiles(m, n, k, x.device)
                chosen[swap] = (timed(tiles), tiles)
            kernels.FP8_SWAP_GEMM = engine_default
            print(f"{name} [{n}, {k}] at {m} rows: cuBLAS bf16 {bf16_us:.1f} us; pointer tiles {chosen[False][1]} "
                  f"{chosen[False][0]:.1f} us; transposed {chosen[True][1]} {chosen[True][0]:.1f} us "
                  f"{n * k / chosen[True][0] / 1e6:.2f} TB/s; _scaled_mm {scaled_mm_us:.1f} us", flush=True)
            fastest = min(chosen.values(), key=lambda t: t[0])
            engine_m = chosen[True][1].block_m           # the engine's tile of m rows
            swap_ms = [int(b) for b in args.block_m.split(",") if b] or [engine_m]
            sweep = ([(False, engine_m, t) for t in POINTER_TILES if args.pointer]
                     + [(True, b, t) for b in swap_ms for t in SWAP_TILES if args.swap])
            for swap, block_m, (block_n, block_k, warps, stages) in sweep:
                if swap and (block_m + block_n) * block_k * stages > 200 * 1024:
                    continue                   # past the shared memory of a Hopper SM
                for split_k in (1, 2, 4, 8):
                    programs = math.ceil(n / block_n) * math.ceil(m / block_m) * split_k
                    if split_k > 1 and (programs > 8 * sms or k // block_k < 2 * split_k):
                        continue
                    tiles = kernels.Tiles(block_m, block_n, block_k, split_k, num_warps=warps, num_stages=stages,
                                          swap=swap)
                    us = timed(tiles)
                    timings.append({"layer": name, "n": n, "k": k, "m": m, "tiles": str(tiles), "us": us})
                    print(f"  {tiles}: {us:.1f} us {n * k / us / 1e6:.2f} TB/s", flush=True)
                    if us < fastest[0]:
                        fastest = (us, tiles)
            best[f"{m},{n},{k}"] = {"layer": name, "m": m, "us": fastest[0], "pointer_us": chosen[False][0],
                                    "swap_us": chosen[True][0], "bf16_us": bf16_us, "scaled_mm_us": scaled_mm_us,
                                    **{f: getattr(fastest[1], f) for f in ("block_m", "block_n", "block_k", "split_k",
                                                                           "num_warps", "num_stages", "swap")}}
            print(f"  fastest: {fastest[1]} {fastest[0]:.1f} us (pointer {chosen[False][0]:.1f}, transposed "
                  f"{chosen[True][0]:.1f}, cuBLAS bf16 {bf16_us:.1f}, _scaled_mm {scaled_mm_us:.1f})", flush=True)
    if args.json:
        json.dump({"device": torch.cuda.get_device_name(), "timings": timings, "best": best},
                  open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
