"""Probe: how fast can a one-row GEMV's loads alone read its weight, tile by tile?

A kernel that loads a [BLOCK_N, BLOCK_K / 8] tile of int32 words a step (a row's words contiguous,
as the W4A16 layout keeps them; 16 bytes a thread) and XORs them, nothing multiplied, one step in
flight a program, K split over programs as the GEMVs split it. Weights cycled past L2 (each call on
its own copy). What it reads is the ceiling of a GEMV stepping the same tiles: on an H200 Llama-3.1-8B's
down_proj read at 1.9 TB/s at best in [64, 128] steps (64 bytes of a row), 3.0 TB/s in [16, 512].
FP8's e4m3 bytes are timed as words too (`--fp8`: a step of BLOCK_K bytes a row).

    python tools/gemv_loads_probe.py [--fp8]
"""
from __future__ import annotations

import argparse
import math

import torch
import triton
import triton.language as tl

from nanovllm.ops import sm_count

from quant_gemv_probe import SHAPES, cycled_us, sweep_splits     # tools/, the script's own directory


@triton.jit
def _load_rows_kernel(w_ptr, out_ptr, N, K_WORDS, stride_w, WORDS_PER_SPLIT, BLOCK_N: tl.constexpr,
                      WORDS: tl.constexpr):
    """Reads [BLOCK_N, WORDS] words a step from [N, K_WORDS] and XORs them: the bytes alone."""
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_w + tl.arange(0, WORDS)[None, :]
    mask = (offs_n < N)[:, None]
    acc = tl.zeros([BLOCK_N, WORDS], dtype=tl.int32)
    start = tl.program_id(2) * WORDS_PER_SPLIT
    for w0 in range(start, tl.minimum(start + WORDS_PER_SPLIT, K_WORDS), WORDS):
        acc ^= tl.load(ptrs + w0, mask=mask, other=0)
    tl.store(out_ptr + tl.program_id(2) * N + offs_n, tl.xor_sum(acc, axis=1), mask=offs_n < N)


def load_rows(words: torch.Tensor, block_n: int, words_per_step: int, split_k: int, num_warps: int = 4):
    """The XOR of each row's words [S, N] (one partial a split), read in [block_n, words_per_step] steps."""
    n, k_words = words.shape
    out = torch.empty(split_k, n, device=words.device, dtype=torch.int32)
    per_split = triton.cdiv(k_words // words_per_step, split_k) * words_per_step
    _load_rows_kernel[(1, triton.cdiv(n, block_n), split_k)](words, out, n, k_words, words.stride(0), per_split,
                                                             BLOCK_N=block_n, WORDS=words_per_step,
                                                             num_warps=num_warps)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fp8", action="store_true", help="a byte a weight (FP8's e4m3) instead of half a byte")
    args = parser.parse_args()
    weights_per_word = 4 if args.fp8 else 8
    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    sms = sm_count(torch.device("cuda"))
    for model, shapes in SHAPES.items():
        for name, (n, k) in shapes.items():
            nbytes = n * k // weights_per_word * 4
            copies = [torch.randint(-2**31, 2**31 - 1, (n, k // weights_per_word), device="cuda", dtype=torch.int32)
                      for _ in range(math.ceil(200e6 / nbytes))]
            for block_n, block_k in ((64, 128), (128, 128), (32, 256), (16, 512), (8, 512), (8, 1024), (16, 1024)):
                for split_k in sweep_splits(n, k, block_n, block_k, sms, unsplit_at_any_width=True):
                    step = block_k // weights_per_word
                    us = cycled_us(lambda i: (lambda w=copies[i % len(copies)]: load_rows(w, block_n, step, split_k)),
                                   nbytes)
                    print(f"{model} {name} [{block_n}, {block_k}] split {split_k}: {us:.2f} us "
                          f"{nbytes / us / 1e6:.2f} TB/s", flush=True)
            del copies
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
