"""CUDA graphs for decode steps, and for steps with prefill chunks (`MixedGraphs`, at the end).

A decode step of a 1B model launches several hundred small kernels; from Python
each launch costs a few microseconds, which adds up to more than the GPU needs
to read the weights. A CUDA graph records the whole forward pass once and
replays it with a single launch. On one GPU it records the LM head and the fused
sampling pass too (greedy and plain temperature rows; ops/sampling.py), so that
a decode step is one copy in, one replay and one copy out. A step with grammar
rows (structured outputs) that is otherwise plain runs the same pass again once
their masks are applied to the graph's logits, with the temperatures and keys the
graph read (`plain_sampling`: no sampling settings built on the host); a step
whose rows need more (penalties, top-k/top-p/min-p, top log-probabilities,
min_tokens not yet reached) samples again from the graph's logits with the full
sampler. A graph is
frozen: the same kernels, the same grid sizes, the same memory addresses every
time. So:

- inputs live in static buffers that each step overwrites (input ids,
  positions, slot mapping, context lengths, block tables, each row's
  temperature and random-stream key);
- one graph per batch size in `capture_sizes` (1, 2, 4, 8, 16, 24, ...); a
  batch of 13 runs in the graph of 16, the 3 padding rows having context length
  0 and slot -1, so they read nothing and write nothing;
- the block table is always `ceil(max_model_len / block_size)` wide, so no
  sequence can outgrow the table a graph was captured with;
- the attention kernel sizes its grid from tensor shapes only (never from the
  longest context of the step), see ops/attention_triton.py.

Host-side preparation writes into pinned (page-locked) buffers that are copied
asynchronously: no allocation per step, and one copy per step (StepRows packs the
per-row inputs into one tensor; the block tables follow only when one grew,
every block_size tokens). With async scheduling the previous step may still be
running when the next one is prepared: an event marks when the last copy out of
the pinned buffers is done, and the host waits for it (not for the step) before
writing them again.

A row whose token is still a placeholder (sequence.py) needs the previous step's
sample, which is on the device. The graphs read their input ids from the buffer
every step samples into (the runner's SampleBuffers), so in the steady state,
where row i's next input is what row i sampled, it is already in place; only when
the batch changed are pending tokens moved to their new rows before the replay.
Every copy or small kernel between two graph replays costs the GPU 1-3 us of
gap at batch 1 (tools/step_timeline_probe.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from nanovllm.ops.attention import AttentionMetadata
from nanovllm.ops.sampling import sample_from_logits
from nanovllm.runner.sampler import SampleBuffers, SamplingBatch, stream_keys

if TYPE_CHECKING:   # the engine's batch, read here by its fields
    from nanovllm.engine.scheduler import Batch


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to max_num_seqs (always included)."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs + 1, 8))
    if not sizes or sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


def capture_graphs(sizes: list[int], forward, pool=None) -> tuple[dict, dict, object]:
    """One CUDA graph of `forward(size)` per size, largest first so that the smaller ones reuse its
    memory, each after a warm-up run that compiles the Triton kernels outside the graph
    -> (graph per size, what each graph writes, the memory pool, to share with other graphs)."""
    graphs: dict[int, torch.cuda.CUDAGraph] = {}
    outputs: dict[int, torch.Tensor] = {}
    for size in reversed(sizes):
        forward(size)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs[size] = forward(size)
        pool = graph.pool()
        graphs[size] = graph
    torch.cuda.synchronize()
    return graphs, outputs, pool


class StepRows:
    """A decode step's per-sequence inputs for up to `rows` rows in one flat int64 tensor, so that one
    copy moves them all: input ids, positions, slot mapping, pending rows and sampling keys (each int64
    [rows]), then the context lengths (int32 [rows]) and temperatures (float32 [rows]), two to an
    entry. The same layout on the host (pinned) and on the device."""

    def __init__(self, rows: int, device: torch.device | str, pin_memory: bool = False):
        self.flat = torch.zeros(6 * rows, dtype=torch.int64, device=device)
        if pin_memory:
            self.flat = self.flat.pin_memory()
        self.int64_rows = self.flat[:5 * rows].view(5, rows)          # [5, rows]: the five below
        self.input_ids, self.positions, self.slot_mapping, self.pending_rows, self.keys = self.int64_rows
        tail = self.flat[5 * rows:].view(torch.int32)                 # [2 * rows]
        self.seq_lens = tail[:rows]
        self.temperature = tail[rows:].view(torch.float32)
        self.slot_mapping.fill_(-1)
        self.pending_rows.fill_(-1)


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 max_num_seqs: int, max_model_len: int, block_size: int, device: torch.device,
                 samples: SampleBuffers | None = None):
        """samples: where every step's sampler writes (the runner's SampleBuffers). Given, each graph
        goes on past the forward: LM head and the fused sampling pass into `samples`, and reads its
        input ids from there. None (tensor parallelism): the graphs end at the hidden states."""
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.sizes = capture_sizes(max_num_seqs)
        self.max_batch = rows = self.sizes[-1]
        width = -(-max_model_len // block_size)
        self.samples = samples
        # Device buffers the graphs read. The input ids are the last step's samples, in place: in the
        # steady state row i's next input is what row i sampled, and nothing needs copying.
        self.rows = StepRows(rows, device)                                        # positions, slots, lengths
        self.input_ids = self.rows.input_ids if samples is None else samples.token_ids[:rows]
        self.block_tables = torch.full((rows, width), -1, dtype=torch.int32, device=device)   # [max_batch, width]
        self.query_start_loc = torch.arange(rows + 1, dtype=torch.int32, device=device)  # one new token per row
        self.host = HostInputs(rows, width, block_size, pin_memory=True)   # what the next copy brings
        self.inputs_copied: torch.cuda.Event | None = None                  # the host buffers' last copy
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}   # what each graph writes: logits [size, V] or hidden [size, H]
        self._capture()

    def _metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[:size + 1],
            seq_lens=self.rows.seq_lens[:size],
            slot_mapping=self.rows.slot_mapping[:size],
            block_tables=self.block_tables[:size],
            max_query_len=1,
            max_seq_len=self.block_tables.shape[1] * self.block_size,
        )

    def _forward(self, size: int) -> torch.Tensor:
        """The captured work: the forward (hidden [size, H]); with samples, then the LM head and the
        fused sampling pass (greedy rows at temperature 0) -> logits [size, V]."""
        hidden = self.model(self.input_ids[:size], self.rows.positions[:size], self._metadata(size), self.kv_caches)
        if self.samples is None:
            return hidden
        logits = self.model.compute_logits(hidden)
        sample_from_logits(logits, self.rows.keys[:size], self.rows.temperature[:size],
                           out=(self.samples.token_ids[:size], self.samples.logprobs[:size]),
                           batch_invariant=self.model.batch_invariant)
        return logits

    @torch.inference_mode()
    def _capture(self) -> None:
        # self.pool: the memory pool of the graphs (MixedGraphs shares it)
        self.graphs, self.outputs, self.pool = capture_graphs(self.sizes, self._forward)

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
        rows = self.rows
        self.input_ids[:num_seqs].copy_(input_ids)
        rows.positions[:num_seqs].copy_(positions)
        rows.slot_mapping[:num_seqs].copy_(metadata.slot_mapping)
        rows.seq_lens[:num_seqs].copy_(metadata.seq_lens)
        self.input_ids[num_seqs:size] = 0          # padding rows: context 0 and slot -1
        rows.positions[num_seqs:size] = 0
        rows.slot_mapping[num_seqs:size] = -1
        rows.seq_lens[num_seqs:size] = 0
        self.block_tables[:num_seqs, :metadata.block_tables.shape[1]].copy_(metadata.block_tables)
        self.host.forget_tables()                  # the device tables no longer hold what the host wrote
        self.graphs[size].replay()
        return self.outputs[size][:num_seqs]

    def prepare(self, batch: Batch) -> DecodeStep:
        """Write the batch's inputs into the host buffers (nothing reaches the device yet) -> the step,
        for `run`."""
        num_seqs = len(batch.scheduled)
        size = next(s for s in self.sizes if s >= num_seqs)
        if self.inputs_copied is not None:
            self.inputs_copied.synchronize()   # the last step's copies out of the pinned buffers are done
        pending, tables_changed, sampling = self.host.fill(batch, size, sampling=True)
        return DecodeStep(num_seqs, size, pending, tables_changed, sampling)

    def run(self, step: DecodeStep) -> torch.Tensor:
        """Copy a prepared step's inputs and replay the graph of the smallest captured size >= its batch
        -> logits [B, V]. Rows whose token is still pending read it where the last step sampled it."""
        num_seqs, size, host = step.num_seqs, step.size, self.host
        self.rows.flat.copy_(host.rows.flat, non_blocking=True)          # one copy: ids, positions, slots, ...
        if step.tables_changed:   # a table grows by a block every block_size tokens: most steps copy none
            self.block_tables[:num_seqs].copy_(host.block_tables[:num_seqs], non_blocking=True)
        self.inputs_copied = torch.cuda.Event()
        self.inputs_copied.record()
        if step.pending == "none":                  # every token known on the host
            self.input_ids[:size].copy_(self.rows.input_ids[:size])
        elif step.pending == "some":                # the batch changed: move pending tokens to their new rows
            rows = self.rows.pending_rows[:size]
            self.input_ids[:size].copy_(torch.where(rows >= 0, self.input_ids[rows.clamp(min=0)],
                                                    self.rows.input_ids[:size]))
        # "all in order" (the steady state): row i's input is what row i sampled, already in place.
        self.graphs[size].replay()
        return self.outputs[size][:num_seqs]

    def plain_sampling(self, num_seqs: int) -> SamplingBatch:
        """The sampling settings of the last replay's rows for the fused pass, as the graph read them:
        its temperatures (0 on greedy rows) and random-stream keys on the device. The next `run`
        rewrites these buffers, so the sampling must be queued before it."""
        temperature = self.host.np_temperature[:num_seqs]
        all_greedy = not temperature.any()
        return SamplingBatch.plain(num_seqs, None if all_greedy else self.rows.temperature[:num_seqs],
                                   None if all_greedy else self.rows.keys[:num_seqs],
                                   all_random=bool(temperature.all()))


@dataclass(slots=True)
class DecodeStep:
    """A decode step whose inputs are in the host buffers (DecodeGraphs.prepare), not yet on the device."""
    num_seqs: int
    size: int               # the captured batch size it replays
    pending: str            # HostInputs.fill's: "none", "all in order" or "some"
    tables_changed: bool
    sampling: str           # how it samples: "graph" (the graph's samples stand: every row plain and past
                            # its min_tokens), "masked" (the same but for grammar rows: `plain_sampling`
                            # samples again once their masks are applied) or "sampler" (the full sampler)


class HostInputs:
    """The host side of a decode graph's inputs: StepRows and block tables (pinned on CUDA, so that
    their copies are asynchronous) written through numpy views, one row per sequence."""

    def __init__(self, rows: int, width: int, block_size: int, pin_memory: bool):
        self.block_size = block_size
        self.rows = StepRows(rows, "cpu", pin_memory)
        self.block_tables = torch.full((rows, width), -1, dtype=torch.int32)
        if pin_memory:
            self.block_tables = self.block_tables.pin_memory()
        self.np_token_rows = self.rows.int64_rows.numpy()   # ids; positions; slots; pending; keys
        self.np_seq_lens = self.rows.seq_lens.numpy()
        self.np_temperature = self.rows.temperature.numpy()
        self.np_block_tables = self.block_tables.numpy()
        self.row_numbers = np.arange(rows)
        # The block table each row holds, and its length then: a table only grows while it lives
        # (block_manager.py), so the same list at the same length needs no rewrite (and no copy).
        self.row_tables: list[list[int] | None] = [None] * rows
        self.row_table_lens = [0] * rows

    def forget_tables(self) -> None:
        """The device's tables were written by another path: rewrite (and copy) every row next time."""
        self.row_tables = [None] * len(self.row_tables)

    def fill(self, batch: Batch, size: int, sampling: bool = False) -> tuple[str, bool, str]:
        """Write a decode batch in (padding rows up to `size`) -> (which rows' tokens are pending: "none",
        "all in order" (row i's is row i of the last samples) or "some"; whether a block table changed;
        how the step samples (DecodeStep.sampling): "graph" when every row is plain (SamplingParams.is_plain)
        and past its min_tokens, "masked" when that holds but for the rows' grammars, else "sampler").
        With `sampling`, each row's temperature (0: greedy) and random-stream key are written in."""
        num_seqs = len(batch.scheduled)
        block_size, tables, row_tables, row_table_lens = (self.block_size, self.np_block_tables, self.row_tables,
                                                          self.row_table_lens)
        ids, positions, slots, pending = [], [], [], []
        temperatures, seeds, output_lens = [], [], []
        tables_changed, plain, masked = False, sampling, False
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
                tables_changed = True
            if sampling:
                params = seq.sampling_params
                output_len = seq.num_output_tokens
                plain = plain and params.is_plain_or_masked and output_len >= params.min_tokens
                masked = masked or seq.grammar is not None
                temperatures.append(0.0 if params.is_greedy else params.temperature)
                seeds.append(seq.seed)
                output_lens.append(output_len)
        if sampling:
            self.np_temperature[:num_seqs] = temperatures
            self.np_temperature[num_seqs:size] = 0.0
            if max(temperatures) > 0.0:   # a random row: this step's keys (greedy rows ignore theirs)
                self.np_token_rows[4, :num_seqs] = stream_keys(seeds, output_lens)
        token_rows, seq_lens = self.np_token_rows, self.np_seq_lens
        token_rows[0, :num_seqs] = ids
        token_rows[1, :num_seqs] = positions
        token_rows[2, :num_seqs] = slots
        token_rows[3, :num_seqs] = pending
        seq_lens[:num_seqs] = positions
        seq_lens[:num_seqs] += 1
        # Padding rows: token 0, context 0 and slot -1, so they neither read nor write the cache.
        token_rows[:, num_seqs:size] = 0
        token_rows[2:4, num_seqs:size] = -1
        seq_lens[num_seqs:size] = 0
        how = "sampler" if not plain else "masked" if masked else "graph"
        if max(pending) < 0:
            return "none", tables_changed, how
        in_order = np.array_equal(token_rows[3, :num_seqs], self.row_numbers[:num_seqs])
        return ("all in order" if in_order else "some"), tables_changed, how


def token_buckets(max_num_batched_tokens: int, smallest: int = 64) -> list[int]:
    """64, 128, 256, ... up to max_num_batched_tokens (always included): the token counts mixed graphs
    are captured for."""
    sizes = []
    size = smallest
    while size < max_num_batched_tokens:
        sizes.append(size)
        size *= 2
    return sizes + [max_num_batched_tokens]


class MixedGraphs:
    """CUDA graphs of the forward for steps that carry prefill chunks (with or without decodes).

    Run eagerly, such a step launches its kernels one by one from Python: about 7.7 ms for one prompt
    joining 40 decodes of Llama-3.2-1B on an H200, against 1.5 ms for the decode step around it
    (tools/mixed_step_probe.py), so every arrival stalls every stream for several steps' worth. The
    forward of a mixed step fits a graph as well as a decode's: the attention kernel sizes its grid
    from shapes (tokens // BLOCK_Q + sequences) and reads everything else on the device. So one graph
    per token bucket (`token_buckets`), each captured with `max_num_seqs` sequences:

    - a step of T tokens and B sequences replays the smallest bucket >= T; its inputs are copied into
      the static buffers, tokens T.. get slot -1 (nothing written to the cache) and sequences B.. an
      empty chunk at the end (query_start_loc = T), context 0 and a table of -1 (nothing read);
    - the graph ends at the hidden states [bucket, H]: rows T.. are garbage and never read; the LM head
      and sampling run after it, on the rows that sample (few kernels);
    - one memory pool with the decode graphs (they never run at once).
    """

    def __init__(self, model: torch.nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int, block_size: int,
                 device: torch.device, pool=None):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.sizes = token_buckets(max_num_batched_tokens)
        tokens, self.max_seqs = self.sizes[-1], max_num_seqs
        width = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(tokens, dtype=torch.int64, device=device)
        self.positions = torch.zeros(tokens, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((tokens,), -1, dtype=torch.int64, device=device)
        self.query_start_loc = torch.zeros(max_num_seqs + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(max_num_seqs, dtype=torch.int32, device=device)
        self.block_tables = torch.full((max_num_seqs, width), -1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}   # hidden [size, H]
        self.pool = pool
        self._capture()

    def _metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(query_start_loc=self.query_start_loc, seq_lens=self.seq_lens,
                                 slot_mapping=self.slot_mapping[:size], block_tables=self.block_tables,
                                 max_query_len=2,   # not 1: the prefill configuration of attention
                                 max_seq_len=self.block_tables.shape[1] * self.block_size)

    def _forward(self, size: int) -> torch.Tensor:
        return self.model(self.input_ids[:size], self.positions[:size], self._metadata(size), self.kv_caches)

    @torch.inference_mode()
    def _capture(self) -> None:
        self.graphs, self.outputs, self.pool = capture_graphs(self.sizes, self._forward, self.pool)

    def release(self) -> None:
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self.outputs.clear()

    def can_replay(self, metadata: AttentionMetadata) -> bool:
        return (bool(self.graphs) and metadata.slot_mapping.shape[0] <= self.sizes[-1]
                and metadata.seq_lens.shape[0] <= self.max_seqs
                and metadata.block_tables.shape[1] <= self.block_tables.shape[1])

    def replay(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """The forward of a step given as device tensors -> hidden [T, H] (a view of the graph's output)."""
        num_tokens, (num_seqs, width) = input_ids.shape[0], metadata.block_tables.shape
        size = next(s for s in self.sizes if s >= num_tokens)
        self.input_ids[:num_tokens].copy_(input_ids)
        self.positions[:num_tokens].copy_(positions)
        self.slot_mapping[:num_tokens].copy_(metadata.slot_mapping)
        self.slot_mapping[num_tokens:size] = -1                       # padding tokens write nothing
        self.query_start_loc[:num_seqs + 1].copy_(metadata.query_start_loc)
        self.query_start_loc[num_seqs + 1:] = num_tokens              # padding sequences: empty chunks
        self.seq_lens[:num_seqs].copy_(metadata.seq_lens)
        self.seq_lens[num_seqs:] = 0
        self.block_tables[:num_seqs, :width].copy_(metadata.block_tables)
        self.block_tables[:num_seqs, width:] = -1
        self.block_tables[num_seqs:] = -1
        self.graphs[size].replay()
        return self.outputs[size][:num_tokens]
