"""Probe: would one persistent kernel with grid-wide barriers beat a chain of kernels in a CUDA graph?

A batch-1 decode step is a chain of small kernels, and at Llama-3.2-1B most of a step is the time
between them rather than bytes. A persistent ("mega") kernel would replace each kernel boundary by
a barrier across its programs (an atomic counter that every program adds to, then waits on). This
probe times both on the same work, reading a decode's weight bytes at 4 bits (qkv_proj, o_proj,
gate_up_proj, down_proj of every layer, each its own memory; Llama-3.2-1B's 487 MB by default):

- persistent: one kernel, one or two programs an SM, a grid barrier after every layer's product;
- kernels: a launch a product, in a CUDA graph, with and without PDL;
- and the bare costs: a grid barrier in a loop, an empty kernel in a graph.

    python tools/grid_barrier_probe.py [--model llama-3.1-8b]
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from nanovllm.bench.graph_timing import graph_time_us

# layers, and the bytes of qkv_proj, o_proj, gate_up_proj and down_proj at 4 bits
SHAPES = {"llama-3.2-1b": (16, (3_145_728, 2_097_152, 16_777_216, 8_388_608)),
          "llama-3.1-8b": (32, (12_582_912, 8_388_608, 58_720_256, 29_360_128))}
BLOCK = 2048                                                      # int32 words a program reads a step


@triton.jit
def _read(src, n_words, pid, num_programs, BLOCK: tl.constexpr):
    """Program pid's share of src's n_words int32 words, folded into one value (so the reads stay)."""
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for chunk in range(pid, tl.cdiv(n_words, BLOCK), num_programs):
        offs = chunk * BLOCK + tl.arange(0, BLOCK)
        acc ^= tl.load(src + offs, mask=offs < n_words, other=0)
    return tl.xor_sum(acc, axis=0)


@triton.jit
def _grid_barrier(counter, target):
    """Every program adds 1 to counter, then waits until it reaches target (all programs resident)."""
    tl.debug_barrier()
    tl.atomic_add(counter, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
    while seen < target:
        seen = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _read_then_barrier(src, n_words, layer, counter, phase, pid, num_programs, BLOCK: tl.constexpr):
    """Layer `layer`'s product of n_words words read, then the grid barrier that ends phase `phase`."""
    folded = _read(src + layer * n_words, n_words, pid, num_programs, BLOCK)
    phase += num_programs
    _grid_barrier(counter, phase)
    return folded, phase


@triton.jit
def _persistent_kernel(src0, n0, src1, n1, src2, n2, src3, n3, out, counter, LAYERS: tl.constexpr,
                       BLOCK: tl.constexpr):
    pid, num_programs = tl.program_id(0), tl.num_programs(0)
    folded = tl.full([], 0, tl.int32)
    phase = tl.full([], 0, tl.int32)
    for layer in range(LAYERS):
        value, phase = _read_then_barrier(src0, n0, layer, counter, phase, pid, num_programs, BLOCK)
        folded ^= value
        value, phase = _read_then_barrier(src1, n1, layer, counter, phase, pid, num_programs, BLOCK)
        folded ^= value
        value, phase = _read_then_barrier(src2, n2, layer, counter, phase, pid, num_programs, BLOCK)
        folded ^= value
        value, phase = _read_then_barrier(src3, n3, layer, counter, phase, pid, num_programs, BLOCK)
        folded ^= value
    tl.store(out + pid, folded)


@triton.jit
def _product_kernel(src, n_words, out, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    tl.store(out + pid, _read(src, n_words, pid, tl.num_programs(0), BLOCK))


@triton.jit
def _barriers_kernel(counter, N: tl.constexpr):
    for i in range(N):
        _grid_barrier(counter, (i + 1) * tl.num_programs(0))


@triton.jit
def _empty_kernel(out, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    tl.store(out + tl.program_id(0), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="llama-3.2-1b")
    layers, product_bytes = SHAPES[parser.parse_args().model]
    device = torch.device("cuda")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    words = [size // 4 for size in product_bytes]
    weights = [torch.randint(0, 1 << 30, (layers * n,), dtype=torch.int32, device=device) for n in words]
    out = torch.zeros(8 * sms, dtype=torch.int32, device=device)
    counter = torch.zeros(1, dtype=torch.int32, device=device)
    total = layers * sum(product_bytes)
    print(f"card: {torch.cuda.get_device_name()}, {sms} SMs; {layers} layers x 4 products, {total / 1e6:.0f} MB")

    def persistent(grid: int, warps: int) -> None:
        counter.zero_()
        _persistent_kernel[(grid,)](weights[0], words[0], weights[1], words[1], weights[2], words[2], weights[3],
                                    words[3], out, counter, LAYERS=layers, BLOCK=BLOCK, num_warps=warps)

    def kernels(grid: int, warps: int, pdl: bool) -> None:
        for layer in range(layers):
            for weight, n in zip(weights, words):
                _product_kernel[(grid,)](weight[layer * n:], n, out, BLOCK=BLOCK, PDL=pdl, num_warps=warps,
                                         **({"launch_pdl": True} if pdl else {}))

    for warps in (4, 8):
        for per_sm in (1, 2):
            grid = per_sm * sms
            timings = {"persistent, a barrier a product": graph_time_us(lambda: persistent(grid, warps)),
                       "a kernel a product": graph_time_us(lambda: kernels(grid, warps, False)),
                       "a kernel a product, PDL": graph_time_us(lambda: kernels(grid, warps, True))}
            for name, us in timings.items():
                print(f"  {warps} warps, {per_sm} an SM, {name:32} {us:7.1f} us  {total / us / 1e6:5.2f} TB/s")
    for per_sm in (1, 2):
        def barriers():
            counter.zero_()
            _barriers_kernel[(per_sm * sms,)](counter, N=1000, num_warps=4)
        print(f"  a grid barrier, {per_sm} program(s) an SM: {graph_time_us(barriers, replays=5) / 1000:.2f} us")
    for pdl in (False, True):
        us = graph_time_us(lambda: _empty_kernel[(sms,)](out, PDL=pdl, num_warps=4,
                                                         **({"launch_pdl": True} if pdl else {})),
                           calls=200, replays=5)
        print(f"  an empty kernel in a graph, {'with' if pdl else 'without'} PDL: {us:.2f} us")


if __name__ == "__main__":
    main()
