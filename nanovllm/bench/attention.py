"""Decode attention alone, against the card's copy bandwidth measured in the same run.

A decode step reads every cached K and V of every sequence once and does little
arithmetic per byte (2 x group FLOPs per K/V element), so its floor is the KV bytes
over memory bandwidth. This tool times `paged_attention` on a decode batch over a
shuffled block pool and prints achieved GB/s beside a large device-to-device copy
(bytes read + written over time), the practical ceiling of the card.

    python -m nanovllm.bench.attention                 # batch 64, context 4096, Llama-3.2-1B shapes
    python -m nanovllm.bench.attention --sweep         # also time other tile configs and split counts
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from nanovllm.ops.attention import AttentionMetadata, paged_attention_torch


@dataclass
class DecodeBatch:
    q: torch.Tensor               # [B, Hq, D]
    k_cache: torch.Tensor         # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor
    metadata: AttentionMetadata
    kv_bytes: int                 # K and V bytes the batch must read


def make_decode_batch(batch: int, context: int, num_heads: int, num_kv_heads: int, head_dim: int,
                      block_size: int, dtype: torch.dtype) -> DecodeBatch:
    """Every sequence has `context` tokens (the new one included), its blocks scattered in the pool."""
    blocks_per_seq = -(-context // block_size)
    num_blocks = batch * blocks_per_seq
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, device="cuda", dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    block_tables = torch.randperm(num_blocks, device="cuda").to(torch.int32).view(batch, blocks_per_seq)
    metadata = AttentionMetadata(
        query_start_loc=torch.arange(batch + 1, device="cuda", dtype=torch.int32),
        seq_lens=torch.full((batch,), context, device="cuda", dtype=torch.int32),
        slot_mapping=torch.full((batch,), -1, device="cuda", dtype=torch.int64),
        block_tables=block_tables, max_query_len=1, max_seq_len=context)
    q = torch.randn(batch, num_heads, head_dim, device="cuda", dtype=dtype)
    kv_bytes = 2 * batch * context * num_kv_heads * head_dim * k_cache.element_size()
    return DecodeBatch(q, k_cache, v_cache, metadata, kv_bytes)


def median_ms(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_bandwidth(num_bytes: int = 2 << 30) -> float:
    """GB/s of a device-to-device copy of random data, counting bytes read plus bytes written."""
    src = torch.randn(num_bytes // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * num_bytes / (ms * 1e-3) / 1e9


def time_decode(batch: DecodeBatch, **kernel_options) -> float:
    from nanovllm.ops.attention_triton import paged_attention_triton
    scale = batch.q.shape[-1] ** -0.5
    return median_ms(lambda: paged_attention_triton(batch.q, batch.k_cache, batch.v_cache, batch.metadata,
                                                    scale, **kernel_options))


def check_against_reference(batch: DecodeBatch) -> float:
    """Relative error of the kernel against the float32 torch reference on this batch."""
    from nanovllm.ops.attention_triton import paged_attention_triton
    scale = batch.q.shape[-1] ** -0.5
    out = paged_attention_triton(batch.q, batch.k_cache, batch.v_cache, batch.metadata, scale)
    ref = paged_attention_torch(batch.q.float(), batch.k_cache.float(), batch.v_cache.float(), batch.metadata, scale)
    return ((out.float() - ref).norm() / ref.norm()).item()


def sweep(batch: DecodeBatch, copy_gbps: float) -> None:
    from nanovllm.ops.attention_triton import AttentionKernelConfig, decode_config, decode_kv_splits
    group = batch.q.shape[1] // batch.k_cache.shape[2]
    default = decode_config(group, batch.q.shape[-1])
    rows = []
    for block_n in (32, 64, 128):
        for num_warps in (2, 4):
            for num_stages in (2, 3, 4):
                config = AttentionKernelConfig(default.block_m, block_n, num_warps, num_stages)
                rows.append((f"block_n={block_n} warps={num_warps} stages={num_stages}", dict(config=config)))
    for splits in (2, 4):
        rows.append((f"default config, {splits} KV splits", dict(num_kv_splits=splits)))
    print(f"\nsweep (batch {batch.q.shape[0]}, context {batch.metadata.max_seq_len}; default {default}):")
    for name, options in rows:
        ms = time_decode(batch, **options)
        gbps = batch.kv_bytes / (ms * 1e-3) / 1e9
        print(f"  {name:42s} {ms * 1e3:9.1f} us  {gbps:8.0f} GB/s  {gbps / copy_gbps:6.1%}")
    print("\nsplit-KV at small batch, long context (fraction of copy bandwidth per split count):")
    num_heads, num_kv_heads, head_dim = batch.q.shape[1], batch.k_cache.shape[2], batch.q.shape[2]
    for small_batch, context in ((1, 65536), (4, 32768), (16, 8192)):
        small = make_decode_batch(small_batch, context, num_heads, num_kv_heads, head_dim,
                                  batch.k_cache.shape[1], batch.q.dtype)
        auto = decode_kv_splits(small_batch, num_kv_heads, context, small.q.device)
        cells = []
        for splits in sorted({1, 2, 4, 8, 16, 32, auto}):
            ms = time_decode(small, num_kv_splits=splits)
            gbps = small.kv_bytes / (ms * 1e-3) / 1e9
            cells.append(f"{splits}{'*' if splits == auto else ''}: {ms * 1e3:.0f} us {gbps / copy_gbps:.0%}")
        print(f"  batch {small_batch:3d} context {context:6d} | " + " | ".join(cells))
    print("  (* = the shape-based choice of decode_kv_splits)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--num-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--sweep", action="store_true", help="also time other tile configs and split counts")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU: the kernels it times are the Triton ones")

    torch.manual_seed(0)
    name = torch.cuda.get_device_name()
    copy_gbps = copy_bandwidth()
    batch = make_decode_batch(args.batch, args.context, args.num_heads, args.num_kv_heads, args.head_dim,
                              args.block_size, getattr(torch, args.dtype))
    error = check_against_reference(batch)
    ms = time_decode(batch)
    scale = args.head_dim ** -0.5
    ref_ms = median_ms(lambda: paged_attention_torch(batch.q, batch.k_cache, batch.v_cache, batch.metadata, scale))
    gbps = batch.kv_bytes / (ms * 1e-3) / 1e9
    print(f"card: {name}, torch {torch.__version__}")
    print(f"decode attention: batch {args.batch}, context {args.context}, {args.num_heads} q heads / "
          f"{args.num_kv_heads} kv heads / head_dim {args.head_dim}, {args.dtype}, block {args.block_size}")
    print(f"relative error vs float32 reference: {error:.2e}")
    print(f"copy bandwidth (read + write):      {copy_gbps:8.0f} GB/s")
    print(f"KV bytes read per call:             {batch.kv_bytes / 1e6:8.1f} MB")
    print(f"floor at copy bandwidth:            {batch.kv_bytes / copy_gbps / 1e3:8.1f} us")
    print(f"triton paged attention:             {ms * 1e3:8.1f} us  {gbps:8.0f} GB/s  "
          f"{gbps / copy_gbps:6.1%} of copy bandwidth (target >= 70%)")
    print(f"torch reference (gather + SDPA):    {ref_ms * 1e3:8.1f} us")
    if args.sweep:
        sweep(batch, copy_gbps)


if __name__ == "__main__":
    main()
