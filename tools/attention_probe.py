"""Probe: the decode attention kernel at small batch and short contexts, by split count.

At batch 1 a step runs 16 attention calls, each a few microseconds of latency more than of work. This
times `paged_attention_triton` for Llama-3.2-1B shapes (32 query heads, 8 KV heads, head_dim 64,
block 16) at batch B and context L for each split count (the merge kernel included when splits > 1),
16 calls per CUDA graph, and prints microseconds per call.

    python tools/attention_probe.py
    python tools/attention_probe.py --configs     # tile configurations of a decode batch (below)

--configs: Llama-3.1-8B's shapes (32 query heads, 8 KV heads, head_dim 128, block 16; --head-dim 64:
Llama-3.2-1B's) at batch 64 and 256 and contexts of 128 to 2048 keys (--contexts), one split, for
several tile configurations (keys a step, pipeline stages, warps; --tiles 128x2x4,256x2x4 to choose,
--tiles engine for the engine's own);
each call reads another layer's cache, so that the keys come from HBM and not from the 60 MB L2.
--kv-dtype fp8: an FP8 cache (scales 0.37 and 0.021). --grids: each tile also with the grid of
DECODE_HEADS_TOGETHER (a sequence's KV heads as neighbouring programs), "apart" then "together". Prints
microseconds per call and the KV bytes read per second.
"""
from __future__ import annotations

import argparse
import math

import torch

from nanovllm.bench.graph_timing import graph_time_us
from nanovllm.ops import attention_triton
from nanovllm.ops.attention import AttentionMetadata, quantize_kv
from nanovllm.ops.attention_triton import AttentionKernelConfig, decode_config, paged_attention_triton
from nanovllm.ops.quant_format import FP8_DTYPE

CONFIGS = ((128, 2, 4), (64, 2, 4), (64, 3, 4), (32, 2, 4), (32, 3, 4), (128, 1, 4), (64, 1, 4), (64, 2, 8),
           (128, 2, 8))     # (keys a step, stages, warps)


def decode_metadata(batch: int, context: int, tables: torch.Tensor, max_seq_len: int | None = None):
    """A decode step of `batch` sequences of `context` keys each, through the block tables given."""
    return AttentionMetadata(
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device="cuda"),
        seq_lens=torch.full((batch,), context, dtype=torch.int32, device="cuda"),
        slot_mapping=torch.zeros(batch, dtype=torch.int64, device="cuda"),
        block_tables=tables, max_query_len=1, max_seq_len=max_seq_len or context)


def decode_configs(dim: int = 128, kv_dtype: str = "bf16", contexts=(128, 512, 1024, 2048),
                   configs=CONFIGS, grids=(None,)) -> None:
    heads, kv_heads, block = 32, 8, 16
    fp8 = kv_dtype == "fp8"
    element_bytes = 1 if fp8 else 2
    scales = dict(k_scale=0.37, v_scale=0.021) if fp8 else {}
    print(f"card: {torch.cuda.get_device_name()}; head_dim {dim}, {kv_dtype} cache; the engine's decode tile "
          f"now: {decode_config(heads // kv_heads, dim, fp8)}")
    grid_names = {None: "", False: ", apart", True: ", together"}
    print("| batch | context | " + " | ".join(f"{n} keys, {s} stages, {w} warps{grid_names[g]}"
                                             for n, s, w in configs for g in grids) + " |")
    for batch in (64, 256):
        for context in contexts:
            width = context // block
            kv_bytes = 2 * batch * context * kv_heads * dim * element_bytes
            layers = max(1, math.ceil(200e6 / kv_bytes))             # caches cycled past the L2

            def cache():
                values = torch.randn(batch * width, block, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
                return quantize_kv(values, FP8_DTYPE, 0.37) if fp8 else values
            caches = [(cache(), cache()) for _ in range(layers)]
            tables = torch.randperm(batch * width, dtype=torch.int32, device="cuda").view(batch, width)
            q = torch.randn(batch, heads, dim, device="cuda", dtype=torch.bfloat16)
            metadata = decode_metadata(batch, context, tables)
            cells = []
            for (block_n, stages, warps), together in ((c, g) for c in configs for g in grids):
                config = AttentionKernelConfig(block_m=16, block_n=block_n, num_warps=warps, num_stages=stages)
                if together is not None:
                    attention_triton.DECODE_HEADS_TOGETHER = together
                try:
                    us = graph_time_us(lambda: [paged_attention_triton(q, k, v, metadata, 0.088, num_kv_splits=1,
                                                                       config=config, **scales) for k, v in caches],
                                       replays=20) / layers
                    cells.append(f"{us:.1f} us {kv_bytes / us / 1e6:.2f} TB/s")
                except Exception as error:    # over shared memory
                    cells.append("failed: " + str(error).splitlines()[0][:60])
            print(f"| {batch} | {context} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", action="store_true", help="tile configurations of a decode batch")
    parser.add_argument("--head-dim", type=int, default=128, help="--configs: 128 (Llama-3.1-8B) or 64")
    parser.add_argument("--kv-dtype", choices=["bf16", "fp8"], default="bf16", help="--configs: the cache's dtype")
    parser.add_argument("--contexts", default="128,512,1024,2048", help="--configs: keys a sequence")
    parser.add_argument("--tiles", help="--configs: KEYSxSTAGESxWARPS,... or engine (default: a fixed list)")
    parser.add_argument("--grids", action="store_true", help="--configs: each tile with the KV heads of a "
                        "sequence apart and together in the grid")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.configs:
        if args.tiles == "engine":
            engine = decode_config(4, args.head_dim, args.kv_dtype == "fp8")
            tiles = ((engine.block_n, engine.num_stages, engine.num_warps),)
        else:
            tiles = (tuple(tuple(int(n) for n in tile.split("x")) for tile in args.tiles.split(","))
                     if args.tiles else CONFIGS)
        decode_configs(args.head_dim, args.kv_dtype, tuple(int(c) for c in args.contexts.split(",")), tiles,
                       (False, True) if args.grids else (None,))
        return
    heads, kv_heads, dim, block = 32, 8, 64, 16
    width = 4096 // block
    print(f"card: {torch.cuda.get_device_name()}")
    splits_list = (1, 2, 4, 8, 16, 32)
    print("| batch | context | " + " | ".join(f"{s} splits" for s in splits_list) + " |")
    for batch in (1, 4, 16):
        num_blocks = batch * width
        k_cache = torch.randn(num_blocks, block, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
        v_cache = torch.randn_like(k_cache)
        tables = torch.arange(num_blocks, dtype=torch.int32, device="cuda").view(batch, width)
        q = torch.randn(batch, heads, dim, device="cuda", dtype=torch.bfloat16)
        for context in (128, 384, 1024, 4096):
            metadata = decode_metadata(batch, context, tables, max_seq_len=width * block)
            cells = []
            for splits in splits_list:
                us = graph_time_us(lambda: paged_attention_triton(q, k_cache, v_cache, metadata, 0.125,
                                                                  num_kv_splits=splits), calls=16)
                cells.append(f"{us:.2f}")
            print(f"| {batch} | {context} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
