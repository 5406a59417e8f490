"""Attention weights for display, recomputed beside the real forward pass.

The engine never materializes the attention weights: its kernels go from q, K
and V straight to the output. To show what a head looks at, we put a forward
hook on the attention module of the layers we watch (only while the
visualizer is on). For the rows of one watched sequence the hook recomputes
the queries from the layer's input, as the layer does (qkv projection, q norm
for Qwen3, RoPE), reads the keys from the paged KV cache through the
sequence's block table (the layer has just stored this step's keys there),
and keeps

    weights[h, i, j] = softmax_j(q[i, h] . k[j, h // group] * scale)    for keys j <= position of query i

for the last `window` query positions. Nothing of this feeds back into the
model; on CUDA the run is kept eager so the hook sees every step.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from nanovllm.engine.sequence import Sequence
from nanovllm.ops.attention import AttentionMetadata, dequantize_kv
from nanovllm.ops.rotary import apply_rotary

DEFAULT_WINDOW = 10


@dataclass
class AttentionView:
    """One layer's attention for the last few queries of one sequence."""
    layer: int
    request_id: str
    query_positions: list[int]        # ascending, contiguous
    rows: list[torch.Tensor]          # per query: [num_heads, position + 1] float32 weights over keys 0..position
    tokens: list[str]                 # text of the sequence's tokens, positions 0 .. the last query

    @property
    def num_heads(self) -> int:
        return self.rows[0].shape[0]

    def matrix(self, num_keys: int | None = None) -> tuple[list[int], torch.Tensor]:
        """-> (key positions, weights [num_heads, Q, 1 + K]).

        The keys are the last `num_keys` positions up to the last query (default: the
        query positions themselves, a square with the causal triangle). Column 0 sums
        the weight on every earlier key; keys after a query (masked) are NaN.
        """
        last = self.query_positions[-1]
        num_keys = len(self.query_positions) if num_keys is None else min(num_keys, last + 1)
        first_key = last + 1 - num_keys
        key_positions = list(range(first_key, last + 1))
        out = torch.full((self.num_heads, len(self.rows), 1 + num_keys), float("nan"))
        for i, (position, row) in enumerate(zip(self.query_positions, self.rows)):
            out[:, i, 0] = row[:, :first_key].sum(dim=-1)
            out[:, i, 1:position - first_key + 2] = row[:, first_key:position + 1]
        return key_positions, out


class AttentionCapture:
    """Hooks `layers` of `model`; `watch(seq)` picks the sequence whose attention is kept.

    token_text: the text of one token id (to label the rows).
    """

    def __init__(self, model: nn.Module, layers: list[int], token_text: Callable[[int], str],
                 window: int = DEFAULT_WINDOW):
        self.model = model
        self.layers = layers
        self.token_text = functools.cache(token_text)
        self.window = window
        self.seq: Sequence | None = None
        self.rows: dict[int, dict[int, torch.Tensor]] = {layer: {} for layer in layers}   # layer -> position -> row
        self.overhead_s = 0.0          # seconds spent in the hooks
        self._previous: dict[int, AttentionView | None] = {}   # the last views of the sequence watched before
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._row_of_step: tuple[AttentionMetadata | None, int | None] = (None, None)

    def attach(self) -> None:
        for layer in self.layers:
            attention = self.model.layers[layer].self_attn
            self._handles.append(attention.register_forward_hook(functools.partial(self._hook, layer)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def watch(self, seq: Sequence) -> None:
        """Keep `seq`'s attention from now on; until its first rows come, `view` shows the previous one's."""
        self._previous = {layer: self.view(layer) for layer in self.layers}
        self.seq = seq
        for rows in self.rows.values():
            rows.clear()

    def view(self, layer: int) -> AttentionView | None:
        rows = self.rows.get(layer)
        if not rows or self.seq is None:
            return self._previous.get(layer)
        positions = sorted(rows)
        tokens = [self.token_text(token_id) for token_id in self.seq.token_ids[:positions[-1] + 1]]
        return AttentionView(layer=layer, request_id=self.seq.request_id, query_positions=positions,
                             rows=[rows[p] for p in positions], tokens=tokens)

    # ---- the hook ------------------------------------------------------------------------

    def _hook(self, layer: int, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        start_time = time.perf_counter()
        positions, x, metadata, kv_cache = args
        b = self._row_of(metadata)
        if b is not None:
            self._record(layer, module, positions, x, metadata, kv_cache[0], b)
        self.overhead_s += time.perf_counter() - start_time

    def _row_of(self, metadata: AttentionMetadata) -> int | None:
        """The batch row of the watched sequence in this step (the same for every layer), or None."""
        cached_metadata, cached_row = self._row_of_step
        if cached_metadata is metadata:
            return cached_row
        row = None
        seq = self.seq
        if seq is not None and not seq.is_finished and seq.block_table:
            # A live sequence's block table is its own: at least its last block is private.
            width = metadata.block_tables.shape[1]
            target = seq.block_table + [-1] * (width - len(seq.block_table))
            for b, table in enumerate(metadata.block_tables.tolist()):
                if table == target:
                    row = b
                    break
        self._row_of_step = (metadata, row)
        return row

    def _record(self, layer: int, module: nn.Module, positions: torch.Tensor, x: torch.Tensor,
                metadata: AttentionMetadata, k_cache: torch.Tensor, b: int) -> None:
        start, end = metadata.query_start_loc[b:b + 2].tolist()
        seq_len = int(metadata.seq_lens[b])
        n = min(self.window, end - start)
        query_positions = positions[end - n:end]                                   # [n]
        qkv = module.qkv_proj(x[end - n:end])                                      # [n, (Hq + 2 Hkv) D]
        q, k, _ = qkv.split([module.q_size, module.kv_size, module.kv_size], dim=-1)
        q = q.reshape(n, module.num_heads, module.head_dim).contiguous()          # [n, Hq, D]
        k = k.reshape(n, module.num_kv_heads, module.head_dim).contiguous()       # [n, Hkv, D]
        if module.qk_norm:
            q, k = module.q_norm(q), module.k_norm(k)
        q, _ = apply_rotary(q, k, query_positions, module.cos_sin_cache)

        block_size = k_cache.shape[1]
        num_blocks = -(-seq_len // block_size)
        block_ids = metadata.block_tables[b, :num_blocks].long()
        keys = k_cache.index_select(0, block_ids).flatten(0, 1)[:seq_len]        # [L, Hkv, D] as stored
        keys = dequantize_kv(keys, module.k_scale, torch.float32)                 # an FP8 cache: x its scale
        keys = keys.repeat_interleave(module.num_heads // module.num_kv_heads, dim=1)   # [L, Hq, D]
        scores = torch.einsum("qhd,lhd->hql", q.float(), keys) * module.scale     # [Hq, n, L]
        future = torch.arange(seq_len, device=scores.device)[None, :] > query_positions[:, None]   # [n, L]
        weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1).cpu()   # [Hq, n, L]

        rows = self.rows[layer]
        for i, position in enumerate(query_positions.tolist()):
            rows[position] = weights[:, i, :position + 1].clone()                # [Hq, position + 1]
        for position in sorted(rows)[:-self.window]:
            del rows[position]
