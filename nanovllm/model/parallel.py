"""Tensor parallelism: one layer's matmuls split over N processes (ranks), joined by collectives.

A transformer layer has two matmul pairs, and each pair splits with one
communication step (Megatron-LM's scheme, vLLM's names):

    attention:  qkv_proj  column-parallel: rank r holds the rows of its own heads
                          (q heads r*Hq/N.., k and v heads r*Hkv/N..), so attention
                          runs on its heads with no communication at all
                o_proj    row-parallel: rank r holds the input columns of its heads;
                          each rank's output [T, H] is a partial sum
                all_reduce(sum) -> the full output on every rank
    MLP:        gate_up   column-parallel (rows of I/N intermediate features)
                down      row-parallel (the matching I/N input columns)
                all_reduce(sum)

The KV cache follows the heads: rank r stores only its Hkv/N KV heads. The
vocabulary is split by rows too: `VocabParallelEmbedding` looks up the ids that
fall in this rank's rows (zeros elsewhere) and all-reduces; the LM head computes
logits of this rank's rows and all-gathers them. Every projection stays a plain
nn.Linear of its shard's shape; the collectives live in the model's forward.

`ParallelState` is this process's place in the group; with world_size 1 every
collective below is a no-op, so the single-process model is the same code.

With `all_reduce="peer"` (CUDA GPUs of one host) the all-reduces that fit go through one Triton kernel
that reads the other GPUs' memory (ops/all_reduce_triton.py) instead of NCCL. That kernel needs
consecutive all-reduces to use different buffers, so each call site names its own slot below.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nanovllm.model.config import ModelConfig

if TYPE_CHECKING:   # the kernel's module imports Triton, which the CPU never loads
    from nanovllm.ops.all_reduce_triton import PeerAllReduce

# The slot of the peer all-reduce's buffer each all-reduce of a forward uses. A forward runs the
# embedding's, then every layer's attention and MLP in turn: no slot comes twice in a row.
EMBEDDING_SLOT, ATTENTION_SLOT, MLP_SLOT = 0, 1, 2


@dataclass
class ParallelState:
    rank: int = 0
    world_size: int = 1
    group: dist.ProcessGroup | None = None   # set when the ranks have joined (see runner/tp_worker.py)
    peer: PeerAllReduce | None = None         # all_reduce="peer": set once every rank has mapped the others'

    def all_reduce(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        """Sum x over the ranks, in place; x itself when world_size is 1. `slot`: the call site's
        (EMBEDDING_SLOT, ATTENTION_SLOT, MLP_SLOT), for the peer all-reduce."""
        if self.world_size == 1:
            return x
        if self.peer is not None and self.peer.takes(x):
            return self.peer.all_reduce(x, slot)
        dist.all_reduce(x, group=self._joined_group())
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on each rank -> [..., world_size * n], rank 0's columns first."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self._joined_group())
        return torch.cat(parts, dim=-1)

    def _joined_group(self) -> dist.ProcessGroup:
        if self.group is None:
            raise RuntimeError(f"rank {self.rank} of {self.world_size} has not joined its process group; "
                               "run the model through the engine (ModelRunner starts the group)")
        return self.group

    def vocab_range(self, vocab_size: int) -> tuple[int, int]:
        """The vocabulary rows [start, end) this rank holds. Each rank holds ceil(V / N) rows;
        the last rank's range may be shorter, its remaining rows are zero padding."""
        rows = -(-vocab_size // self.world_size)
        start = min(self.rank * rows, vocab_size)
        return start, min(start + rows, vocab_size)

    def shard(self, size: int) -> tuple[int, int]:
        """The slice [start, end) of `size` (heads, features) this rank holds; size divides evenly."""
        per_rank = size // self.world_size
        return self.rank * per_rank, (self.rank + 1) * per_rank


def check_tensor_parallel(config: ModelConfig, tp_size: int) -> None:
    """ValueError unless heads and MLP features split evenly over tp_size ranks."""
    if config.num_key_value_heads % tp_size:
        raise ValueError(f"tensor_parallel_size={tp_size} does not divide the model's {config.num_key_value_heads} "
                         f"KV heads; each rank must hold whole KV heads, so pick a tensor_parallel_size that "
                         f"divides {config.num_key_value_heads}")
    if config.num_attention_heads % tp_size or config.intermediate_size % tp_size:
        raise ValueError(f"tensor_parallel_size={tp_size} does not divide the model's {config.num_attention_heads} "
                         f"attention heads and {config.intermediate_size} MLP features; pick one that divides both")


class VocabParallelEmbedding(nn.Embedding):
    """Rows vocab_start..vocab_end of the embedding table (+ zero padding up to ceil(V / N) rows).

    An id outside this rank's rows looks up zeros; the sum over the ranks
    (one all-reduce) gives every id its row.
    """

    def __init__(self, vocab_size: int, hidden_size: int, parallel: ParallelState):
        self.vocab_start, self.vocab_end = parallel.vocab_range(vocab_size)
        super().__init__(-(-vocab_size // parallel.world_size), hidden_size)
        self.parallel = parallel

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] -> [T, H]."""
        if self.parallel.world_size == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)          # [T]
        local_ids = (input_ids - self.vocab_start).masked_fill(outside, 0)                # [T]
        x = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0)     # [T, H]
        return self.parallel.all_reduce(x, EMBEDDING_SLOT)
