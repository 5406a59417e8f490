"""What one step tells every attention layer: where each sequence's tokens and context are.

The model runner builds one `AttentionMetadata` per step (row offsets, context
lengths, cache slots, block tables); the torch attention in attention.py and
the Triton kernels in attention_triton.py both read it. A decode step's
`DecodeContext` is derived from it once and shared by every layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    """Built once per step by the model runner, passed to every attention layer."""
    query_start_loc: torch.Tensor   # [B + 1] int32: row offsets of each sequence's new tokens
    seq_lens: torch.Tensor          # [B] int32: context length incl. the new tokens
    slot_mapping: torch.Tensor      # [T] int64: cache slot of each new token (-1 = padding, skipped)
    block_tables: torch.Tensor      # [B, max_blocks] int32: block ids, padded with -1
    max_query_len: int              # the longest chunk of new tokens in the batch
    max_seq_len: int                # the longest context in the batch
    # Derived from the block tables by the first layer whose attention needs it (CPU decodes).
    decode_context: DecodeContext | None = field(default=None, repr=False, compare=False)


@dataclass(slots=True)
class DecodeContext:
    """What a decode step's attention reads, the same in every layer."""
    block_ids: torch.Tensor         # [B * num_blocks] int64: each sequence's context blocks in order (padding: 0)
    mask: torch.Tensor | None       # [B, 1, 1, max_seq_len] bool, True where a key is inside the sequence;
                                    # None when every sequence is max_seq_len long (known on the CPU only)
    first_block: int | None         # one sequence whose blocks are consecutive ids (the usual case when it
                                    # runs alone): its first block, the context is then read in place
    derived_from: tuple             # (block_tables, seq_lens, max_seq_len, block_size) it was derived from

    @classmethod
    def of(cls, metadata: AttentionMetadata, block_size: int) -> "DecodeContext":
        """metadata's decode context. On the CPU the step's first layer derives it and the others reuse
        it (a metadata's tensors are not edited once a step has begun); elsewhere it is derived without
        reading a value back to the host, so that a CUDA graph can capture it."""
        inputs = (metadata.block_tables, metadata.seq_lens, metadata.max_seq_len, block_size)
        context = metadata.decode_context
        if context is not None and _same_objects_and_values(context.derived_from, inputs):
            return context
        num_blocks = -(-metadata.max_seq_len // block_size)
        block_ids = metadata.block_tables[:, :num_blocks].clamp(min=0).flatten().long()
        seq_lens = metadata.seq_lens
        on_cpu = seq_lens.device.type == "cpu"
        mask, first_block = None, None
        if not on_cpu or int(seq_lens.min()) < metadata.max_seq_len:
            keys = torch.arange(metadata.max_seq_len, device=seq_lens.device)
            mask = (keys[None, :] < seq_lens[:, None])[:, None, None, :]
        if on_cpu and len(seq_lens) == 1 and bool((block_ids.diff() == 1).all()):
            first_block = int(block_ids[0])
        context = cls(block_ids, mask, first_block, inputs)
        if on_cpu:
            metadata.decode_context = context
        return context


def _same_objects_and_values(derived_from: tuple, inputs: tuple) -> bool:
    """Tensors compared by identity (the same per-step tensors), numbers by value."""
    return all(a is b or (isinstance(a, int) and a == b) for a, b in zip(derived_from, inputs))
