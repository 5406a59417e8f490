"""Probe: the decode attention kernel at small batch and short contexts, by split count.

At batch 1 a step runs 16 attention calls, each a few microseconds of latency more than of work. This
times `paged_attention_triton` for Llama-3.2-1B shapes (32 query heads, 8 KV heads, head_dim 64,
block 16) at batch B and context L for each split count (the merge kernel included when splits > 1),
16 calls per CUDA graph, and prints microseconds per call.

    python tools/attention_probe.py
"""
from __future__ import annotations

import torch

from nanovllm.bench.graph_timing import graph_time_us
from nanovllm.ops.attention import AttentionMetadata
from nanovllm.ops.attention_triton import paged_attention_triton


def main() -> None:
    torch.manual_seed(0)
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
            metadata = AttentionMetadata(
                query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device="cuda"),
                seq_lens=torch.full((batch,), context, dtype=torch.int32, device="cuda"),
                slot_mapping=torch.zeros(batch, dtype=torch.int64, device="cuda"),
                block_tables=tables, max_query_len=1, max_seq_len=width * block)
            cells = []
            for splits in splits_list:
                us = graph_time_us(lambda: paged_attention_triton(q, k_cache, v_cache, metadata, 0.125,
                                                                  num_kv_splits=splits), calls=16)
                cells.append(f"{us:.2f}")
            print(f"| {batch} | {context} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
