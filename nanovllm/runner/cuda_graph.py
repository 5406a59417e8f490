"""CUDA graphs for decode steps.

A decode step of a 1B model launches several hundred small kernels; from Python
each launch costs a few microseconds, which adds up to more than the GPU needs
to read the weights. A CUDA graph records the whole forward pass once and
replays it with a single launch. A graph is frozen: the same kernels, the same
grid sizes, the same memory addresses every time. So:

- inputs live in static buffers that each step overwrites (input ids,
  positions, slot mapping, context lengths, block tables);
- one graph per batch size in `capture_sizes` (1, 2, 4, 8, 16, 24, ...); a
  batch of 13 runs in the graph of 16, the 3 padding rows having context length
  0 and slot -1, so they read nothing and write nothing;
- the block table is always `ceil(max_model_len / block_size)` wide, so no
  sequence can outgrow the table a graph was captured with;
- the attention kernel sizes its grid from tensor shapes only (never from the
  longest context of the step), see ops/attention_triton.py.

Host-side preparation writes into pinned (page-locked) buffers that are copied
asynchronously: no allocation per step. With async scheduling the previous
step may still be running when the next one is prepared: an event marks when
the last copy out of the pinned buffers is done, and the host waits for it
(not for the step) before writing them again. A row whose token is still a
placeholder (sequence.py) takes it from the previous step's sampled tensor on
the device, before the replay.
"""
from __future__ import annotations

import numpy as np
import torch

from nanovllm.engine.scheduler import Batch
from nanovllm.ops.attention import AttentionMetadata


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to max_num_seqs (always included)."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs + 1, 8))
    if not sizes or sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 max_num_seqs: int, max_model_len: int, block_size: int, device: torch.device):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.sizes = capture_sizes(max_num_seqs)
        self.max_batch = self.sizes[-1]
        width = -(-max_model_len // block_size)
        rows, i64, i32 = self.max_batch, torch.int64, torch.int32
        # Device buffers the graphs read. token_rows = [input_ids; positions; slot_mapping].
        self.token_rows = torch.zeros(3, rows, dtype=i64, device=device)        # [3, max_batch]
        self.token_rows[2].fill_(-1)
        self.seq_lens = torch.zeros(rows, dtype=i32, device=device)             # [max_batch]
        self.block_tables = torch.full((rows, width), -1, dtype=i32, device=device)   # [max_batch, width]
        self.query_start_loc = torch.arange(rows + 1, dtype=i32, device=device)  # one new token per row
        self.pending_rows = torch.full((rows,), -1, dtype=i64, device=device)
        self.host = HostInputs(rows, width, block_size, pin_memory=True)   # what the next copy brings
        self.inputs_copied: torch.cuda.Event | None = None                  # the host buffers' last copy
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}   # hidden states [size, H] each graph writes
        self._capture()

    def _metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[:size + 1],
            seq_lens=self.seq_lens[:size],
            slot_mapping=self.token_rows[2, :size],
            block_tables=self.block_tables[:size],
            max_query_len=1,
            max_seq_len=self.block_tables.shape[1] * self.block_size,
        )

    def _forward(self, size: int) -> torch.Tensor:
        return self.model(self.token_rows[0, :size], self.token_rows[1, :size], self._metadata(size),
                          self.kv_caches)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for size in reversed(self.sizes):   # largest first, so smaller graphs reuse its memory
            self._forward(size)              # warm-up: compiles the Triton kernels outside the graph
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self._forward(size)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def release(self) -> None:
        """Destroy the graphs; later steps run eagerly. Tensor parallelism needs this before its
        process group goes: a graph that captured NCCL collectives holds their communicator, and
        NCCL's teardown of that communicator waits until every such graph is gone."""
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self.outputs.clear()
        self.max_batch = 0

    def can_run(self, batch: Batch) -> bool:
        """Only pure decode batches that fit the largest graph."""
        return batch.num_prefill_tokens == 0 and 0 < len(batch.scheduled) <= self.max_batch

    def can_replay(self, metadata: AttentionMetadata) -> bool:
        """One new token per sequence, as many sequences as the largest graph holds at most."""
        return metadata.max_query_len == 1 and metadata.seq_lens.shape[0] <= self.max_batch

    def replay(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """`run` for a step given as device tensors (what tensor-parallel ranks receive) -> hidden [B, H]."""
        num_seqs = metadata.seq_lens.shape[0]
        size = next(s for s in self.sizes if s >= num_seqs)
        self.token_rows[0, :num_seqs].copy_(input_ids)
        self.token_rows[1, :num_seqs].copy_(positions)
        self.token_rows[2, :num_seqs].copy_(metadata.slot_mapping)
        self.token_rows[:2, num_seqs:size] = 0       # padding rows: context 0 and slot -1
        self.token_rows[2, num_seqs:size] = -1
        self.seq_lens[:num_seqs].copy_(metadata.seq_lens)
        self.seq_lens[num_seqs:size] = 0
        self.block_tables[:num_seqs, :metadata.block_tables.shape[1]].copy_(metadata.block_tables)
        self.graphs[size].replay()
        return self.outputs[size][:num_seqs]

    def run(self, batch: Batch, previous_tokens: torch.Tensor | None) -> torch.Tensor:
        """Replay the graph of the smallest captured size >= the batch -> hidden states [B, H].
        previous_tokens: the last step's sampled tokens on the device, for rows still pending."""
        num_seqs = len(batch.scheduled)
        size = next(s for s in self.sizes if s >= num_seqs)
        if self.inputs_copied is not None:
            self.inputs_copied.synchronize()   # the last step's copies out of the pinned buffers are done
        host = self.host
        pending = host.fill(batch, size)
        self.token_rows[:, :size].copy_(host.token_rows[:, :size], non_blocking=True)
        self.seq_lens[:size].copy_(host.seq_lens[:size], non_blocking=True)
        self.block_tables[:num_seqs].copy_(host.block_tables[:num_seqs], non_blocking=True)
        input_ids = self.token_rows[0, :num_seqs]
        if pending == "all in order":   # the steady state: row i samples what row i sampled last step
            input_ids.copy_(previous_tokens[:num_seqs])
        elif pending == "some":
            rows = self.pending_rows[:num_seqs]
            rows.copy_(host.pending_rows[:num_seqs], non_blocking=True)
            input_ids.copy_(torch.where(rows >= 0, previous_tokens[rows.clamp(min=0)], input_ids))
        self.inputs_copied = torch.cuda.Event()
        self.inputs_copied.record()
        self.graphs[size].replay()
        return self.outputs[size][:num_seqs]


class HostInputs:
    """The host side of a decode graph's inputs: tensors (pinned on CUDA, so that their copies are
    asynchronous) written through numpy views, one row per sequence."""

    def __init__(self, rows: int, width: int, block_size: int, pin_memory: bool):
        def buffer(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.pin_memory() if pin_memory else tensor

        self.block_size = block_size
        self.token_rows = buffer(torch.zeros(3, rows, dtype=torch.int64))          # input ids; positions; slots
        self.seq_lens = buffer(torch.zeros(rows, dtype=torch.int32))
        self.block_tables = buffer(torch.full((rows, width), -1, dtype=torch.int32))
        self.pending_rows = buffer(torch.full((rows,), -1, dtype=torch.int64))    # previous-sample row, or -1
        self.np_token_rows, self.np_seq_lens, self.np_block_tables, self.np_pending_rows = (
            t.numpy() for t in (self.token_rows, self.seq_lens, self.block_tables, self.pending_rows))
        self.row_numbers = np.arange(rows)
        # The block table each row holds, and its length then: a table only grows while it lives
        # (block_manager.py), so the same list at the same length needs no rewrite.
        self.row_tables: list[list[int] | None] = [None] * rows
        self.row_table_lens = [0] * rows

    def fill(self, batch: Batch, size: int) -> str:
        """Write a decode batch in (padding rows up to `size`); -> which rows' tokens are pending:
        "none", "all in order" (row i's is row i of the previous samples) or "some"."""
        num_seqs = len(batch.scheduled)
        block_size, tables, row_tables, row_table_lens = (self.block_size, self.np_block_tables, self.row_tables,
                                                          self.row_table_lens)
        ids, positions, slots, pending = [], [], [], []
        for i, (seq, _) in enumerate(batch.scheduled):
            position = seq.num_computed_tokens
            table = seq.block_table
            ids.append(seq.token_ids[position])
            positions.append(position)
            slots.append(table[position // block_size] * block_size + position % block_size)
            pending.append(seq.pending_row if seq.num_pending else -1)
            if row_tables[i] is not table or row_table_lens[i] != len(table):
                tables[i, :len(table)] = table
                row_tables[i], row_table_lens[i] = table, len(table)
        token_rows, seq_lens, pending_rows = self.np_token_rows, self.np_seq_lens, self.np_pending_rows
        token_rows[0, :num_seqs] = ids
        token_rows[1, :num_seqs] = positions
        token_rows[2, :num_seqs] = slots
        seq_lens[:num_seqs] = positions
        seq_lens[:num_seqs] += 1
        pending_rows[:num_seqs] = pending
        # Padding rows: context 0 and slot -1, so they neither read nor write the cache.
        token_rows[:, num_seqs:size] = 0
        token_rows[2, num_seqs:size] = -1
        seq_lens[num_seqs:size] = 0
        if max(pending) < 0:
            return "none"
        return "all in order" if np.array_equal(pending_rows[:num_seqs], self.row_numbers[:num_seqs]) else "some"
