"""Probe: does programmatic dependent launch (PDL) shorten a CUDA-graph decode step on this card?

A batch-1 decode step is a chain of ~180 kernels, most of them tiny, each waiting for the one before
it. With PDL (Hopper and later) a kernel may be launched while its predecessor is still running; it
runs its prologue (here: loading a weight vector that no earlier kernel writes), then waits in
`gdc_wait` until the predecessor's memory is visible. This probe captures the same chain twice in a
CUDA graph, with and without PDL on the small Triton kernels, and times the replays:

    16 x [ mm(x, W_qkv) -> norm -> mm(., W_o) -> norm -> mm(., W_up) -> norm -> mm(., W_down) -> norm ]
    and a chain of 128 norms alone (the pure kernel-to-kernel gap)

    python tools/pdl_probe.py
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanovllm.bench.graph_timing import graph_time_us


@triton.jit
def _scale_norm_kernel(x_ptr, w_ptr, out_ptr, N: tl.constexpr, USE_GDC: tl.constexpr):
    offs = tl.arange(0, N)
    w = tl.load(w_ptr + offs).to(tl.float32)          # written by no earlier kernel: may run early
    if USE_GDC:
        tl.extra.cuda.gdc_wait()                        # the predecessor's outputs are visible after this
    x = tl.load(x_ptr + offs).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / N + 1e-6)
    if USE_GDC:
        tl.extra.cuda.gdc_launch_dependents()
    tl.store(out_ptr + offs, (x * rstd * w).to(out_ptr.dtype.element_ty))


def norm(x: torch.Tensor, w: torch.Tensor, pdl: bool) -> torch.Tensor:
    out = torch.empty_like(x)
    if pdl:
        _scale_norm_kernel[(1,)](x, w, out, N=x.shape[-1], USE_GDC=True, launch_pdl=True, num_warps=8)
    else:
        _scale_norm_kernel[(1,)](x, w, out, N=x.shape[-1], USE_GDC=False, num_warps=8)
    return out


def main() -> None:
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    hidden, inter = 2048, 8192
    weights = [(torch.randn(3072, hidden, device=dev, dtype=dt), torch.randn(hidden, hidden, device=dev, dtype=dt),
                torch.randn(inter, hidden, device=dev, dtype=dt), torch.randn(hidden, inter, device=dev, dtype=dt))
               for _ in range(16)]
    w = torch.randn(inter, device=dev, dtype=dt)
    x0 = torch.randn(1, hidden, device=dev, dtype=dt)
    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")

    def layers(pdl: bool):
        def run():
            x = x0
            for w_qkv, w_o, w_up, w_down in weights:
                y = norm((x @ w_qkv.t())[:, :hidden], w, pdl)
                y = norm(y @ w_o.t(), w, pdl)
                y = norm(y @ w_up.t(), w, pdl)
                x = norm(y @ w_down.t(), w, pdl)
        return run

    def norms(pdl: bool):
        def run():
            x = x0
            for _ in range(128):
                x = norm(x, w, pdl)
        return run

    for name, make in (("16 layers of 4 matmuls + 4 norms", layers), ("128 norms alone", norms)):
        plain = graph_time_us(make(False), replays=200)
        try:
            with_pdl = graph_time_us(make(True), replays=200)
        except Exception as error:   # an older Triton or driver without PDL
            print(f"{name}: plain {plain:.1f} us per replay; PDL failed: {type(error).__name__}: {error}")
            continue
        print(f"{name}: plain {plain:.1f} us, PDL {with_pdl:.1f} us per replay "
              f"({plain - with_pdl:+.1f} us)")


if __name__ == "__main__":
    main()
