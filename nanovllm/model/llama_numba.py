"""The Llama decoder on the CPU as one compiled call per step: llama.py's forward, in numba.

llama.py runs a decoder layer as dozens of dispatched torch ops (two RMSNorms,
four int4 matmuls, RoPE, the KV store, attention, SiLU-and-mul, residual adds
and casts), each a few microseconds of Python and dispatch around a kernel
that, at one row, is itself only tens of microseconds. Here the whole stack
of layers is one compiled function, run once per step:

    h = embed_tokens[input_ids]                                        [T, H]
    for each layer:
        xq = int16(rms_norm(h))                                        [T, H]
        q, k, v = int4 qkv GEMV (quant_numba._tile)                     [T, Hq + 2 Hkv, D]
        RoPE, store k and v in their cache slots, attention            [T, Hq, D]
        h += int4 o_proj(int16(attention))                             [T, H]
        gate, up = int4 gate_up GEMV(int16(rms_norm(h)))               [T, 2I]
        h += int4 down(int16(silu(gate) * up))                         [T, H]
    hidden = rms_norm(h)                                               [T, H]

It reuses the int4 kernel of quant_numba.py (weights repacked once into
its tiles, activations rounded to int16 per group of 32) and the RoPE, KV
store and attention of attention_numba.py, so a row's arithmetic is the one of
the unfused numba path except for RMSNorm and SiLU, which are plain loops here
instead of torch's vectorized ones (last-bit differences). Every stage computes
each row (or each tile of 16 output features, or each (row, KV head) of the
attention) by the same loop whatever the rows beside it, so a step's result
for a row does not depend on its batch: prefill chunks and decodes run the
same code, and `int4` stays batch-invariant.

Threads. numba's parallel loops cost a workqueue launch each (50-150 us on a
2-core VM, docs/reference/cpu-kernels.md), and a step would need five per
layer. Instead the step's R threads (the calling one and R - 1 started once,
`_RankThreads`) each run the whole forward (`_forward_rank`) and take their
share of every matmul's tiles and of the attention's (row, KV head) items; they
meet at an atomic counter after each shared stage, five times a layer, and
compute the cheap row-wise stages (RMSNorm, SiLU, the int16 rounding) each in
full, privately. One wake per helper thread per step; a rank whose call
raises ends every rank's waits (counter[1]), and the step raises. On a loaded
machine a meeting can wait for a descheduled thread, so `ThreadChoice` runs
each step size on one thread or on all, whichever has been faster. Scratch buffers are
made once and grown when a step has more rows than any before.

The LM head. Where it is a `RefinedLMHead` on numba's int4 kernel, its step
is one compiled call on the same threads too (`FusedDecoder.logits`,
`_lm_head_rank`): the ranks share the vocabulary's tiles, meet, then each
takes its rows, finds each row's top_k logits in one pass and recomputes them
from the float32 weight (RefinedLMHead.forward's result, the candidates' dot
products summed in float64 and rounded to float32).

Used where `FusedDecoder.of(model)` accepts the model: one CPU process, every
decoder matmul an int4 `PackedLinear` on numba's kernel without bias, no
per-head q/k norm (Qwen3), a float32 or float16 KV cache in one tensor. Otherwise, or
with NANOVLLM_FUSED_CPU=0, llama.py's forward runs.
"""
from __future__ import annotations

import atexit
import os
import queue
import threading
import time
import weakref
from typing import TYPE_CHECKING

import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from nanovllm.ops import NUMBA_CACHE_DTYPES
from nanovllm.ops.attention import AttentionMetadata
from nanovllm.ops.attention_numba import _attend_into, _rotary_store, _row_sequences, cache_array, kv_heads_per_item
from nanovllm.ops.huge_pages import advise_huge_pages
from nanovllm.ops.numba_cache import kernel
from nanovllm.ops.numba_ir import exp_shifted_into
from nanovllm.ops.quant import PackedLinear, RefinedLMHead
from nanovllm.ops.quant_numba import (GROUP_SIZE, _quantize_activation, _quantize_activation_into, _tile,
                                      activation_dtype, tiles_from_torch_int4)

if TYPE_CHECKING:     # llama.py imports this module where its forward takes the fused path
    from nanovllm.model.llama import KVCache, LlamaForCausalLM



def _step_threads() -> int:
    """The threads a step runs on: torch's count (`--threads`, or torch's default)."""
    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1))


def fused_cpu_enabled() -> bool:
    """NANOVLLM_FUSED_CPU=0 turns the fused decoder off (llama.py's forward runs): for A/B runs."""
    return os.environ.get("NANOVLLM_FUSED_CPU", "1") != "0"


class FusedDecoder:
    """A LlamaForCausalLM's decoder layers, stacked for the compiled forward (shapes per layer L)."""

    def __init__(self, model: LlamaForCausalLM):
        config = model.config
        attention = model.layers[0].self_attn
        self.num_heads, self.num_kv_heads = attention.num_heads, attention.num_kv_heads
        self.head_dim = attention.head_dim
        self.hidden_size, self.intermediate_size = config.hidden_size, config.intermediate_size
        self.scale = np.float32(attention.scale)
        self.eps = np.float32(model.norm.eps)
        self.embed = model.embed_tokens.weight.detach().float().contiguous().numpy()          # [V, H]
        self.final_norm = model.norm.weight.detach().float().contiguous().numpy()            # [H]
        self.norms = np.stack([np.stack([layer.input_layernorm.weight.detach().float().numpy(),
                                         layer.post_attention_layernorm.weight.detach().float().numpy()])
                               for layer in model.layers])                                    # [L, 2, H]
        self.cos_sin = attention.cos_sin_cache.float().contiguous().numpy()                 # [P, D]
        # Each matmul as three stacked arrays [L, ...]: codes, scales, lows (quant_numba.Int4Tiles).
        self.qkv = _stacked([layer.self_attn.qkv_proj for layer in model.layers])
        self.o = _stacked([layer.self_attn.o_proj for layer in model.layers])
        self.gate_up = _stacked([layer.mlp.gate_up_proj for layer in model.layers])
        self.down = _stacked([layer.mlp.down_proj for layer in model.layers])
        self.head = _head_of(model.lm_head)     # (codes, scales, lows, float32 weight [V, H], top_k, dtype) or None
        # The forward runs on num_ranks threads (torch's thread count when the decoder is made): this one
        # and num_ranks - 1 started here, which meet at `self._counter` (see `_forward_rank`).
        self.num_ranks = _step_threads()
        self._ranks = _RankThreads(self.num_ranks)
        self._all_ranks = [self._ranks]       # closed when the decoder is collected
        self.threads = ThreadChoice(self.num_ranks)
        self.head_threads = ThreadChoice(self.num_ranks)
        weakref.finalize(self, _close_all, self._all_ranks)
        # [0]: the meetings' count; [1]: set when a rank's call raised, which ends every wait (`_barrier`).
        self._counter = np.zeros(2, np.int64)
        self.failed: BaseException | None = None   # a rank's error: llama.py then runs its own forward
        self._lock = threading.Lock()     # one step at a time (engines may step from several threads)
        self._compiled = self._head_compiled = False
        self.compiled_seconds = 0.0       # time in the compiled forward and LM head (bench cpu's step overhead reads it)
        self.capacity = 0                 # rows the scratch buffers hold
        self._private: list[list[np.ndarray]] = []
        self._shared: list[np.ndarray] = []
        self._score_rows: list[np.ndarray] = []
        self._shaped: tuple[int, list[tuple[np.ndarray, ...]]] | None = None   # (rows, _buffers' result)
        self._kv_caches: list[KVCache] | None = None
        self._kv_cache: np.ndarray | None = None   # [L, 2, num_blocks, block_size, Hkv, D] (cache_array)

    @classmethod
    def of(cls, model: LlamaForCausalLM) -> "FusedDecoder | None":
        """The fused decoder of `model`, or None where the compiled forward does not cover it (the
        caller, llama.py, also runs its modules in a step where one of them has a forward hook)."""
        config = model.config
        if not fused_cpu_enabled() or model.parallel.world_size != 1 or config.qk_norm or config.sliding_window:
            return None
        if model.embed_tokens.weight.device.type != "cpu" or model.batch_invariant:
            return None
        for layer in model.layers:
            linears = (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
            if not all(isinstance(m, PackedLinear) and m.kernel == "numba" and m.bias is None for m in linears):
                return None
        return cls(model)

    def kv_cache_of(self, kv_caches: list[KVCache]) -> np.ndarray | None:
        """The one float32 or float16 tensor [L, 2, ...] whose views the runner passes as (k_cache,
        v_cache) per layer (model_runner.py allocates it so), as the kernels take it (float16 as int16
        bits, attention_numba.cache_array); None if they are separate tensors."""
        if kv_caches is self._kv_caches:
            return self._kv_cache
        base = kv_caches[0][0]._base
        ok = (base is not None and base.dtype in NUMBA_CACHE_DTYPES and base.dim() == 6
              and base.shape[0] == len(kv_caches) and base.shape[1] == 2 and base.is_contiguous()
              and all(k.data_ptr() == base[i, 0].data_ptr() and v.data_ptr() == base[i, 1].data_ptr()
                      for i, (k, v) in enumerate(kv_caches)))
        self._kv_caches, self._kv_cache = kv_caches, cache_array(base) if ok else None
        return self._kv_cache

    def _buffers(self, num_rows: int, max_seq_len: int) -> list[tuple[np.ndarray, ...]]:
        """Each rank's arguments after the weights: its private buffers, its attention scores row, then
        the shared buffers, as [T, ...] views of flat buffers (made again, twice as large, when a step
        outgrows them). The views are kept for the next step of as many rows: making them is some thirty
        numpy calls, 50-70 us after a forward has streamed the weights through every cache."""
        held = len(self._score_rows[0]) if self._score_rows else 0
        needed = self.num_heads * max_seq_len         # a row for each head of an attention item (a whole row's)
        if held < needed:
            self._score_rows = [np.empty(max(needed, 2 * held, 256), np.float32) for _ in range(self.num_ranks)]
            self._shaped = None
        if num_rows > self.capacity:
            self.capacity = max(num_rows, 2 * self.capacity)
            widths = self._private_widths()
            self._private = [[np.empty(self.capacity * width, dtype) for width, dtype in widths]
                             for _ in range(self.num_ranks)]
            self._shared = [np.empty(self.capacity * width, np.float32) for width in self._shared_widths()]
            self._shaped = None
        if self._shaped is not None and self._shaped[0] == num_rows:
            return self._shaped[1]
        shaped = lambda flat, width: flat[:num_rows * width].reshape(num_rows, width)
        shared = tuple(shaped(flat, width) for flat, width in zip(self._shared, self._shared_widths()))
        buffers = [tuple(shaped(flat, width) for flat, (width, _) in zip(private, self._private_widths()))
                   + (scores,) + shared for private, scores in zip(self._private, self._score_rows)]
        self._shaped = (num_rows, buffers)
        return buffers

    def _private_widths(self) -> list[tuple[int, type]]:
        """Row widths of `_forward_rank`'s private buffers, in its argument order (h ... act)."""
        hidden, q_size, intermediate = self.hidden_size, self.num_heads * self.head_dim, self.intermediate_size
        return [(hidden, np.float32), (hidden, np.float32),                                  # h, x
                (hidden, np.int16), (hidden // GROUP_SIZE, np.float32), (hidden // GROUP_SIZE, np.float32),
                (q_size, np.int16), (q_size // GROUP_SIZE, np.float32), (q_size // GROUP_SIZE, np.float32),
                (intermediate, np.int16), (intermediate // GROUP_SIZE, np.float32),
                (intermediate // GROUP_SIZE, np.float32),                                    # xq, dx, sx of h, q, I
                (q_size, np.float32), (intermediate, np.float32)]                            # rq, act

    def _shared_widths(self) -> list[int]:
        """Row widths of the shared buffers: qkv, attn, proj, gu."""
        qkv_size = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        return [qkv_size, self.num_heads * self.head_dim, self.hidden_size, 2 * self.intermediate_size]

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata,
                 kv_cache: np.ndarray) -> torch.Tensor:
        """input_ids, positions [T] -> hidden states [T, H] after the final norm, like llama.py's forward."""
        num_rows = input_ids.shape[0]
        out = np.empty((num_rows, self.hidden_size), np.float32)                              # [T, H]
        seq_lens = metadata.seq_lens.numpy()                                                   # [B]
        step = (input_ids.numpy(), positions.numpy(), metadata.slot_mapping.numpy(),
                metadata.query_start_loc.numpy(), seq_lens, metadata.block_tables.numpy(),
                self.embed, self.norms, self.final_norm, self.eps, self.cos_sin, kv_cache, self.scale,
                self.num_heads, self.num_kv_heads, *self.qkv, *self.o, *self.gate_up, *self.down)
        with self._lock:
            self._check_ranks()
            buffers = self._buffers(num_rows, metadata.max_seq_len)
            num_ranks = self.threads.pick(num_rows) if self._compiled else 1    # compile on this thread first
            seconds = self._run_ranks(_forward_rank, num_ranks, lambda rank: (*step, *buffers[rank], out))
            if self._compiled:
                self.threads.record(num_rows, num_ranks, seconds)
            self._compiled = True
        return torch.from_numpy(out)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> logits [N, V] float32: the RefinedLMHead's forward as one compiled call
        (`_lm_head_rank`). Only where `self.head` is set (llama.py's compute_logits checks)."""
        codes, scales, lows, weight, top_k, activation_dtype = self.head
        x = hidden.float().contiguous().numpy()
        num_rows = x.shape[0]
        logits = np.empty((num_rows, weight.shape[0]), np.float32)
        with self._lock:
            self._check_ranks()
            num_ranks = self.head_threads.pick(num_rows) if self._head_compiled else 1
            step = (x, codes, scales, lows, weight, top_k, logits)
            rounded = [np.empty(x.shape, activation_dtype) for _ in range(num_ranks)]    # each rank's xq
            seconds = self._run_ranks(_lm_head_rank, num_ranks, lambda rank: (*step, rounded[rank]))
            if self._head_compiled:
                self.head_threads.record(num_rows, num_ranks, seconds)
            self._head_compiled = True
        return torch.from_numpy(logits)

    def _run_ranks(self, function, num_ranks: int, rank_args) -> float:
        """function(rank, num_ranks, counter, base, *rank_args(rank)) on ranks 1 .. num_ranks - 1 (the
        helper threads) and rank 0 (this thread) -> rank 0's seconds. A rank that raises sets counter[1],
        so no rank waits for it; once every helper is out of its call, the step raises, and the decoder
        is marked failed (llama.py runs its own forward from then on)."""
        if self.failed is not None:
            raise RuntimeError("the fused CPU decoder failed on an earlier step") from self.failed
        base = int(self._counter[0])     # every rank has arrived at every earlier meeting
        for rank in range(1, num_ranks):
            self._ranks.submit(rank, (function, (rank, num_ranks, self._counter, base, *rank_args(rank))))
        start = time.perf_counter()
        try:
            function(0, num_ranks, self._counter, base, *rank_args(0))
        except BaseException as error:
            self._counter[1] = 1
            self._ranks.errors.append(error)
        seconds = time.perf_counter() - start
        self.compiled_seconds += seconds
        if self._counter[1]:
            self._ranks.wait_until_idle()
            self.failed = self._ranks.errors[0]
            raise RuntimeError(f"a thread of the fused CPU decoder failed ({self.failed!r}); the model runs "
                               "its unfused forward from now on") from self.failed
        return seconds

    def _check_ranks(self) -> None:
        """Start the helper threads again in a forked child, which has none of its parent's."""
        if self._ranks.pid != os.getpid():
            self._ranks = _RankThreads(self.num_ranks)
            self._all_ranks.append(self._ranks)


# How often ThreadChoice tries the slower count again. Each try costs a step at the slower speed (a batch-16
# step on one thread: about 37 ms against 22 on two, 2-core AMD EPYC): every 16th step cost 3% of a batch.
EXPLORE_EVERY = 64


class ThreadChoice:
    """How many threads run a step of T rows: all of them or 1, whichever has been faster for steps of
    about that size (T in [2^(b-1), 2^b)), by a running mean of their times; every EXPLORE_EVERY-th
    step of a size tries the other. A split step meets five times a layer, and on a loaded machine
    each meeting may wait for a descheduled thread (measured on 2 cores at load average 3: a batch-1
    forward 10.8 ms on one thread, 13.3 ms on two); on an idle one the second core reads half the
    weights. An untried size takes all threads first: a batch's prefill is often the only step of its
    size, and it is bound by the multiplications (1,024 prompt tokens: 1.0 s on two threads, 1.6-1.8 s
    on one, on the 2-core AMD EPYC). The bits of a row are the same either way, so only the time
    depends on the choice."""

    def __init__(self, max_threads: int):
        self.max_threads = max_threads
        self.seconds: dict[tuple[int, int], float] = {}   # (size class, threads) -> running mean of a step
        self.steps: dict[int, int] = {}                    # size class -> steps picked

    def pick(self, num_rows: int) -> int:
        if self.max_threads == 1:
            return 1
        size = num_rows.bit_length()
        count = self.steps[size] = self.steps.get(size, 0) + 1
        options = (self.max_threads, 1)
        untried = [threads for threads in options if (size, threads) not in self.seconds]
        if untried:
            return untried[0]
        best = min(options, key=lambda threads: self.seconds[size, threads])
        return best if count % EXPLORE_EVERY else options[best == options[0]]

    def record(self, num_rows: int, threads: int, seconds: float) -> None:
        key = (num_rows.bit_length(), threads)
        self.seconds[key] = seconds if key not in self.seconds else 0.75 * self.seconds[key] + 0.25 * seconds


class _RankThreads:
    """Threads 1 .. R - 1 of the fused forward (the caller's thread is rank 0): each waits for a step's
    rank function and arguments (`_forward_rank`, `_lm_head_rank`) and runs it, outside the GIL.
    Started once; they end with the process or when the decoder is collected."""

    def __init__(self, num_ranks: int):
        self.pid = os.getpid()
        self.jobs = [queue.SimpleQueue() for _ in range(num_ranks - 1)]
        self.submitted = [0] * (num_ranks - 1)    # jobs given to each thread, and jobs it has finished
        self.finished = [0] * (num_ranks - 1)
        self.errors: list[BaseException] = []     # what a rank's call raised
        self.threads = [threading.Thread(target=self._serve, args=(index,), daemon=True, name="fused-decoder-rank")
                        for index in range(num_ranks - 1)]
        for thread in self.threads:
            thread.start()
        atexit.register(self.close)

    def submit(self, rank: int, job: tuple) -> None:
        self.submitted[rank - 1] += 1
        self.jobs[rank - 1].put(job)

    def _serve(self, index: int) -> None:
        """Thread index + 1: run each job's function(*args); every rank function takes (rank, num_ranks,
        counter, ...), and a raise sets counter[1] so that the other ranks stop waiting for this one."""
        while (job := self.jobs[index].get()) is not None:
            function, args = job
            try:
                function(*args)
            except BaseException as error:
                self.errors.append(error)
                args[2][1] = 1
            finally:
                self.finished[index] += 1

    def wait_until_idle(self, timeout: float = 30.0) -> None:
        """Wait until every thread has finished every job given to it (after a failed step: none may
        still write into the cache when the next step runs)."""
        deadline = time.monotonic() + timeout
        while self.finished != self.submitted:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the fused CPU decoder's threads did not finish their step in {timeout:.0f} s")
            time.sleep(0.001)

    def close(self) -> None:
        """End the threads (after the step they run, if any); in a forked child there are none."""
        if self.pid != os.getpid():
            return
        for jobs in self.jobs:
            jobs.put(None)
        for thread in self.threads:
            if thread is not threading.current_thread():
                thread.join()
        self.jobs, self.threads = [], []


def _close_all(all_ranks: list[_RankThreads]) -> None:
    for ranks in all_ranks:
        ranks.close()


def _head_of(head) -> tuple | None:
    """A RefinedLMHead on numba's int4 kernel as (codes, scales, lows, float32 weight [V, H], top_k, the
    dtype its activations are rounded to) for `_lm_head_rank`; None for any other head (llama.py's
    compute_logits runs it)."""
    if not isinstance(head, RefinedLMHead):
        return None
    coarse = head.coarse
    if coarse.kernel != "numba" or coarse.bias is not None or coarse.out_features != head.weight.shape[0]:
        return None
    if head.weight.dtype != torch.float32 or not head.weight.is_contiguous():
        return None
    tiles = coarse._int4_tiles if coarse._int4_tiles is not None else tiles_from_torch_int4(coarse.packed,
                                                                                              coarse.scales)
    return (tiles.weight, tiles.scale, tiles.low, head.weight.detach().numpy(), min(head.top_k, tiles.out_features),
            activation_dtype(coarse.activation_bits))


def _stacked(linears: list[PackedLinear]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The layers' int4 weights in quant_numba's tiles, stacked: codes [L, N / 16 * G * 256] uint8,
    scales and lows [L, N / 16 * G * 16] float32."""
    tiles = [m._int4_tiles if m._int4_tiles is not None else tiles_from_torch_int4(m.packed, m.scales)
             for m in linears]
    stacked = (np.stack([t.weight for t in tiles]), np.stack([t.scale for t in tiles]),
               np.stack([t.low for t in tiles]))
    for array in stacked:
        advise_huge_pages(torch.from_numpy(array), collapse=True)     # fewer TLB misses (ops/huge_pages.py)
    return stacked


# ---- the compiled forward ----------------------------------------------------------------------

@kernel(boundscheck=False, fastmath={"reassoc"})
def _rms_norm_rows(x, weight, eps, out):
    """out [T, H] = x / sqrt(mean(x^2) + eps) * weight, row by row, in float32. The sum of squares may
    be reassociated, so it is summed in vector lanes (a fixed order, the same for every row); in
    order, each addition waits for the one before (0.5 ms a batch-16 step)."""
    for t in range(x.shape[0]):
        total = np.float32(0.0)
        for j in range(x.shape[1]):
            total += x[t, j] * x[t, j]
        inverse = np.float32(1.0) / np.sqrt(total / np.float32(x.shape[1]) + eps)
        for j in range(x.shape[1]):
            out[t, j] = x[t, j] * inverse * weight[j]


@kernel(boundscheck=False)
def _silu_and_mul_rows(gate_up, out):
    """out [T, I] = silu(gate) * up for gate_up [T, 2I] = [gate | up]."""
    size = out.shape[1]
    for t in range(out.shape[0]):
        gate, up, row = gate_up[t, :size], gate_up[t, size:], out[t]     # slices: the loops vectorize
        for j in range(size):
            row[j] = -gate[j]
        exp_shifted_into(row, np.float32(0.0))                    # exp(-gate)
        for j in range(size):
            row[j] = gate[j] / (np.float32(1.0) + row[j]) * up[j]


@kernel(boundscheck=False)
def _embed_rows(input_ids, embed, h):
    """h [T, H] = embed[input_ids]: the embedding lookup."""
    for t in range(h.shape[0]):
        for j in range(h.shape[1]):
            h[t, j] = embed[input_ids[t], j]


@kernel(boundscheck=False)
def _add_rows(x, h):
    """h [T, H] += x [T, H]: the residual add."""
    for t in range(h.shape[0]):
        for j in range(h.shape[1]):
            h[t, j] = x[t, j] + h[t, j]


# ---- the ranks' meeting point -----------------------------------------------------------------

def _counter_slot(context, builder, signature, args, index: int):
    """A pointer to counter[index], the int64 array that is an intrinsic's first argument."""
    array = context.make_array(signature.args[0])(context, builder, args[0])
    return cgutils.get_item_pointer(context, builder, signature.args[0], array, [ir.Constant(ir.IntType(64), index)])


def _load_acquire(index: int):
    """The codegen of an atomic read of counter[index] (acquire: what a rank wrote before it stored
    there is visible after)."""
    def codegen(context, builder, signature, args):
        return builder.load_atomic(_counter_slot(context, builder, signature, args, index), "acquire", 8)
    return codegen


@intrinsic
def _arrive(typingctx, counter):
    """counter[0] += 1 atomically (sequentially consistent: this rank's writes before it are seen by
    any rank that reads the new count); returns the new count."""
    def codegen(context, builder, signature, args):
        old = builder.atomic_rmw("add", _counter_slot(context, builder, signature, args, 0),
                                 ir.Constant(ir.IntType(64), 1), "seq_cst")
        return builder.add(old, ir.Constant(ir.IntType(64), 1))
    return types.int64(counter), codegen


@intrinsic
def _count(typingctx, counter):
    """counter[0], read atomically: the meetings' count."""
    return types.int64(counter), _load_acquire(0)


@intrinsic
def _failed(typingctx, counter):
    """counter[1], read atomically: nonzero once a rank's call has raised."""
    return types.int64(counter), _load_acquire(1)


@intrinsic
def _pause_or_yield(typingctx, spins):
    """A spin-wait's step: the CPU's `pause` hint, and every 16th spin `sched_yield()`, which gives
    the core to a rank (or another process) waiting for it on a loaded machine."""
    def codegen(context, builder, signature, args):
        pause = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                               "llvm.x86.sse2.pause")
        builder.call(pause, [])
        sched_yield = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []),
                                                     "sched_yield")
        every = builder.icmp_unsigned("==", builder.and_(args[0], ir.Constant(ir.IntType(64), 15)),
                                      ir.Constant(ir.IntType(64), 15))
        with builder.if_then(every, likely=False):
            builder.call(sched_yield, [])
        return context.get_dummy_value()
    return types.void(spins), codegen


@kernel(boundscheck=False)
def _barrier(counter, target):
    """Arrive, then wait until every rank has: counter[0] reaches target (base + ranks * barriers), or
    counter[1] says that a rank's call raised (it will not arrive)."""
    _arrive(counter)
    spins = 0
    while _count(counter) < target and _failed(counter) == 0:
        _pause_or_yield(spins)
        spins += 1


@kernel(boundscheck=False)
def _share(size, rank, num_ranks):
    """Rank `rank`'s part [start, stop) of range(size), contiguous."""
    return size * rank // num_ranks, size * (rank + 1) // num_ranks


# ---- the compiled forward ------------------------------------------------------------------------

@kernel(nogil=True, boundscheck=False)
def _forward_rank(rank, num_ranks, counter, base, input_ids, positions, slot_mapping, query_start_loc, seq_lens,
                  block_tables, embed, norms, final_norm, eps, cos_sin, kv_cache, scale, num_heads, num_kv_heads,
                  qkv_w, qkv_s, qkv_l, o_w, o_s, o_l, gu_w, gu_s, gu_l, down_w, down_s, down_l,
                  h, x, xq_h, dx_h, sx_h, xq_q, dx_q, sx_q, xq_i, dx_i, sx_i, rq, act, scores, qkv, attn, proj, gu,
                  out):
    """One rank's part of the module docstring's forward; every rank runs it on its own thread, each
    computing its share of every matmul's tiles and of the attention's (row, KV head) items, and they meet
    (`_barrier` on counter, whose count was `base` when the step began) after each shared stage.

    Private to the rank (each computes them in full, the same bits): h the residual stream [T, H], x
    its norm [T, H], the int16 activations xq_* [T, K] with dx_*, sx_* [T, K / 32], rq the rotated q
    [T, Hq, D], act [T, I], scores [>= group * the longest context] (a KV group's). Shared: qkv
    [T, (Hq + 2 Hkv) D], attn [T, Hq, D], proj [T, H] (o_proj's, then down's output), gu [T, 2I];
    out [T, H] (written by rank 0). Every rank stores the new k and v
    into the cache (the same values at the same addresses), so each reads its own stores back in
    the attention without waiting for another rank."""
    num_rows, hidden = out.shape
    head_dim = cos_sin.shape[1]
    qkv3 = qkv.reshape((num_rows, num_heads + 2 * num_kv_heads, head_dim))
    attn3 = attn.reshape((num_rows, num_heads, head_dim))
    rq3 = rq.reshape((num_rows, num_heads, head_dim))
    row_seq = _row_sequences(num_rows, query_start_loc, seq_lens)              # [T]
    _embed_rows(input_ids, embed, h)
    meetings = 0
    qkv_tiles, hidden_tiles, gu_tiles = _share(qkv.shape[1] // 16, rank, num_ranks), \
        _share(hidden // 16, rank, num_ranks), _share(gu.shape[1] // 16, rank, num_ranks)
    kv_per_item = kv_heads_per_item(num_rows, num_kv_heads, num_ranks)
    items = _share(num_rows * (num_kv_heads // kv_per_item), rank, num_ranks)
    for layer in range(norms.shape[0]):
        k_cache, v_cache = kv_cache[layer, 0], kv_cache[layer, 1]
        _rms_norm_rows(h, norms[layer, 0], eps, x)
        _quantize_activation_into(x, xq_h, dx_h, sx_h)
        for tile in range(qkv_tiles[0], qkv_tiles[1]):
            _tile(tile, xq_h, dx_h, sx_h, qkv_w[layer], qkv_s[layer], qkv_l[layer], qkv)
        meetings += 1
        _barrier(counter, base + num_ranks * meetings)
        _rotary_store(qkv3[:, :num_heads], qkv3[:, num_heads:num_heads + num_kv_heads],
                      qkv3[:, num_heads + num_kv_heads:], positions, cos_sin, k_cache, v_cache, slot_mapping, rq3)
        for item in range(items[0], items[1]):
            _attend_into(item, kv_per_item, row_seq, rq3, k_cache, v_cache, query_start_loc, seq_lens, block_tables,
                         scale, attn3, scores)
        meetings += 1
        _barrier(counter, base + num_ranks * meetings)
        _quantize_activation_into(attn, xq_q, dx_q, sx_q)
        for tile in range(hidden_tiles[0], hidden_tiles[1]):
            _tile(tile, xq_q, dx_q, sx_q, o_w[layer], o_s[layer], o_l[layer], proj)
        meetings += 1
        _barrier(counter, base + num_ranks * meetings)
        _add_rows(proj, h)
        _rms_norm_rows(h, norms[layer, 1], eps, x)
        _quantize_activation_into(x, xq_h, dx_h, sx_h)
        for tile in range(gu_tiles[0], gu_tiles[1]):
            _tile(tile, xq_h, dx_h, sx_h, gu_w[layer], gu_s[layer], gu_l[layer], gu)
        meetings += 1
        _barrier(counter, base + num_ranks * meetings)
        _silu_and_mul_rows(gu, act)
        _quantize_activation_into(act, xq_i, dx_i, sx_i)
        for tile in range(hidden_tiles[0], hidden_tiles[1]):
            _tile(tile, xq_i, dx_i, sx_i, down_w[layer], down_s[layer], down_l[layer], proj)
        meetings += 1
        _barrier(counter, base + num_ranks * meetings)
        _add_rows(proj, h)
    if rank == 0:
        _rms_norm_rows(h, final_norm, eps, out)


# ---- the compiled LM head ------------------------------------------------------------------------

TOP_K_RUN = 64     # values of a row _top_k_into tests against the k-th best at once


@kernel(boundscheck=False)
def _top_k_into(row, index):
    """index[:] = the positions of row's len(index) largest values, in no particular order (one pass
    that keeps the k best so far and replaces the least of them). Runs of TOP_K_RUN values are first
    counted against the least of the k (a loop that vectorizes); a run with none above it is skipped,
    which is most of them once the k are good, and the rest go value by value as before."""
    k = index.shape[0]
    values = np.empty(k, np.float32)
    for i in range(k):
        values[i], index[i] = row[i], i
    least = 0
    for i in range(1, k):
        if values[i] < values[least]:
            least = i
    for first in range(k, row.shape[0], TOP_K_RUN):
        stop = min(first + TOP_K_RUN, row.shape[0])
        above = 0
        for j in range(first, stop):
            above += row[j] > values[least]
        if above == 0:
            continue
        for j in range(first, stop):
            if row[j] > values[least]:
                values[least], index[least] = row[j], j
                for i in range(k):
                    if values[i] < values[least]:
                        least = i


@kernel(boundscheck=False, fastmath={"reassoc", "contract"})
def _dot_float64(x, w):
    """sum_h x[h] w[h] in float64 (a row's refined logit), summed in vector lanes."""
    total = 0.0
    for h in range(x.shape[0]):
        total += np.float64(x[h]) * np.float64(w[h])
    return total


@kernel(nogil=True, boundscheck=False)
def _lm_head_rank(rank, num_ranks, counter, base, x, codes, scales, lows, weight, top_k, logits, xq):
    """One rank's part of RefinedLMHead's forward: x [N, H] float32 -> logits [N, V] float32. The
    ranks share the int4 tiles of the vocabulary (quant_numba._tile, activations rounded into the
    rank's xq [N, H], int8 or int16 as the coarse layer's), meet, then each takes its rows: the top_k
    logits of a row are recomputed from the float32 weight [V, H] (the dot product summed in float64)
    and written over the int4 ones. Every row by the same loops whatever the rows beside it."""
    num_rows = x.shape[0]
    dx, sx = _quantize_activation(x, xq)
    tiles = _share(logits.shape[1] // 16, rank, num_ranks)
    for tile in range(tiles[0], tiles[1]):
        _tile(tile, xq, dx, sx, codes, scales, lows, logits)
    _barrier(counter, base + num_ranks)
    rows = _share(num_rows, rank, num_ranks)
    candidates = np.empty(top_k, np.int64)
    for row in range(rows[0], rows[1]):
        _top_k_into(logits[row], candidates)
        for j in candidates:
            logits[row, j] = np.float32(_dot_float64(x[row], weight[j]))
    _barrier(counter, base + 2 * num_ranks)
