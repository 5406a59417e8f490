"""Paged attention on the CPU, compiled by numba: one query at a time, in one order.

The torch reference (`paged_attention_torch` in attention.py) runs a decode
step as one padded `scaled_dot_product_attention` for the whole batch and a
prefill chunk as another, and SDPA's CPU kernel tiles the keys by sizes that
depend on the batch's longest context and the chunk's length. The same query
then rounds differently alone, in a batch, in a prefill or in a decode: enough
to change a greedy token of an int4 model (whose activations are rounded to
bfloat16 at every matmul) after a few dozen tokens.

Here every (query row, head) is computed by the same loop, over exactly its
own keys 0..p in order: scores q.k_j * scale, their maximum, exp(s_j - max)
summed in order, then the weighted sum of v_j in order. Nothing depends on the
other rows of the step, so a query gives the same bits whatever it is batched
with and whichever step computes it. A work item is a row's heads, all of them
or those of one KV head, visited block by block, so each block of keys and
values is read from memory once for the heads that share it. The work is split
across cores by rows where there are enough of them and else by (row, KV head),
except in a small step (a decode of a few sequences), which runs on the calling
thread: a workqueue launch costs 50-150 us here, more than the work. Both
drivers call the same `_attend`, so the bits do not change. `kernel`
(numba_cache.py) keeps the compiled code on disk for the next start.

The cache is float32 or float16 (kv_cache_dtype="float16", the default for the
int formats: a batch of decodes reads every layer's cache once a step, so it
halves the attention's bytes). numba has no float16 on the CPU; a float16 cache
is passed as int16 bits (`cache_array`), rounded once as it is stored and
widened exactly as it is read (numba_ir's `as_stored`, `as_float32`), so the
attention reads the very values torch's reference reads.

A decoder layer calls `rotary_store_and_attend_numba`: RoPE on q and k and the
store of k and v into their cache slots in one compiled loop (the formula of
rotary.py, bit for bit), then the attention: two calls where the torch
reference dispatches about a dozen ops.

numba's thread pool is its `workqueue` layer unless NUMBA_THREADING_LAYER says
otherwise: its idle workers sleep, where a second OpenMP runtime beside torch's
would spin on the same cores between the two libraries' parallel regions. The
workqueue runs one parallel kernel at a time (a second launch from another
thread would abort the process), so launches take `_launch_lock`.
"""
from __future__ import annotations

import os
import threading

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from nanovllm.ops import NUMBA_CACHE_DTYPES
from nanovllm.ops.attention import AttentionMetadata
from nanovllm.ops.numba_cache import kernel
from nanovllm.ops.numba_ir import (F32, FLOATS16, I32, I64, address, as_float32, as_stored, element_of,
                                   exp_shifted_into, load_floats16, splat, sum_lanes)
from nanovllm.ops.rmsnorm import rms_norm_torch

if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"
_launch_lock = threading.Lock()   # one parallel kernel at a time (engines may step in several threads)
# Below this many query-key-dimension products a step runs on one thread: a workqueue launch costs
# 50-150 us here (docs/reference/cpu-fast-path.md), a decode of one sequence over 300 positions ~30 us.
PARALLEL_MIN_WORK = 1 << 22


def rotary_store_and_attend_numba(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                                  cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  metadata: AttentionMetadata, scale: float,
                                  q_norm_weight: torch.Tensor | None = None,
                                  k_norm_weight: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
    """The signature and result of `rotary_store_and_attend_torch` for float32 q [T, Hq, D], k, v
    [T, Hkv, D] and caches: (Qwen3's per-head norm through torch,) RoPE and the store of the new
    tokens' k and v at the metadata's slots, then paged attention -> out [T, Hq, D]. q and k are
    left as they came (the reference rotates them in place; nothing reads them afterwards)."""
    if q_norm_weight is not None:   # Qwen3: each head of q and k normalized first, as rotary.py's reference does
        q, k = rms_norm_torch(q, q_norm_weight, eps), rms_norm_torch(k, k_norm_weight, eps)
    rotated_q = torch.empty(q.shape, dtype=q.dtype)                             # [T, Hq, D]
    _rotary_store(q.numpy(), k.numpy(), v.numpy(), positions.numpy(), cos_sin_cache.numpy(), cache_array(k_cache),
                  cache_array(v_cache), metadata.slot_mapping.numpy(), rotated_q.numpy())
    return paged_attention_numba(rotated_q, k_cache, v_cache, metadata, scale)


def cache_array(cache: torch.Tensor) -> np.ndarray:
    """A KV cache as the kernels take it: float32 as it is, float16 as int16 (numba has no float16 on the
    CPU; numba_ir's `as_float32` and `as_stored` read and write the bits)."""
    if cache.dtype not in NUMBA_CACHE_DTYPES:
        raise ValueError(f"the numba attention reads float32 or float16 caches, not {cache.dtype}")
    return cache.view(torch.int16).numpy() if cache.dtype == torch.float16 else cache.numpy()


@kernel(boundscheck=False)
def _rotate(x, cos_sin, out):
    """out = x rotated by the angles of one position, cos_sin [D] (cos | sin): rotary.py's formula in
    float32, stored as out stores it (rounded once to float16 in a float16 cache)."""
    half = x.shape[0] // 2
    for i in range(half):
        x1, x2 = x[i], x[i + half]
        cos, sin = cos_sin[i], cos_sin[i + half]
        out[i] = as_stored(x1 * cos + x2 * -sin, out)
        out[i + half] = as_stored(x2 * cos + x1 * sin, out)


@kernel(boundscheck=False)
def _rotary_store(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, rotated_q):
    """q, rotated_q [T, Hq, D]; k, v [T, Hkv, D]; positions, slot_mapping [T] int64 (slot < 0: no store);
    the caches float32 or float16 bits (`cache_array`)."""
    block_size = k_cache.shape[1]
    for t in range(q.shape[0]):
        cos_sin = cos_sin_cache[positions[t]]
        for h in range(q.shape[1]):
            _rotate(q[t, h], cos_sin, rotated_q[t, h])
        slot = slot_mapping[t]
        if slot < 0:
            continue
        block, offset = slot // block_size, slot % block_size
        for h in range(k.shape[1]):
            _rotate(k[t, h], cos_sin, k_cache[block, offset, h])
            stored = v_cache[block, offset, h]
            for d in range(stored.shape[0]):
                stored[d] = as_stored(v[t, h, d], stored)


def paged_attention_numba(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          metadata: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, Hq, D] float32 -> out [T, Hq, D]; the signature and result of `paged_attention_torch`
    (float32 or float16 caches [num_blocks, block_size, Hkv, D]), batch-invariant. A small step (a decode
    of a few sequences) runs on one thread: a parallel launch costs more than its work."""
    out = torch.empty_like(q)                                                   # [T, Hq, D]
    args = (q.contiguous().numpy(), cache_array(k_cache), cache_array(v_cache), metadata.query_start_loc.numpy(),
            metadata.seq_lens.numpy(), metadata.block_tables.numpy(), np.float32(scale), out.numpy())
    if q.shape[0] * q.shape[1] * q.shape[2] * metadata.max_seq_len < PARALLEL_MIN_WORK:
        _paged_attention_serial(*args)
        return out
    with _launch_lock:
        _paged_attention(*args, kv_heads_per_item(q.shape[0], k_cache.shape[2], numba.get_num_threads()))
    return out


@kernel(boundscheck=False)
def _row_sequences(num_tokens, query_start_loc, seq_lens):
    """-> [T]: the sequence of each query row (-1: padding)."""
    row_seq = np.full(num_tokens, -1, np.int64)
    for b in range(seq_lens.shape[0]):
        for t in range(query_start_loc[b], query_start_loc[b + 1]):
            row_seq[t] = b
    return row_seq


@kernel(boundscheck=False)
def _attend(item, kv_per_item, row_seq, q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, out):
    """`_attend_into` with a scores buffer of its own: the one loop every work item runs, serial or
    parallel."""
    b = row_seq[item // (k_cache.shape[2] // kv_per_item)]
    heads = kv_per_item * (q.shape[1] // k_cache.shape[2])
    scores = np.empty(heads * seq_lens[b] if b >= 0 else 0, np.float32)     # the sequence's length >= position + 1
    _attend_into(item, kv_per_item, row_seq, q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale,
                 out, scores)


def _for_each_head_count(builder: ir.IRBuilder, count: ir.Value, most: int, emit) -> None:
    """emit(heads) for the runtime `count` of heads (1 .. most): one unrolled body per count, chosen by
    a switch (the intrinsics keep every head's vectors in registers, so the count must be known to the
    code)."""
    done = builder.append_basic_block("heads_done")
    switch = builder.switch(count, done)
    for heads in range(1, most + 1):
        body = builder.append_basic_block(f"heads_{heads}")
        switch.add_case(ir.Constant(count.type, heads), body)
        builder.position_at_end(body)
        emit(heads)
        builder.branch(done)
    builder.position_at_end(done)


def _key_scores_codegen(chunks: int):
    """The LLVM IR of `_key_scores[chunks]`: heads of 16 * chunks values that share their keys, each
    query held in `chunks` vectors of 16; per key, its vectors are loaded once and, for each head,
    multiplied and added into one (fused multiply-adds, in chunk order), the 16 lanes summed by halves,
    times scale."""
    def codegen(context, builder, signature, args):
        k_, k_at, key_stride, count, q_, q_at, q_step, num_heads, scale, s_, s_at, s_step = args
        k_t, q_t, s_t = signature.args[0], signature.args[4], signature.args[9]
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(FLOATS16, [FLOATS16] * 3), "llvm.fma.v16f32")
        q_ptr = address(context, builder, q_t, q_, q_at, F32)
        k_ptr = address(context, builder, k_t, k_, k_at, element_of(k_t))
        s_ptr = address(context, builder, s_t, s_, s_at, F32)

        def emit(heads: int) -> None:
            queries = [[load_floats16(builder, builder.gep(q_ptr, [builder.mul(ir.Constant(I64, h), q_step)]), 16 * c)
                        for c in range(chunks)] for h in range(heads)]
            with cgutils.for_range(builder, count) as loop:
                key_at = builder.gep(k_ptr, [builder.mul(loop.index, key_stride)])
                key = [load_floats16(builder, key_at, 16 * c) for c in range(chunks)]
                for h, query in enumerate(queries):
                    total = builder.fmul(query[0], key[0])
                    for c in range(1, chunks):
                        total = builder.call(fma, [query[c], key[c], total])
                    score_at = builder.add(builder.mul(ir.Constant(I64, h), s_step), loop.index)
                    builder.store(builder.fmul(sum_lanes(builder, total), scale), builder.gep(s_ptr, [score_at]))
        _for_each_head_count(builder, num_heads, 16 // chunks, emit)
        return context.get_dummy_value()
    return codegen


def _weighted_values_codegen(chunks: int):
    """The LLVM IR of `_weighted_values[chunks]`: heads that share their values, each output's 16 * chunks
    values held in `chunks` vectors while the keys go by; a key's value vectors are loaded once and
    each head adds its weight times them (fused multiply-adds, key after key); stored once."""
    def codegen(context, builder, signature, args):
        v_, v_at, key_stride, count, s_, s_at, s_step, num_heads, inv_, inv_at, o_, o_at, o_step = args
        v_t, s_t, inv_t, o_t = signature.args[0], signature.args[4], signature.args[8], signature.args[10]
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(FLOATS16, [FLOATS16] * 3), "llvm.fma.v16f32")
        o_ptr = address(context, builder, o_t, o_, o_at, F32)
        v_ptr = address(context, builder, v_t, v_, v_at, element_of(v_t))
        s_ptr = address(context, builder, s_t, s_, s_at, F32)
        inv_ptr = address(context, builder, inv_t, inv_, inv_at, F32)

        def emit(heads: int) -> None:
            outs = [builder.gep(o_ptr, [builder.mul(ir.Constant(I64, h), o_step)]) for h in range(heads)]
            sums = [[cgutils.alloca_once_value(builder, load_floats16(builder, outs[h], 16 * c)) for c in range(chunks)]
                    for h in range(heads)]
            inverse = [builder.load(builder.gep(inv_ptr, [ir.Constant(I64, h)])) for h in range(heads)]
            with cgutils.for_range(builder, count) as loop:
                value_at = builder.gep(v_ptr, [builder.mul(loop.index, key_stride)])
                value = [load_floats16(builder, value_at, 16 * c) for c in range(chunks)]
                for h in range(heads):
                    score_at = builder.add(builder.mul(ir.Constant(I64, h), s_step), loop.index)
                    weight = splat(builder, builder.fmul(builder.load(builder.gep(s_ptr, [score_at])), inverse[h]),
                                   FLOATS16)
                    for c in range(chunks):
                        builder.store(builder.call(fma, [weight, value[c], builder.load(sums[h][c])]), sums[h][c])
            for h in range(heads):
                for c in range(chunks):
                    builder.store(builder.load(sums[h][c]), builder.bitcast(
                        builder.gep(outs[h], [ir.Constant(I32, 16 * c)]), FLOATS16.as_pointer()), align=4)
        _for_each_head_count(builder, num_heads, 16 // chunks, emit)
        return context.get_dummy_value()
    return codegen


def _key_scores_intrinsic(chunks: int):
    """For heads i < num_heads (at most 16 / chunks) that share their keys: scores[s_at + i s_step + j] =
    scale * sum_d q[q_at + i q_step + d] k[k_at + j key_stride + d], d < 16 * chunks, for j < count
    (offsets in elements from each array's data)."""
    def typer(typingctx, k, k_at, key_stride, count, q, q_at, q_step, num_heads, scale, scores, s_at, s_step):
        i64 = types.int64
        return (types.void(k, i64, i64, i64, q, i64, i64, i64, types.float32, scores, i64, i64),
                _key_scores_codegen(chunks))
    return intrinsic(typer)


def _weighted_values_intrinsic(chunks: int):
    """For heads i < num_heads (at most 16 / chunks) that share their values: out[o_at + i o_step + d] +=
    sum_j (scores[s_at + i s_step + j] * inverse_totals[inv_at + i]) v[v_at + j key_stride + d],
    d < 16 * chunks, j < count in order."""
    def typer(typingctx, v, v_at, key_stride, count, scores, s_at, s_step, num_heads, inverse_totals, inv_at, out,
              o_at, o_step):
        i64 = types.int64
        return (types.void(v, i64, i64, i64, scores, i64, i64, i64, inverse_totals, i64, out, i64, i64),
                _weighted_values_codegen(chunks))
    return intrinsic(typer)


_key_scores_4, _weighted_values_4 = _key_scores_intrinsic(4), _weighted_values_intrinsic(4)    # head_dim 64
_key_scores_8, _weighted_values_8 = _key_scores_intrinsic(8), _weighted_values_intrinsic(8)    # head_dim 128


@kernel(boundscheck=False)
def _vectors_fit(head_dim, q, k_cache, v_cache, out):
    """Whether the key-block intrinsics take this head: head_dim 64 or 128, each head's values contiguous."""
    return ((head_dim == 64 or head_dim == 128) and q.strides[2] == 4 and k_cache.strides[3] == k_cache.itemsize
            and v_cache.strides[3] == v_cache.itemsize and out.strides[2] == 4)


@kernel(boundscheck=False)
def kv_heads_per_item(num_rows, num_kv_heads, num_workers):
    """The KV heads one work item takes: all of a row's where the rows alone keep every worker busy
    (each block of the cache, every KV head's keys side by side, is then read front to back: a stream
    the prefetcher follows), one where there are too few rows (a decode of a few sequences)."""
    return num_kv_heads if num_rows >= 2 * num_workers else 1


@kernel(fastmath=True, boundscheck=False)
def _attend_into(item, kv_per_item, row_seq, q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale,
                 out, scores):
    """out[t, h] for the query heads h of KV heads g .. g + kv_per_item - 1, item = t * (Hkv / kv_per_item)
    + g / kv_per_item, with their scores in a given buffer (at least heads * (the row's position + 1)
    long: the item's head i at i * stride). Keys are visited block by block (no division per key), and
    each block's keys by every head of the item in turn, so a block is read from memory once for the
    heads that share it and from the core's cache by the rest. Each head's arithmetic is its own and in
    the same order whichever heads are beside it, so kv_per_item changes no bits. At head_dim 64 and
    128 a block's keys go through one intrinsic call for the scores and one for the weighted values
    per run of up to 4 (head_dim 64) or 2 (128) heads of a KV head: each key's vectors are loaded once
    for the run, the queries and the outputs stay in registers (the loops of other sizes re-read and
    re-store the output at every key)."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    items_per_row = num_kv_heads // kv_per_item
    t = item // items_per_row
    heads = kv_per_item * group
    head0 = item % items_per_row * heads                 # the item's heads: head0 .. head0 + heads - 1
    b = row_seq[t]
    for h in range(head0, head0 + heads):
        out[t, h, :] = 0.0
    if b < 0:
        return
    # This row's absolute position: it sees keys 0..position.
    position = seq_lens[b] - (query_start_loc[b + 1] - query_start_loc[b]) + (t - query_start_loc[b])
    num_keys = position + 1
    stride = scores.shape[0] // heads                     # head i's scores, then exponentials, at i * stride
    vectors = _vectors_fit(head_dim, q, k_cache, v_cache, out)
    k_step, v_step = k_cache.strides[1] // k_cache.itemsize, v_cache.strides[1] // v_cache.itemsize
    q_step, o_step = q.strides[1] // 4, out.strides[1] // 4
    most = 256 // head_dim             # heads an intrinsic call holds in registers: 16 vectors of 16 values
    for first in range(0, num_keys, block_size):
        block = block_tables[b, first // block_size]
        count = min(block_size, num_keys - first)
        if vectors:
            for i in range(heads):
                if i % group % most:                      # calls for runs of `most` heads of one KV head
                    continue
                h, kv_head, run = head0 + i, (head0 + i) // group, min(most, group - i % group)
                k_at = (block * k_cache.strides[0] + kv_head * k_cache.strides[2]) // k_cache.itemsize
                q_at = (t * q.strides[0] + h * q.strides[1]) // 4
                if head_dim == 64:
                    _key_scores_4(k_cache, k_at, k_step, count, q, q_at, q_step, run, scale, scores, i * stride + first,
                                  stride)
                else:
                    _key_scores_8(k_cache, k_at, k_step, count, q, q_at, q_step, run, scale, scores, i * stride + first,
                                  stride)
            continue
        for i in range(heads):
            h, s_at = head0 + i, i * stride + first
            kv_head = h // group
            query = q[t, h]
            for j in range(count):
                key = k_cache[block, j, kv_head]
                dot = np.float32(0.0)
                for d in range(head_dim):
                    dot += query[d] * as_float32(key[d])
                scores[s_at + j] = dot * scale
    inverse_totals = np.empty(heads, np.float32)
    for i in range(heads):
        s = scores[i * stride:i * stride + num_keys]
        best = s[0]
        for j in range(1, num_keys):
            best = max(best, s[j])
        exp_shifted_into(s, best)
        total = np.float32(0.0)
        for j in range(num_keys):
            total += s[j]
        inverse_totals[i] = np.float32(1.0) / total
    for first in range(0, num_keys, block_size):
        block = block_tables[b, first // block_size]
        count = min(block_size, num_keys - first)
        if vectors:
            for i in range(heads):
                if i % group % most:
                    continue
                h, kv_head, run = head0 + i, (head0 + i) // group, min(most, group - i % group)
                v_at = (block * v_cache.strides[0] + kv_head * v_cache.strides[2]) // v_cache.itemsize
                o_at = (t * out.strides[0] + h * out.strides[1]) // 4
                if head_dim == 64:
                    _weighted_values_4(v_cache, v_at, v_step, count, scores, i * stride + first, stride, run,
                                       inverse_totals, i, out, o_at, o_step)
                else:
                    _weighted_values_8(v_cache, v_at, v_step, count, scores, i * stride + first, stride, run,
                                       inverse_totals, i, out, o_at, o_step)
            continue
        for i in range(heads):
            h, s_at = head0 + i, i * stride + first
            kv_head = h // group
            o = out[t, h]
            for j in range(count):
                value = v_cache[block, j, kv_head]
                weight = scores[s_at + j] * inverse_totals[i]
                for d in range(head_dim):
                    o[d] += weight * as_float32(value[d])


@kernel(parallel=True, boundscheck=False)
def _paged_attention(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, out, kv_per_item):
    """q, out [T, Hq, D] float32; k_cache, v_cache [N, bs, Hkv, D] float32 or float16 bits (int16);
    query_start_loc [B + 1], seq_lens [B], block_tables [B, max_blocks] int32; kv_per_item: the KV heads
    of a work item (`kv_heads_per_item`)."""
    row_seq = _row_sequences(q.shape[0], query_start_loc, seq_lens)
    for item in prange(q.shape[0] * (k_cache.shape[2] // kv_per_item)):
        _attend(item, kv_per_item, row_seq, q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, out)


@kernel(boundscheck=False)
def _paged_attention_serial(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, out):
    """`_paged_attention` on the calling thread."""
    row_seq = _row_sequences(q.shape[0], query_start_loc, seq_lens)
    for item in range(q.shape[0]):
        _attend(item, k_cache.shape[2], row_seq, q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale,
                out)
