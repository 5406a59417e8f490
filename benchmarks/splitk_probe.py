"""Probe: can cuBLAS's small-batch products for Llama-3.2-1B's shapes get closer to copy bandwidth if
we split K ourselves?

At batch 1 cuBLAS reaches only 1.7-2.5 TB/s on qkv_proj and o_proj (NOTES-kernels.md v6): a
3072 x 2048 product has too few output tiles to keep 132 SMs reading. Splitting K into S slices and
calling one strided batched GEMM (`torch.bmm` over views, no copy) gives S times the tiles; the S
partial sums are then added (here by `sum(0)`; in the model the next fused kernel could do it).
Also timed at M = 2, 4, 8, 16 rows: where does the split stop paying?
Every figure is 50 calls inside one CUDA graph (no launch overhead), microseconds per call.

    python benchmarks/splitk_probe.py
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nanovllm.bench.graph_timing import graph_time_us

SHAPES = {"qkv_proj": (3072, 2048), "o_proj": (2048, 2048), "gate_up_proj": (16384, 2048),
          "down_proj": (2048, 8192)}


def split_k_views(x: torch.Tensor, w: torch.Tensor, splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K], w [N, K] -> [S, M, K/S] and [S, K/S, N]: slice s of K of each, as views."""
    (m, k), n = x.shape, w.shape[0]
    return x.view(m, splits, k // splits).transpose(0, 1), w.view(n, splits, k // splits).permute(1, 2, 0)


def main() -> None:
    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        mb = w.numel() * 2 / 1e6
        for m in (1, 2, 4, 8, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            us = graph_time_us(lambda: F.linear(x, w), calls=50, replays=20)
            cells = [f"linear {us:.2f} us ({mb / us:.2f} TB/s)"]
            if m <= 16:
                for s in (2, 4, 8):
                    xs, ws = split_k_views(x, w, s)
                    ref = F.linear(x.float(), w.float())
                    err = (torch.bmm(xs, ws).float().sum(0) - ref).abs().max().item()
                    bmm = graph_time_us(lambda: torch.bmm(xs, ws), calls=50, replays=20)
                    both = graph_time_us(lambda: torch.bmm(xs, ws).sum(0), calls=50, replays=20)
                    cell = f"S={s}: bmm {bmm:.2f} / +sum {both:.2f} us (err {err:.3f})"
                    try:
                        f32 = graph_time_us(lambda: torch.bmm(xs, ws, out_dtype=torch.float32), calls=50, replays=20)
                        cell += f" / fp32-out bmm {f32:.2f}"
                    except (RuntimeError, TypeError) as e:
                        cell += f" / fp32-out: {type(e).__name__}"
                    cells.append(cell)
            print(f"{name} {n}x{k} {mb:.1f} MB M={m}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
