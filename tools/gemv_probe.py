"""Probe: how fast are cuBLAS's batch-1 products for Llama-3.2-1B's weight shapes, called different ways?

At batch 1 a decode step's matmuls are matrix-vector products that must read every weight once; the
graph profile shows the small ones at ~40% of copy bandwidth. This times each
shape as F.linear, as torch.mv, as W @ x^T and with the weight stored transposed, under each BLAS backend torch offers, 50 calls inside
one CUDA graph (no launch overhead), and prints time and achieved bandwidth.

    python tools/gemv_probe.py
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nanovllm.bench.graph_timing import graph_time_us

SHAPES = {"qkv_proj": (3072, 2048), "o_proj": (2048, 2048), "gate_up_proj": (16384, 2048),
          "down_proj": (2048, 8192), "lm_head": (128256, 2048)}


def main() -> None:
    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    ways = {"F.linear(x, W)": lambda x, w: F.linear(x, w),
            "torch.mv(W, x[0])": lambda x, w: torch.mv(w, x[0]),
            "W @ x.T": lambda x, w: w @ x.t(),
            "x @ Wt, Wt = W.T stored [K, N]": None}
    print("| shape | MB | backend | " + " | ".join(ways) + " |")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        wt = w.t().contiguous()                          # the same weight stored the other way round
        mb = w.numel() * 2 / 1e6
        for backend in ("cublas", "cublaslt"):
            torch.backends.cuda.preferred_blas_library(backend)
            cells = []
            for way in ways.values():
                us = graph_time_us((lambda: way(x, w)) if way is not None else (lambda: x @ wt), calls=50, replays=20)
                cells.append(f"{us:.2f} us {mb / us:.2f} TB/s")
            print(f"| {name} {n}x{k} | {mb:.1f} | {backend} | " + " | ".join(cells) + " |")
    torch.backends.cuda.preferred_blas_library("cublas")


if __name__ == "__main__":
    main()
