"""ModelRunner: a scheduled batch in, one sampled token per finishing sequence out.

It owns the device side of the engine: the model's weights and the KV cache.
The cache is one tensor

    kv_cache: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]

and layer l reads it as (k_cache, v_cache) = (kv_cache[l, 0], kv_cache[l, 1]),
each [num_blocks, block_size, num_kv_heads, head_dim] (an FP8 cache's V is a
permuted view of its half, stored keys-innermost: `layer_caches` in
ops/attention.py). Its size is the one number that decides how many tokens the
engine can keep in flight: blocks are counted from the bytes a token takes at
the stored size, so an FP8 cache
(`kv_cache_dtype="fp8"`, one byte an element) holds twice the tokens of a
bfloat16 one in the same memory.

Each step `launch(batch)` flattens the scheduled chunks into T token rows:

    input_ids [T], positions [T]          the tokens to compute and where they sit
    AttentionMetadata                     query_start_loc [B+1], seq_lens [B],
                                          slot_mapping [T], block_tables [B, max_blocks]

runs the model, keeps the hidden state of the last row of each sequence whose
chunk reaches its end (a chunk in the middle of a prompt needs no token), and
samples from those rows' logits. The engine calls `launch` and reads
`num_blocks`; device-specific work (pinned buffers, CUDA graphs) stays in here.

`launch` only queues the step on the device and returns its samples still on
their way (DeviceSamples), so that the host can schedule the next step while
the GPU computes this one (async scheduling, engine.py). A token sampled by
the previous step may then still be a placeholder on the host (sequence.py):
its input row is filled on the device from `SampleBuffers`, the one buffer
every step samples into, at the row `seq.pending_row`. Nothing in a launch
waits for the GPU: host values reach it through pinned memory and asynchronous
copies. A step with grammar rows leaves its sampling to the next launch
(DeferredSamples), its masks being filled by the grammar process meanwhile
(structured/grammar_process.py). A pure decode step on one GPU is a CUDA graph that runs the forward,
the LM head and the sampling pass (cuda_graph.py).

Tensor parallel (tensor_parallel_size N > 1): every rank has a ModelRunner
over its shard of the model and its KV heads (Hkv / N of them, the same block
ids on every rank). Rank 0's `launch` sends the step's inputs to the workers as
one message of int64s made from its lists (tp_worker.py), unpacks its own tensors
from the same message and runs the same forward; the workers run it in
`serve_steps` (`serve_rank` below, or `run_worker` under torchrun). The ranks agree on one num_blocks (the smallest). Only rank 0 samples.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from nanovllm.config import EngineConfig
from nanovllm.model.config import ModelConfig
from nanovllm.model.llama import LlamaForCausalLM
from nanovllm.model.loader import load_model
from nanovllm.ops.attention import AttentionMetadata, layer_caches
from nanovllm.ops.huge_pages import advise_huge_pages
from nanovllm.runner.cuda_graph import DecodeGraphs, DecodeStep, MixedGraphs
from nanovllm.runner.sampler import (DeferredSamples, DeviceSamples, SampleBuffers, Sampler, SamplingBatch,
                                     host_to_device)
from nanovllm.runner.tp_worker import (HostStep, Step, WorkerGroup, all_ranks_agree, join_launched_group,
                                      min_over_ranks, receive_step, start_peer_all_reduce, stop_with)
from nanovllm.sampling_params import SamplingParams
from nanovllm.structured.grammar import PENDING, GrammarCompiler, GrammarState
from nanovllm.structured.grammar_process import GrammarBitmask

if TYPE_CHECKING:   # the engine's batch, read here by its fields
    from nanovllm.engine.scheduler import Batch
    from nanovllm.engine.sequence import Sequence

CPU_KV_CACHE_MEMORY = 1 << 30   # the default KV pool on the CPU: 1 GiB
PROMPT_LOGPROBS_ROWS = 256      # prompt rows whose logits are computed at once for prompt_logprobs
# Tensor parallelism captures graphs of steps with prefill chunks too, as one GPU does (their eager
# launches cost a step several decode steps' time). Not yet run on GPUs: False runs them eagerly, as
# before; every rank reads it (a spawned worker imports this module afresh), so change it here.
TENSOR_PARALLEL_MIXED_GRAPHS = True


def kv_cache_bytes_per_block(model_config: ModelConfig, block_size: int, dtype: torch.dtype,
                              tp_size: int = 1) -> int:
    """K and V of `block_size` tokens in every layer, on one of tp_size ranks (each holds Hkv / tp_size heads)."""
    element_size = torch.empty((), dtype=dtype).element_size()
    return (2 * model_config.num_hidden_layers * block_size * (model_config.num_key_value_heads // tp_size)
            * model_config.head_dim * element_size)


class ModelRunner:
    def __init__(self, config: EngineConfig, model: LlamaForCausalLM, model_config: ModelConfig,
                 eos_token_ids: list[int]):
        self.config = config
        self.model = model
        self.model_config = model_config
        self.eos_token_ids = eos_token_ids
        self.device = torch.device(config.device)
        self.block_size = config.block_size
        if config.batch_invariant and self.device.type == "cuda":   # the CPU's invariant formats need nothing
            model.use_batch_invariant_kernels()
        self.sampler = Sampler(batch_invariant=model.batch_invariant)
        self.parallel = model.parallel
        if self.parallel.world_size != config.tensor_parallel_size:
            raise ValueError(f"the model given is shard {self.parallel.rank} of {self.parallel.world_size} but "
                             f"tensor_parallel_size is {config.tensor_parallel_size}; make them agree")
        self.num_kv_heads = model_config.num_key_value_heads // self.parallel.world_size   # this rank's KV heads
        # Every step samples into these device buffers: the last step's tokens are there for rows whose
        # input is still pending (and are the decode graphs' input ids), and one copy brings them home.
        self.samples = SampleBuffers(config.max_num_seqs, self.device)
        self.last_samples: DeviceSamples | None = None   # the last step that sampled: its pending tokens
        self.grammar_masks: GrammarBitmask | None = None  # structured outputs: made by the first constrained step
        self.workers: WorkerGroup | None = None
        if self.parallel.world_size > 1 and self.parallel.rank == 0:
            self.workers = WorkerGroup.start(config, self.parallel, serve_rank)
            stop_with(self, self.workers)
        try:
            self._allocate(config, model, model_config)
        except BaseException:
            if self.workers is not None:   # they wait in a start-up collective: stop them now
                self.workers.error = "rank 0 failed to allocate its KV cache"
                self.workers.shutdown()
            raise

    def _allocate(self, config: EngineConfig, model: LlamaForCausalLM, model_config: ModelConfig) -> None:
        """Size and allocate the KV cache, capture CUDA graphs; collectives on every rank alike."""
        if self.parallel.world_size > 1 and config.all_reduce == "peer":
            self.parallel.peer = start_peer_all_reduce(self.parallel, self.device)
            if self.workers is not None:
                self.workers.peer = self.parallel.peer
        # On a GPU, measure what a full step needs before handing the rest to the KV cache.
        activation_bytes = self._profile_activation_bytes() if self.device.type == "cuda" else 0
        self.num_blocks = self._num_kv_blocks(activation_bytes)
        if self.parallel.world_size > 1:   # the block manager (rank 0) hands out block ids valid on every rank
            self.num_blocks = min_over_ranks(self.num_blocks, self.device)
        self.kv_cache = torch.empty(model_config.num_hidden_layers, 2, self.num_blocks, self.block_size,
                                    self.num_kv_heads, model_config.head_dim,
                                    dtype=config.kv_cache_torch_dtype, device=self.device)
        advise_huge_pages(self.kv_cache)   # CPU: 2 MB pages from its first write on (ops/huge_pages.py)
        self.kv_cache.zero_()
        self.kv_caches = [layer_caches(layer) for layer in self.kv_cache]   # per layer (k_cache, v_cache)
        self.decode_graphs: DecodeGraphs | None = None
        self.mixed_graphs: MixedGraphs | None = None
        if self.device.type == "cuda" and not config.enforce_eager:
            # One GPU: the graphs run the LM head and sampling too. Tensor parallelism: the forward only.
            samples = self.samples if self.parallel.world_size == 1 else None
            self.decode_graphs = DecodeGraphs(model, self.kv_caches, config.max_num_seqs, config.max_model_len,
                                              config.block_size, self.device, samples)
            # Steps with prefill chunks too; with tensor parallelism their all-reduces are captured as the
            # decode graphs' are (every rank captures the same buckets in the same order).
            if self.parallel.world_size == 1 or TENSOR_PARALLEL_MIXED_GRAPHS:
                self.mixed_graphs = MixedGraphs(model, self.kv_caches, config.max_num_seqs,
                                                config.max_num_batched_tokens, config.max_model_len,
                                                config.block_size, self.device, self.decode_graphs.pool)
            if self.workers is not None:
                self.workers.graphs = self.cuda_graphs()

    def cuda_graphs(self) -> list[DecodeGraphs | MixedGraphs]:
        """The graphs this rank captured, which tensor parallelism releases before its group goes."""
        return [graphs for graphs in (self.decode_graphs, self.mixed_graphs) if graphs is not None]

    def _num_kv_blocks(self, activation_bytes: int) -> int:
        config = self.config
        if config.num_kv_blocks is not None:
            return config.num_kv_blocks
        per_block = kv_cache_bytes_per_block(self.model_config, config.block_size, config.kv_cache_torch_dtype,
                                             self.parallel.world_size)
        memory = config.kv_cache_memory
        if memory is None:
            memory = self._default_kv_cache_memory(per_block, activation_bytes)
        num_blocks = memory // per_block
        if num_blocks < 1:
            raise ValueError(f"the KV cache budget ({memory} bytes) holds no block of {per_block} bytes; "
                             "raise kv_cache_memory (or gpu_memory_utilization) or lower block_size")
        return num_blocks

    def _default_kv_cache_memory(self, per_block: int, activation_bytes: int) -> int:
        config = self.config
        if self.device.type == "cuda":
            # The card's allowed share, less what is in use now (weights, CUDA context, other
            # processes) and the peak a full step's activations reached in the profiling run.
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(self.device)
            return int(config.gpu_memory_utilization * total) - (total - free) - activation_bytes
        # No point in more than every running sequence at full length could use.
        blocks_per_seq = -(-config.max_model_len // config.block_size)
        return min(CPU_KV_CACHE_MEMORY, config.max_num_seqs * blocks_per_seq * per_block)

    @torch.inference_mode()
    def _profile_activation_bytes(self) -> int:
        """Run the largest step the scheduler can make (a full token budget of prefill, then
        logits and sampling for max_num_seqs rows) on a throwaway cache; -> peak extra bytes."""
        config, mc = self.config, self.model_config
        num_tokens = config.max_num_batched_tokens
        seq_len = min(num_tokens, config.max_model_len)
        lengths = [seq_len] * (num_tokens // seq_len) + ([num_tokens % seq_len] if num_tokens % seq_len else [])
        blocks_per_seq = -(-seq_len // self.block_size)
        scratch = torch.zeros(mc.num_hidden_layers, 2, blocks_per_seq * len(lengths), self.block_size,
                              self.num_kv_heads, mc.head_dim, dtype=config.kv_cache_torch_dtype, device=self.device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(self.device)
        baseline = torch.cuda.memory_allocated(self.device)
        positions = torch.cat([torch.arange(n) for n in lengths]).to(self.device)                      # [T]
        tables = torch.arange(blocks_per_seq * len(lengths), dtype=torch.int32).view(len(lengths), -1)
        starts = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        rows = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        slots = tables[rows, positions.cpu() // self.block_size].long() * self.block_size + positions.cpu() % self.block_size
        metadata = AttentionMetadata(query_start_loc=starts.to(self.device),
                                     seq_lens=torch.tensor(lengths, dtype=torch.int32, device=self.device),
                                     slot_mapping=slots.to(self.device), block_tables=tables.to(self.device),
                                     max_query_len=max(lengths), max_seq_len=max(lengths))
        input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        kv_caches = [layer_caches(layer) for layer in scratch]
        hidden = self.model(input_ids, positions, metadata, kv_caches)                                # [T, H]
        num_rows = min(config.max_num_seqs, num_tokens)
        logits = self.model.compute_logits(hidden[:num_rows])                                          # [N, V]
        worst = SamplingParams(temperature=1.0, top_p=0.9, logprobs=1)   # the full-sort path of the sampler
        self.sampler(logits, SamplingBatch.build([worst] * num_rows, list(range(num_rows)), [0] * num_rows,
                                                 [[0]] * num_rows, [[]] * num_rows, self.eos_token_ids,
                                                 self.device))
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(self.device) - baseline
        del scratch, kv_caches, hidden, logits, metadata
        return peak

    @torch.inference_mode()
    def launch(self, batch: Batch) -> DeviceSamples | DeferredSamples | None:
        """Queue one step on the device -> its samples, on their way (None: no sequence samples). The
        last step's deferred sampling is queued first (this step may read its tokens); a decode graph's
        host inputs are written before that, while the grammar process may still be on its masks."""
        decode = None
        if self.workers is None and self.decode_graphs is not None and self.decode_graphs.can_run(batch):
            decode = self.decode_graphs.prepare(batch)
        with _one_torch_thread(bool(getattr(self.model, "_fused", None))):
            if isinstance(self.last_samples, DeferredSamples):   # its tokens first: this step may read them
                self.last_samples = self.last_samples.finish()
            samples = self._launch(batch, decode)
        if samples is not None:
            self.last_samples = samples
        return samples

    def _launch(self, batch: Batch, decode: DecodeStep | None) -> DeviceSamples | DeferredSamples | None:
        if self.workers is not None:
            return self._run_parallel(batch)
        if decode is not None:
            logits = self.decode_graphs.run(decode)                              # [B, V], every row samples
            num_rows = logits.shape[0]
            if decode.sampling == "graph":   # the graph's own sampling pass stands: only the copy home is left
                return DeviceSamples.start_copy(self.samples, num_rows, None, [None] * num_rows)
            if decode.sampling == "masked":   # the same pass once the grammar rows are masked, on its settings
                return self._sample(logits, batch, self.decode_graphs.plain_sampling(num_rows))
            return self._sample(logits, batch)
        input_ids, positions, metadata, logits_indices = self.prepare_inputs(batch)
        if self.mixed_graphs is not None and self.mixed_graphs.can_replay(metadata):
            hidden = self.mixed_graphs.replay(input_ids, positions, metadata)    # [T, H]
        else:
            hidden = self.model(input_ids, positions, metadata, self.kv_caches)    # [T, H]
        self._record_prompt_logprobs(batch, hidden)
        if not batch.sampling_seqs:   # only chunks in the middle of prompts: KV written, no token due
            return None
        logits = self.model.compute_logits(hidden[logits_indices])              # [N, V], the model dtype
        return self._sample(logits, batch)

    def _sample(self, logits: torch.Tensor, batch: Batch,
                sampling: SamplingBatch | None = None) -> DeviceSamples | DeferredSamples:
        """Queue the sampling of the step's logits [B, V] (with `sampling`, or the batch's settings built
        now). With grammar rows, once their masks are filled: the grammar process starts on them now
        and the next launch queues the sampling (DeferredSamples). Meanwhile the engine completes the
        last step and schedules the next, so the fill hides behind that host work, as behind this
        step's forward on the device."""
        seqs = batch.sampling_seqs
        if sampling is None:
            sampling = self.prepare_sampling(batch, with_grammar=False)   # a request's bad settings raise now
        rows = [row for row, seq in enumerate(seqs) if seq.grammar is not None]
        if not rows:
            return self.sampler.sample(logits, sampling, self.samples)
        constrained = [seqs[row] for row in rows]
        masks = self.grammar_masks_for(constrained[0].grammar.compiler)
        # The last step's tokens: the engine waits for them next anyway (it completes that step now).
        newest = _newest_token_ids(self.last_samples, constrained)
        started = masks.start([seq.grammar for seq in constrained], [seq.output_token_ids for seq in constrained],
                              newest)

        @torch.inference_mode()   # called by the next launch, or by the engine through result()
        def queue_sampling() -> DeviceSamples:
            sampling.bitmask, sampling.bitmask_rows = masks.finish(started, rows)
            return self.sampler.sample(logits, sampling, self.samples)
        return DeferredSamples(queue_sampling)

    def grammar_masks_for(self, compiler: GrammarCompiler) -> GrammarBitmask:
        """The grammar masks (and their process, started by the first call: the engine calls this when
        its first structured-outputs request arrives, so the process starts before any step needs it)."""
        if self.grammar_masks is None:
            self.grammar_masks = GrammarBitmask(self.config.max_num_seqs, compiler, self.device)
        return self.grammar_masks

    def _record_prompt_logprobs(self, batch: Batch, hidden: torch.Tensor) -> None:
        """Append to `seq.prompt_logprobs` the entries this step's rows give: the row of prompt position p
        holds the logits of token p + 1. Entries already known (a chunk recomputed after preemption) are
        skipped, so each prompt token gets exactly one, whatever the chunking or the cache."""
        rows, targets, owners = self._prompt_logprob_rows(batch)
        for begin in range(0, len(rows), PROMPT_LOGPROBS_ROWS):   # bounded [rows, V] float32 buffers
            index = slice(begin, begin + PROMPT_LOGPROBS_ROWS)
            logits = self.model.compute_logits(hidden[host_to_device(rows[index], torch.int64, self.device)])
            self._append_prompt_logprobs(logits, targets[index], owners[index])

    def _prompt_logprob_rows(self, batch: Batch) -> tuple[list[int], list[int], list[Sequence]]:
        """-> (the rows of the step's hidden states whose logits score a prompt token, that token, the
        sequence its entry goes to), for the sequences that asked for prompt log-probabilities."""
        rows: list[int] = []        # rows of hidden
        if batch.num_prefill_tokens == 0:   # decodes only: no prompt row in the step
            return rows, [], []
        targets: list[int] = []     # the prompt token each row's logits score
        owners: list[Sequence] = []  # the sequence each row's entry goes to
        row_start = 0
        for seq, num_new in batch.scheduled:
            if seq.needs_prompt_logprobs:
                start = seq.num_computed_tokens
                first = max(start, len(seq.prompt_logprobs) - 1)
                for position in range(first, min(start + num_new, seq.num_prompt_tokens - 1)):
                    rows.append(row_start + position - start)
                    targets.append(seq.token_ids[position + 1])
                    owners.append(seq)
            row_start += num_new
        return rows, targets, owners

    def _append_prompt_logprobs(self, logits: torch.Tensor, targets: list[int], owners: list[Sequence]) -> None:
        """owners[i] gets the entry of logits row i [n, V]: its prompt token's log-probability, and the top k."""
        num_top = max(seq.sampling_params.prompt_logprobs for seq in owners)
        logprobs = torch.log_softmax(logits.float(), dim=-1)                           # [n, V]
        target_ids = torch.tensor(targets, device=logits.device)
        chosen = logprobs.gather(1, target_ids[:, None]).squeeze(1).tolist()          # [n]
        top_values, top_ids = logprobs.topk(num_top, dim=-1) if num_top else (logprobs[:, :0],) * 2
        for seq, target, value, values, ids in zip(owners, targets, chosen, top_values.tolist(), top_ids.tolist()):
            k = seq.sampling_params.prompt_logprobs
            entry = dict(zip(ids[:k], values[:k]))
            entry[target] = value
            seq.prompt_logprobs.append(entry)

    def _run_parallel(self, batch: Batch) -> DeviceSamples | None:
        """Rank 0 of N: send the step to the workers, run the same forward, sample. The workers get the step
        from the host's lists before rank 0 makes its own tensors, so that their copies to their GPUs and
        rank 0's overlap, and rank 0 runs the tensors every worker unpacks from the same message. With
        async scheduling nothing here waits for the GPU: the samples' `result` does, watching the workers."""
        workers = self.workers
        workers.check_alive()
        step = self.host_inputs(batch)
        # Prompt rows whose log-probabilities are asked for ride in the same pass (the vocabulary is split
        # over the ranks, so every rank computes their logits): after the rows that sample.
        prompt_rows, targets, owners = self._prompt_logprob_rows(batch)
        num_sampling = len(step.logits_indices)
        if prompt_rows:
            step = step._replace(logits_indices=step.logits_indices + prompt_rows)
        cuda = self.device.type == "cuda"
        try:
            logits = self._execute_step(workers.send_step(step))
            if cuda and (prompt_rows or not self.config.async_scheduling):
                workers.wait_for_device()   # never block in a sync that a dead NCCL peer would hang
            if prompt_rows:
                self._append_prompt_logprobs(logits[num_sampling:], targets, owners)
                logits = logits[:num_sampling] if num_sampling else None
            samples = None if logits is None else self.sampler.sample(logits, self.prepare_sampling(batch),
                                                                      self.samples)
        except RuntimeError:
            workers.check_alive(wait_s=2.0)   # a collective failed: name the worker that died, if one did
            raise
        if samples is not None and cuda:
            samples.wait = workers.wait_for
        return samples

    @torch.inference_mode()
    def serve_steps(self) -> None:
        """Ranks 1..N-1: run each step rank 0 sends, until it sends SHUTDOWN."""
        while (step := receive_step(self.device)) is not None:
            self._execute_step(step)

    def _execute_step(self, step: Step) -> torch.Tensor | None:
        """One tensor-parallel step as every rank runs it -> logits [N, V] (None when N = 0). Rows whose token
        the last step sampled on rank 0's device (async scheduling) take it from a broadcast of rank 0's
        sample buffer into every rank's own, queued after that sampling on the device."""
        if step.pending_index.shape[0]:
            dist.broadcast(self.samples.token_ids, src=0)
            step.input_ids[step.pending_index] = self.samples.token_ids[step.pending_row]
        return self._execute(step.input_ids, step.positions, step.metadata, step.logits_indices)

    def _execute(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata,
                 logits_indices: torch.Tensor) -> torch.Tensor | None:
        """One tensor-parallel step, the same on every rank -> logits [N, V] (None when N = 0)."""
        if self.decode_graphs is not None and self.decode_graphs.can_replay(metadata):
            hidden = self.decode_graphs.replay(input_ids, positions, metadata)     # [B, H]
        elif self.mixed_graphs is not None and self.mixed_graphs.can_replay(metadata):
            hidden = self.mixed_graphs.replay(input_ids, positions, metadata)      # [T, H]
        else:
            hidden = self.model(input_ids, positions, metadata, self.kv_caches)    # [T, H]
        if logits_indices.shape[0] == 0:
            return None
        return self.model.compute_logits(hidden[logits_indices])                  # [N, V], the model dtype

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers and the grammar process, if any."""
        if self.grammar_masks is not None:
            self.grammar_masks.close()
        if self.workers is not None:
            self.workers.shutdown()

    def prepare_inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """-> input_ids [T], positions [T], metadata, logits_indices [N] (the rows that need a token)."""
        step = self.host_inputs(batch)
        device = self.device
        metadata = AttentionMetadata(
            query_start_loc=host_to_device(step.query_start_loc, torch.int32, device),        # [B + 1]
            seq_lens=host_to_device(step.seq_lens, torch.int32, device),                      # [B]
            slot_mapping=host_to_device(step.slot_mapping, torch.int64, device),              # [T]
            block_tables=host_to_device(step.block_tables, torch.int32, device),              # [B, max_blocks]
            max_query_len=step.max_query_len,
            max_seq_len=max(step.seq_lens),
        )
        input_ids = host_to_device(step.input_ids, torch.int64, device)                       # [T]
        if step.pending_index:
            input_ids[host_to_device(step.pending_index, torch.int64, device)] = \
                self.samples.token_ids[host_to_device(step.pending_row, torch.int64, device)]
        return (input_ids, host_to_device(step.positions, torch.int64, device), metadata,
                host_to_device(step.logits_indices, torch.int64, device))

    def host_inputs(self, batch: Batch) -> HostStep:
        """-> the step's inputs as plain Python lists, with the rows of input_ids whose token is still on the
        device (async scheduling) and the rows of the previous step's samples that hold them.
        Plain lists until the tensors: a decode step's inputs are a few values a sequence, and after a CPU
        forward that streamed the weights through every cache each numpy or torch call on them took
        10-50 us (a batch-1 step's numpy version: 0.18 ms of 6.5)."""
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        block_tables: list[list[int]] = []
        logits_indices: list[int] = []
        pending_index: list[int] = []   # rows of input_ids whose token is still on the device ...
        pending_row: list[int] = []     # ... at these rows of the previous step's samples
        for seq, num_new in batch.scheduled:
            start = seq.num_computed_tokens
            end = start + num_new
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slot_mapping.extend(_slots(seq.block_table, start, end, self.block_size))
            query_start_loc.append(query_start_loc[-1] + num_new)
            seq_lens.append(end)
            block_tables.append(seq.block_table)
            if end == seq.num_tokens:
                logits_indices.append(query_start_loc[-1] - 1)
                if seq.num_pending:
                    pending_index.append(query_start_loc[-1] - 1)
                    pending_row.append(seq.pending_row)
        max_blocks = max(len(table) for table in block_tables)
        padded = [table + [-1] * (max_blocks - len(table)) for table in block_tables]
        return HostStep(input_ids, positions, slot_mapping, query_start_loc, seq_lens, padded, logits_indices,
                        max(num_new for _, num_new in batch.scheduled), pending_index, pending_row)

    def prepare_sampling(self, batch: Batch, with_grammar: bool = True) -> SamplingBatch:
        """The batch's sampling settings; with_grammar: the grammar rows' masks too, built now (their
        matchers take the tokens they have not seen, waiting for the last step's if need be)."""
        seqs = batch.sampling_seqs
        if all(seq.grammar is None and seq.sampling_params.is_plain and seq.sampling_params.is_greedy
               and seq.num_output_tokens >= seq.sampling_params.min_tokens for seq in seqs):
            return SamplingBatch.plain(len(seqs), None, None, all_random=False)   # what build makes of them
        grammars = [seq.grammar for seq in seqs]
        with_grammar = with_grammar and any(grammar is not None for grammar in grammars)
        return SamplingBatch.build(
            params=[seq.sampling_params for seq in seqs],
            seeds=[seq.seed for seq in seqs],
            output_lens=[seq.num_output_tokens for seq in seqs],
            prompt_token_ids=[seq.prompt_token_ids for seq in seqs],
            output_token_ids=[seq.output_token_ids for seq in seqs],
            eos_token_ids=self.eos_token_ids,
            device=self.device,
            grammars=grammars if with_grammar else None,
            grammar_masks=self.grammar_masks_for(_first(grammars).compiler) if with_grammar else None,
            newest_token_ids=_newest_token_ids(self.last_samples, seqs) if with_grammar else None,
        )


@contextlib.contextmanager
def _one_torch_thread(enabled: bool):
    """torch on one thread for the block, where `enabled`: a step of the fused CPU decoder
    (model/llama_numba.py), whose compiled calls run on threads of their own. A torch op on two
    threads leaves torch's OpenMP worker spinning on the other core for a while after it, and the
    decoder's second thread then waits for that core at every meeting (a batch-1 step of the embedded
    model, 2-core Intel Xeon, quiet: 11.4 ms with torch on two threads, 7.5 ms on one; batch 16: 54.2
    against 47.0 ms). What torch does in such a step (the input tensors, sampling a [B, V] batch) is
    small. The count is restored after the block, so other torch work of the process keeps it."""
    if not enabled:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _slots(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """The cache slots of a sequence's positions start .. end - 1: position p is at slot
    block_table[p // block_size] * block_size + p % block_size, so each block the positions touch
    gives a run of consecutive slots."""
    slots: list[int] = []
    for first in range(start - start % block_size, end, block_size):       # the first position of each block
        base = block_table[first // block_size] * block_size - first
        slots.extend(range(base + max(start, first), base + min(end, first + block_size)))
    return slots


def _first(grammars: list[GrammarState | None]) -> GrammarState:
    return next(grammar for grammar in grammars if grammar is not None)


def _newest_token_ids(last: DeviceSamples | None, seqs: list[Sequence]) -> list[int] | None:
    """Per sequence, the id of its newest token where that is the last step's, still a placeholder on
    the host (async scheduling), and it has a grammar; else -1. None if no row's is. A grammar's matcher
    needs it for this step's mask. This step's forward is queued already: the host waits only for the
    last step's samples to reach it, while the device computes."""
    if last is None or not any(seq.num_pending == 1 and seq.grammar is not None for seq in seqs):
        return None   # the matchers wait at the placeholder
    if last.copied is not None:
        last.copied.synchronize()
    sampled = last.host[:last.num_rows].tolist()
    return [sampled[seq.pending_row] if seq.num_pending == 1 and seq.grammar is not None else PENDING
            for seq in seqs]


# ---- ranks 1..N-1 ----------------------------------------------------------------------------

def run_worker(config: EngineConfig) -> None:
    """Under torchrun, on every rank but 0: load this rank's shard, then run steps until rank 0 shuts down."""
    rank, created = join_launched_group(config)
    if rank == 0:
        raise ValueError("rank 0 runs the engine (LLM / LLMEngine), not run_worker")
    try:
        serve_rank(config, rank)
    finally:
        if created:
            dist.destroy_process_group()


def serve_rank(config: EngineConfig, rank: int) -> None:
    """On a rank other than 0, inside its process group: load this rank's shard, then run steps until
    rank 0 shuts down."""
    device = torch.device(config.device)
    try:
        model, model_config = load_model(config.model, device=config.device, dtype=config.torch_dtype,
                                         load_format=config.load_format, tp_rank=rank,
                                         tp_size=config.tensor_parallel_size, quantization=config.quantization)
    except BaseException:
        all_ranks_agree(False, device)   # release the other ranks, then fail with our own traceback
        raise
    if not all_ranks_agree(True, device):
        return   # another rank failed to load; it reports why
    model.parallel.group = dist.group.WORLD
    runner = ModelRunner(config.fit_model(model_config), model, model_config, eos_token_ids=[])
    try:
        runner.serve_steps()
    finally:
        for graphs in runner.cuda_graphs():   # before the group goes: NCCL waits for the graphs that use it
            graphs.release()
    if model.parallel.peer is not None:        # after the graphs that hold its kernel, before the group goes
        model.parallel.peer.close()
