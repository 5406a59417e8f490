"""Probe: can cuBLAS's small-batch products for Llama-3.2-1B's shapes get closer to copy bandwidth if
we split K ourselves?

At batch 1 cuBLAS reaches only 1.7-2.5 TB/s on qkv_proj and o_proj: a
3072 x 2048 product has too few output tiles to keep 132 SMs reading. Splitting K into S slices and
calling one strided batched GEMM (`torch.bmm` over views, no copy) gives S times the tiles; the S
partial sums are added by the kernel that reads the product next; its extra cost is timed last.
Also timed at M = 2, 4, 8, 16 rows: where does the split stop paying?
Every figure is the mean over calls inside one CUDA graph (no launch overhead), each call on
another copy of the weight so that it comes from HBM. (The first version of this probe reused one
weight, which then sat in L2: it overstated every rate and understated the gain.)

    python tools/splitk_probe.py
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
    print("weights cycled through copies totalling >= 200 MB, so each call reads its weight from HBM, "
          "not from the 50 MB L2 (a model's 16 layers never find their weights in L2 either)")
    for name, (n, k) in SHAPES.items():
        mb = n * k * 2 / 1e6
        copies = max(1, int(200 // mb) + 1)
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        for m in (1, 2, 4, 8, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)

            def cycle(product):
                return lambda: [product(w) for w in weights]

            us = graph_time_us(cycle(lambda w: F.linear(x, w)), calls=2, replays=20) / copies
            cells = [f"linear {us:.2f} us ({mb / us:.2f} TB/s)"]
            for s in (2, 4, 8):
                bmm = graph_time_us(cycle(lambda w: torch.bmm(*split_k_views(x, w, s), out_dtype=torch.float32)),
                                    calls=2, replays=20) / copies
                cells.append(f"S={s} {bmm:.2f} us ({mb / bmm:.2f} TB/s)")
            print(f"{name} {n}x{k} {mb:.1f} MB M={m}: " + " | ".join(cells), flush=True)
    consumers()


def consumers() -> None:
    """What adding the partials costs the kernels that read them, at batch 1 (Llama-3.2-1B)."""
    from nanovllm.ops.rmsnorm_triton import add_rms_norm_triton
    residual, weight = torch.randn(2, 1, 2048, device="cuda", dtype=torch.bfloat16).unbind(0)
    weight = weight[0]
    for s in (1, 4, 8):
        x = torch.randn(s, 1, 2048, device="cuda") if s > 1 else torch.randn(1, 2048, device="cuda").bfloat16()
        us = graph_time_us(lambda: add_rms_norm_triton(x, residual, weight, 1e-5), calls=50, replays=20)
        print(f"add_rms_norm T=1 H=2048, {s} partial(s): {us:.2f} us")


if __name__ == "__main__":
    main()
