"""Probe: the FP8 W8A8 GEMM at prefill rows, Llama-3.1-8B's layers, by tile and by load path.

Times `fp8_linear_tiles` on rows already quantized (Fp8Rows, as the norms hand them over) at M rows
(8,192 by default: a full chunk of the `throughput` workload's prefill) for the pointer-load kernel's
tiles and the descriptor kernel's (`tma=True`: TMA loads, programs in groups of FP8_TMA_GROUP_M row
tiles), against cuBLAS bfloat16 and torch._scaled_mm (FP8, row-wise scales) on the same rows. Prints
microseconds, TFLOP/s and each result's largest difference from torch._scaled_mm's relative to its
largest value.

    python tools/fp8_prefill_probe.py [--rows 8192]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from nanovllm.ops import quant_linear_triton as kernels
from nanovllm.ops.quant_format import quantize_fp8_rows_torch
from nanovllm.ops.quant_linear import quantize_fp8_per_channel

LAYERS = {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (28672, 4096), "down_proj": (4096, 14336)}
TILES = ((128, 128, 8, 3), (128, 256, 8, 3), (256, 128, 8, 3), (256, 64, 8, 4), (128, 128, 8, 4), (128, 128, 4, 4))
# (block_n, block_k, warps, stages) of a 128-row tile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8192)
    args = parser.parse_args()
    m = args.rows
    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}, {m} rows", flush=True)
    for name, (n, k) in LAYERS.items():
        weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        wq, ws = quantize_fp8_per_channel(weight)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        rows = quantize_fp8_rows_torch(x)
        ref = torch._scaled_mm(rows.codes, wq.T, scale_a=rows.scale[:, None], scale_b=ws[None, :],
                               out_dtype=torch.bfloat16).float()
        print(f"{name} [{n}, {k}]", flush=True)

        def report(label: str, fn, compare: bool = True) -> None:
            try:
                difference = ((fn().float() - ref).abs().max() / ref.abs().max()).item() if compare else float("nan")
                ms = do_bench(fn, warmup=10, rep=50)
            except Exception as error:      # noqa: BLE001 - a tile too large for the card's shared memory
                print(f"  {label:36} failed: {type(error).__name__}: {str(error)[:120]}", flush=True)
                return
            print(f"  {label:36} {1e3 * ms:8.1f} us {2 * m * n * k / ms / 1e9:7.1f} TFLOP/s  "
                  f"difference {difference:.1e}", flush=True)

        report("cuBLAS bf16", lambda: F.linear(x, weight), compare=False)
        report("torch._scaled_mm", lambda: torch._scaled_mm(rows.codes, wq.T, scale_a=rows.scale[:, None],
                                                            scale_b=ws[None, :], out_dtype=torch.bfloat16))
        for tma in (False, True):
            for block_n, block_k, warps, stages in TILES:
                tiles = kernels.Tiles(128, block_n, block_k, num_warps=warps, num_stages=stages, tma=tma)
                report(f"{'descriptors' if tma else 'pointers'} {block_n}x{block_k} w{warps} s{stages}",
                       lambda tiles=tiles: kernels.fp8_linear_tiles(rows, wq, ws, None, tiles))


if __name__ == "__main__":
    main()
