"""Paged attention in Triton: one kernel for mixed prefill/decode batches, with an
optional split of the context (flash-decoding) and a small kernel that merges the splits.

The work is cut into *tiles*. A tile is up to BLOCK_Q consecutive new tokens of one
sequence times the GROUP query heads that share one KV head (GQA), so a program
loads each K/V tile once and uses it for BLOCK_Q * GROUP query rows:

    program (tile, kv_head, split):     (DECODE_HEADS_TOGETHER: (tile * Hkv + kv_head, 1, split))
        rows    = BLOCK_Q tokens x GROUP heads          (BLOCK_M rows, padded)
        for each BLOCK_N keys of the context in its split, through the block table:
            S = Q K^T * scale, causal mask          [BLOCK_M, BLOCK_N]
            online softmax in fp32 (running max m, running sum l)
            acc += P V                               [BLOCK_M, D]
        out = acc / l    (or, with splits: partial out and its log-sum-exp)

Sequence b owns tiles query_start_loc[b] // BLOCK_Q + b and up, so the grid is
T // BLOCK_Q + B tiles, known from shapes alone; a program finds its sequence by
counting tile starts, and tiles past the end of a chunk do nothing. A decode
(BLOCK_Q = 1) has exactly one tile per sequence, so its program skips the count
(DECODE: tile = sequence). BLOCK_Q is fixed per model
(prefill) or 1 (decode), never taken from the step's chunk lengths, and the
number of sequences is a plain argument: a step of a shape not seen before runs
the kernels already compiled instead of stopping to compile new ones.

Split-KV: with few sequences and long contexts, B * Hkv programs cannot fill the
GPU. Each (tile, kv_head) then runs NUM_SPLITS programs over equal slices of its
context, each writing an output normalized by its own sum plus log2(sum) + max;
`_merge_splits_kernel` weights the slices by exp2(lse - max lse).

A decode of a few sequences (the split-KV case) can hand the kernel its token's q, k and v
before RoPE (`rotary_store_and_attend_triton`, ROPE): each program rotates its q heads as it
loads them, and the program of the split that holds the token's position rotates k, writes k
and v into the cache and adds them to its softmax last, from registers; its loop over the
cache stops before that slot. One kernel where the layer would otherwise run two.

CUDA graphs: nothing here reads device values on the host. The grid depends only
on tensor shapes and on `max_query_len`, which is 1 for every captured decode
graph. The number of splits for a decode depends on the batch size, the number of
KV heads and the *width of the block table* (its capacity in tokens), never on
`max_seq_len`: a graph captured once stays valid for any context that fits the
table, and each split covers ceil(seq_len / NUM_SPLITS) keys read on the device.
To pad a decode batch up to a captured size, add dummy sequences with seq_len 0,
a block-table row of -1 and slot -1: their output rows come out as zeros.

An FP8 cache (float8 e4m3, FP8_KV): the tensor cores take the stored codes as they are,
converted to float16 (exact, one instruction for two values; float32 for float32 q), and
the layer's scales multiply what the dot products give instead of every value loaded:
k_scale the scores (with the softmax scale, once a program), v_scale the output. 16-bit q
goes in as float16 scaled by a power of two that puts its largest magnitude in
[2^14, 2^15) (`_query_for_codes`), so that float16's range holds it; the scores undo that
power. This is the torch reference's attention over the dequantized cache with K and V
unrounded to q's dtype, so it differs from it by that rounding. The ROPE path quantizes
the token's k and v as it writes them (`to_cache`) and attends to them from registers,
dequantized as a later step would read them back. V stored keys-innermost (attention.py's
`layer_caches`: an FP8 cache of heads wider than 64) is loaded a block at a time as [D, keys]
runs and taken by the tensor cores as K is (V_KEYS_INNER), where row-major V is converted and
laid out again through shared memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nanovllm.ops import pdl_between, sm_count
from nanovllm.ops.attention_metadata import AttentionMetadata
from nanovllm.ops.quant_format import FP8_DTYPE
from nanovllm.ops.rotary_triton import rotary_and_store_kv_triton, to_cache

LOG2_E = 1.4426950408889634
SEQUENCE_SEARCH_BLOCK = 64   # query_start_loc entries a program compares at once to find its sequence


@triton.jit
def _rope_rows(row_ptrs, offs_d, partner, mask, cos, sin, norm_ptr, eps,
               HEAD_DIM: tl.constexpr, HAS_NORM: tl.constexpr):
    """The heads starting at row_ptrs [R], rotated (after Qwen3's per-head RMSNorm when HAS_NORM):
    x * cos + partner(x) * sin with the signs folded into sin, rounded as `rotary_and_store_kv_torch`
    rounds -> [R, HEAD_DIM_PAD] in the heads' dtype."""
    x = tl.load(row_ptrs[:, None] + offs_d[None, :], mask=mask, other=0.0)
    xp = tl.load(row_ptrs[:, None] + partner[None, :], mask=mask, other=0.0)
    xf = x.to(tl.float32)
    xpf = xp.to(tl.float32)
    if HAS_NORM:
        d_valid = offs_d < HEAD_DIM
        w = tl.load(norm_ptr + offs_d, mask=d_valid, other=0.0).to(tl.float32)
        wp = tl.load(norm_ptr + partner, mask=d_valid, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / HEAD_DIM + eps)
        xf = ((xf * rstd[:, None]).to(x.dtype).to(tl.float32) * w[None, :]).to(x.dtype).to(tl.float32)
        xpf = ((xpf * rstd[:, None]).to(x.dtype).to(tl.float32) * wp[None, :]).to(x.dtype).to(tl.float32)
    return (xf * cos[None, :] + xpf * sin[None, :]).to(x.dtype)


@triton.jit
def _power_of_two(exponent):
    """2^exponent, exactly, for integer exponents in [-126, 127]."""
    return ((exponent + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _query_for_codes(q, IEEE: tl.constexpr):
    """q [BLOCK_M, D] for dot products with an FP8 cache's codes -> (q as the tensor cores take it,
    what its products are multiplied by to undo its scaling). float32 q (IEEE): as it is, against
    float32 codes. 16-bit q: float16, times the power of two 2^p that puts its largest magnitude in
    [2^14, 2^15) (the products are then multiplied by 2^-p): every value within 2^28 of the
    largest keeps all its bits, as float16 holds a bfloat16 value's 8 and its exponent from 2^-14 up."""
    if IEEE:
        q_dot, undo = q, 1.0
    else:
        q_max = tl.max(tl.max(tl.abs(q.to(tl.float32)), axis=1), axis=0)
        exponent = ((q_max.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127           # floor(log2 q_max)
        power = tl.minimum(tl.maximum(14 - exponent, -126), 126)
        q_dot = (q.to(tl.float32) * _power_of_two(power)).to(tl.float16)
        undo = _power_of_two(-power)
    return q_dot, undo


@triton.jit
def _codes_to_float16(x, ASM: tl.constexpr):
    """A tile of e4m3 codes -> float16, exactly. ASM (on a GPU): two PTX conversions for four codes,
    in an asm that the compiler keeps where it is, so that the tile is converted as it was loaded and
    then laid out for the tensor cores as 16-bit values (V's transposed operand, by ldmatrix); a cast
    would be moved past that layout change, and V's codes read from shared memory a byte at a time
    (at head_dim 64, 968 -> 466 instructions a step of 128 keys with K's and V's conversion here;
    on an H100 K's cast, left to the compiler, then read faster: 57.9 against 67.7 us at head_dim 128)."""
    if ASM:
        y = tl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.rn.f16x2.e4m3x2 $0, lo; cvt.rn.f16x2.e4m3x2 $1, hi; }",
            "=r,=r,r", [x.to(tl.int8, bitcast=True)], dtype=tl.float16, is_pure=False, pack=4)
    else:
        y = x.to(tl.float16)
    return y


@triton.jit
def _from_cache(x, scale, dtype: tl.constexpr, FP8: tl.constexpr):
    """Stored K or V -> dtype: with FP8, times its scale in fp32 first (attention.py's dequantize_kv)."""
    if FP8:   # one return: the compiler types every return of a function alike, taken or not
        x = (x.to(tl.float32) * scale).to(dtype)
    return x


@triton.jit
def _load_v_keys_inner(v_cache_ptr, table_row, start, loop_hi, kv_head, offs_d, d_valid,
                       stride_vb, stride_vh, stride_vd, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys start .. start + BLOCK_N of a cache that stores V keys-innermost ([blocks, Hkv, D, BLOCK_SIZE]:
    for each d, a block's BLOCK_SIZE values side by side) -> [BLOCK_N, D], as the row-major load gives
    them. Loaded as [D, blocks, BLOCK_SIZE] runs, masked by whole blocks so that a run stays one
    wide load: keys past loop_hi in the last block are read, their probabilities are 0 and their
    values finite (a zeroed or written slot: a write stores NaN as 0, attention.quantize_kv)."""
    tl.static_assert(BLOCK_N % BLOCK_SIZE == 0, "a tile of keys must hold whole blocks")
    NUM_BLOCKS: tl.constexpr = BLOCK_N // BLOCK_SIZE
    offs_j = start // BLOCK_SIZE + tl.arange(0, NUM_BLOCKS)
    j_valid = offs_j * BLOCK_SIZE < loop_hi
    block = tl.maximum(tl.load(table_row + offs_j, mask=j_valid, other=0), 0).to(tl.int64)
    offs_i = tl.arange(0, BLOCK_SIZE)
    ptrs = (v_cache_ptr + kv_head * stride_vh + (block * stride_vb)[None, :, None]
            + (offs_d * stride_vd)[:, None, None] + offs_i[None, None, :])          # [D, blocks, BLOCK_SIZE]
    vt = tl.load(ptrs, mask=d_valid[:, None, None] & j_valid[None, :, None], other=0.0)
    return tl.trans(tl.reshape(vt, [offs_d.shape[0], BLOCK_N]))


@triton.jit(do_not_specialize=["num_seqs"])   # one compiled kernel for any number of sequences
def _paged_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, lse_ptr,
        query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
        scale_log2, num_seqs, k_scale, v_scale,
        stride_qt, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh, stride_vd,
        stride_ot, stride_oh, stride_os,
        stride_lt, stride_lh,
        stride_bt,
        k_new_ptr, v_new_ptr, positions_ptr, cos_sin_ptr, q_norm_ptr, k_norm_ptr, slot_mapping_ptr, eps,
        stride_knt, stride_knh, stride_vnt, stride_vnh, stride_cs,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, NUM_SPLITS: tl.constexpr, DECODE: tl.constexpr,
        ROPE: tl.constexpr, HAS_NORM: tl.constexpr, IEEE: tl.constexpr, NUM_STAGES: tl.constexpr,
        FP8_KV: tl.constexpr, CODES_ASM: tl.constexpr = False, PDL: tl.constexpr = False,
        WAIT: tl.constexpr = False, HEADS_TOGETHER: tl.constexpr = 0, V_KEYS_INNER: tl.constexpr = False):
    if PDL:     # the kernel after this one may launch now (ops/__init__.py)
        tl.extra.cuda.gdc_launch_dependents()
    if HEADS_TOGETHER:      # the KV heads (HEADS_TOGETHER of them) of a tile are neighbouring programs
        tile = tl.program_id(0) // HEADS_TOGETHER
        kv_head = tl.program_id(0) % HEADS_TOGETHER
    else:
        tile = tl.program_id(0)
        kv_head = tl.program_id(1)
    split = tl.program_id(2)

    if DECODE:
        # A decode step: every sequence has exactly one new token, so tile = token = sequence. Nothing
        # to search, and the sequence's length is the first load (at batch 1 each dependent load
        # before the first key is a visible share of the kernel's few microseconds).
        seq = tile
        q_start = tile
        q_len = 1
        q_lo = 0
    else:
        # Which sequence owns this tile: the last one whose first tile is <= ours (BLOCK_B starts at a time).
        num_starts_before = tl.full((), 0, tl.int32)
        for b0 in range(0, num_seqs, BLOCK_B):
            offs_b = b0 + tl.arange(0, BLOCK_B)
            starts = tl.load(query_start_loc_ptr + offs_b, mask=offs_b < num_seqs, other=1 << 30)
            if BLOCK_Q == 1:
                first_tiles = starts
            else:
                first_tiles = starts // BLOCK_Q + offs_b
            num_starts_before += tl.sum((first_tiles <= tile).to(tl.int32), axis=0)
        seq = num_starts_before - 1
        q_start = tl.load(query_start_loc_ptr + seq)
        q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
        if BLOCK_Q == 1:
            q_lo = tile - q_start
        else:
            q_lo = (tile - (q_start // BLOCK_Q + seq)) * BLOCK_Q   # first new token of this tile
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len                               # tokens cached before the chunk

    # Rows: token (row // GROUP) of the tile, query head kv_head * GROUP + row % GROUP.
    offs_m = tl.arange(0, BLOCK_M)
    q_idx = q_lo + offs_m // GROUP                               # position inside the chunk
    head = kv_head * GROUP + offs_m % GROUP
    row_valid = (offs_m < BLOCK_Q * GROUP) & (q_idx < q_len)
    q_pos = context_len + q_idx                                  # absolute position: sees keys <= q_pos
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = offs_d < HEAD_DIM
    q_rows = (q_start + q_idx).to(tl.int64) * stride_qt + head * stride_qh

    # Keys this tile needs: up to its last token's position; none for an empty tile.
    kv_end = context_len + tl.minimum(q_lo + BLOCK_Q, q_len)
    kv_end = tl.where(q_lo < q_len, kv_end, 0)
    split_len = tl.cdiv(tl.cdiv(kv_end, NUM_SPLITS), BLOCK_N) * BLOCK_N
    kv_lo = split * split_len
    kv_hi = tl.minimum(kv_lo + split_len, kv_end)

    if ROPE:
        # A decode given its token's q, k, v before RoPE (rotary_store_and_attend): rotate q here; the
        # split that holds the token's own position (kv_end - 1) rotates k, writes k and v into the
        # cache and takes them as its last key from registers, so no other kernel runs in between.
        new_pos = kv_end - 1
        has_new = (new_pos >= kv_lo) & (new_pos < kv_hi)
        loop_hi = tl.minimum(kv_hi, new_pos)
        half = HEAD_DIM // 2
        partner = tl.where(offs_d < half, offs_d + half, offs_d - half)       # rotate-half: x1 <-> x2
        position = tl.load(positions_ptr + q_start).to(tl.int64)
        cos = tl.load(cos_sin_ptr + position * stride_cs + offs_d % half, mask=d_valid, other=0.0)
        sin = tl.load(cos_sin_ptr + position * stride_cs + half + offs_d % half, mask=d_valid, other=0.0)
        sin = tl.where(offs_d < half, -sin, sin)                              # x1 cos - x2 sin | x2 cos + x1 sin
        if WAIT:    # launched early (PDL_BETWEEN): what came before this came from the host; q, k, v
            tl.extra.cuda.gdc_wait()    # are written once this returns
        new_mask = offs_d[None, :] < tl.where(has_new, HEAD_DIM, 0)          # [1, D]: all of d, or none
        new_row = tl.zeros([1], dtype=tl.int64) + q_start.to(tl.int64) * stride_knt + kv_head * stride_knh
        k_new = _rope_rows(k_new_ptr + new_row, offs_d, partner, new_mask, cos, sin, k_norm_ptr, eps,
                           HEAD_DIM, HAS_NORM)                                                  # [1, D]
        k_stored = to_cache(k_new, k_scale, k_cache_ptr, FP8_KV)
        v_row = tl.zeros([1], dtype=tl.int64) + q_start.to(tl.int64) * stride_vnt + kv_head * stride_vnh
        v_new = tl.load(v_new_ptr + v_row[:, None] + offs_d[None, :], mask=new_mask, other=0.0)
        v_stored = to_cache(v_new, v_scale, v_cache_ptr, FP8_KV)                               # [1, D]
        # What a later step reads back from the cache: the token's key and value as stored.
        k_new = _from_cache(k_stored, k_scale, q_ptr.dtype.element_ty, FP8_KV)
        v_new = _from_cache(v_stored, v_scale, q_ptr.dtype.element_ty, FP8_KV)
        q = _rope_rows(q_ptr + q_rows, offs_d, partner, row_valid[:, None] & d_valid[None, :], cos, sin,
                       q_norm_ptr, eps, HEAD_DIM, HAS_NORM)                                      # [BLOCK_M, D]
        slot = tl.load(slot_mapping_ptr + q_start).to(tl.int64)             # -1: a padding row, no write
        store_mask = offs_d[None, :] < tl.where(has_new & (slot >= 0), HEAD_DIM, 0)
        block_of_slot, slot_in_block = tl.maximum(slot, 0) // BLOCK_SIZE, tl.maximum(slot, 0) % BLOCK_SIZE
        k_slot = block_of_slot * stride_kb + slot_in_block * stride_ks + kv_head * stride_kh
        v_slot = block_of_slot * stride_vb + slot_in_block * stride_vs + kv_head * stride_vh
        tl.store(k_cache_ptr + k_slot + offs_d[None, :], k_stored, mask=store_mask)
        tl.store(v_cache_ptr + v_slot + offs_d[None, :] * stride_vd, v_stored, mask=store_mask)
    else:
        loop_hi = kv_hi
        if WAIT:    # launched early (PDL_BETWEEN): q and the cache are written once this returns
            tl.extra.cuda.gdc_wait()
        q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :],
                    mask=row_valid[:, None] & d_valid[None, :], other=0.0)   # [BLOCK_M, D]

    if FP8_KV:    # the codes as they are stored, the scales on the scores and the output (module docstring)
        q_dot, undo = _query_for_codes(q, IEEE)
        score_scale = scale_log2 * k_scale * undo
    else:
        q_dot, score_scale = q, scale_log2
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)          # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                  # running sum of exp2
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for start in tl.range(kv_lo, loop_hi, BLOCK_N, num_stages=NUM_STAGES):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_valid = offs_n < loop_hi
        block = tl.load(table_row + offs_n // BLOCK_SIZE, mask=n_valid, other=0)
        block = tl.maximum(block, 0).to(tl.int64)                # padded (-1) entries are never used
        in_block = offs_n % BLOCK_SIZE
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(k_cache_ptr + (block * stride_kb + in_block * stride_ks + kv_head * stride_kh)[:, None]
                    + offs_d[None, :], mask=kv_mask, other=0.0)          # [BLOCK_N, D]
        if V_KEYS_INNER:
            v = _load_v_keys_inner(v_cache_ptr, table_row, start, loop_hi, kv_head, offs_d, d_valid,
                                   stride_vb, stride_vh, stride_vd, BLOCK_SIZE, BLOCK_N)   # [BLOCK_N, D]
        else:
            v = tl.load(v_cache_ptr + (block * stride_vb + in_block * stride_vs + kv_head * stride_vh)[:, None]
                        + offs_d[None, :], mask=kv_mask, other=0.0)          # [BLOCK_N, D]
        if FP8_KV:
            if IEEE:
                k, v = k.to(tl.float32), v.to(tl.float32)
            else:
                # K's cast is moved past the layout change: its codes are read as the operand straight from
                # shared memory. V's operand is transposed, which 16-bit values take by ldmatrix; V stored
                # keys-innermost is read as K is.
                k, v = k.to(tl.float16), _codes_to_float16(v, CODES_ASM and not V_KEYS_INNER)
        if IEEE:
            s = tl.dot(q_dot, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q_dot, tl.trans(k))
        s = s * score_scale                                              # [BLOCK_M, BLOCK_N]
        visible = n_valid[None, :] & (offs_n[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    if FP8_KV:
        acc = acc * v_scale
    if ROPE:   # the token's own key, last (exp2(-inf) = 0 leaves a split without it unchanged)
        s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32), axis=1) * scale_log2           # [BLOCK_M]
        s_new = tl.where(has_new, s_new, float("-inf"))
        m_new = tl.maximum(m_i, s_new)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s_new - m_new)
        l_i = l_i * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v_new.to(tl.float32)
        m_i = m_new

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    out_rows = (q_start + q_idx).to(tl.int64) * stride_ot + head * stride_oh
    out_mask = row_valid[:, None] & d_valid[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + out_rows[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(out_ptr + (out_rows + split * stride_os)[:, None] + offs_d[None, :], out, mask=out_mask)
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        lse_rows = (q_start + q_idx).to(tl.int64) * stride_lt + head * stride_lh + split
        tl.store(lse_ptr + lse_rows, lse, mask=row_valid)


@triton.jit
def _merge_splits_kernel(partial_ptr, lse_ptr, out_ptr,
                         stride_pt, stride_ph, stride_ps, stride_lt, stride_lh, stride_ot, stride_oh,
                         NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
                         HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, PDL: tl.constexpr = False,
                         WAIT: tl.constexpr = False):
    """One (token, head): the splits' outputs weighted by exp2(lse - max lse)."""
    if PDL:     # a GEMV launched with PDL after this kernel may start now (ops/__init__.py)
        tl.extra.cuda.gdc_launch_dependents()
    if WAIT:    # launched early (PDL_BETWEEN): the attention's splits are written once this returns
        tl.extra.cuda.gdc_wait()
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    s_valid = offs_s < NUM_SPLITS
    lse = tl.load(lse_ptr + token * stride_lt + head * stride_lh + offs_s, mask=s_valid,
                  other=float("-inf"))                                    # [S]
    lse_max = tl.max(lse, axis=0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)            # a row with no keys
    weight = tl.exp2(lse - lse_max)
    weight = weight / tl.maximum(tl.sum(weight, axis=0), 1.0e-30)
    mask = s_valid[:, None] & (offs_d[None, :] < HEAD_DIM)
    partial = tl.load(partial_ptr + token * stride_pt + head * stride_ph + offs_s[:, None] * stride_ps
                      + offs_d[None, :], mask=mask, other=0.0)            # [S, D]
    out = tl.sum(partial * weight[:, None], axis=0)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


@dataclass(frozen=True)
class AttentionKernelConfig:
    """Tile sizes and launch options of `_paged_attention_kernel`."""
    block_m: int        # query rows per program (tokens x group heads), a power of 2 >= 16
    block_n: int        # keys per step of the inner loop
    num_warps: int
    num_stages: int


# An FP8 cache's decode tiles by head_dim: (keys a step, pipeline stages, warps). Head_dim 64 takes 128 keys
# in 2 stages and 4 warps, head_dim 128 64 keys in 3 stages and 2 warps. Measured on an NVIDIA H100
# (tools/attention_probe.py --configs --kv-dtype fp8): first on the head-major grid, where head_dim 64 kept
# bf16's 128 keys and 2 stages (33.7 us at batch 64, context 1,024; 64 keys 39.4, 256 keys 40.0), head_dim
# 128 ran 64 keys (58.4 against 85.2 us with bf16's 3 stages and 4 warps; 128 keys 64.5) and both ran 2
# warps (head_dim 128: 209 against 232 us at context 4,096). Then on the sequence-major grid
# (DECODE_HEADS_TOGETHER), batch 64 and 256, contexts 512 to 2,048: head_dim 64 reads fastest with 4 warps
# at every size (batch 256, context 512: 2.08 against 2.01 TB/s; batch 64, context 1,024: 2.02 against
# 1.94), head_dim 128 in 3 stages (2.36 against 2.27 and 2.62 against 2.50 TB/s at batch 256; 128 keys a
# step 1.79 and 1.96). `bench throughput` with the FP8 cache, two runs each way in one call: Llama-3.2-1B
# 41,160 / 41,207 -> 42,227 / 41,965 output tok/s, Llama-3.1-8B with FP8 weights 11,870 / 11,856 ->
# 11,945 / 11,951.
FP8_DECODE_TILES = {64: (128, 2, 4), 128: (64, 3, 2)}
# A decode step's grid with the KV heads of a sequence as neighbouring programs (sequence-major), so that
# they run at the same time and read one token's rows of K and V (the heads lie side by side in a cache
# block) together; off: head-major, the grid (sequences, KV heads, splits). On an NVIDIA H100, one split,
# tools/attention_probe.py --configs --grids, head-major -> sequence-major at batch 256 and contexts of
# 512 / 2,048 keys: an FP8 cache at head_dim 64 (Llama-3.2-1B) 1.82 -> 2.06 / 1.85 -> 2.35 TB/s, at
# head_dim 128 2.33 -> 2.42 / 2.53 -> 2.65; bfloat16 2.96 -> 2.98 / 3.09 -> 3.12; batch 64 within 1-2%
# either way except head_dim 64's long contexts (2.07 -> 2.21). `bench throughput` with the FP8 cache,
# same call: Llama-3.2-1B 40,656 / 40,791 -> 41,945 / 41,953 output tok/s, Llama-3.1-8B with FP8
# weights 11,927 / 11,948 -> 12,026.
DECODE_HEADS_TOGETHER = True


def decode_config(group: int, head_dim: int = 128, fp8_kv: bool = False) -> AttentionKernelConfig:
    """One token per tile: the rows are the query heads of one KV head.

    Head_dim 128 (Llama-3.1-8B): 64 keys per step, 4 warps, 3 stages (96 KB of shared memory: two
    programs an SM). On an H200 (tools/attention_probe.py --configs) it read the cache 5 to 14%
    faster than 128 keys and 2 stages at batch 64 and 256, contexts 128 to 2048 (batch 64, context
    128: 13.2 against 15.3 us; context 2048: 4.17 against 3.96 TB/s); 32 keys a step, one stage or
    8 warps were slower. Smaller heads (Llama-3.2-1B's 64) keep 128 keys and 2 stages, whose tiles
    are already half the size: the 64-key tile measured 2% slower there on the `throughput`
    workload. (docs/reference/gpu-kernels.md) An FP8 cache: FP8_DECODE_TILES.
    """
    block_m = max(16, triton.next_power_of_2(group))
    if fp8_kv:
        block_n, stages, warps = FP8_DECODE_TILES[64 if head_dim <= 64 else 128]
        return AttentionKernelConfig(block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages)
    if head_dim > 64:
        return AttentionKernelConfig(block_m=block_m, block_n=64, num_warps=4, num_stages=3)
    return AttentionKernelConfig(block_m=block_m, block_n=128, num_warps=4, num_stages=2)


def prefill_config(group: int) -> AttentionKernelConfig:
    return AttentionKernelConfig(block_m=max(64, triton.next_power_of_2(group)), block_n=64,
                                 num_warps=4, num_stages=2)


def decode_kv_splits(batch: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """How many slices to cut each decode's context into, from shapes only (CUDA-graph safe).

    Below two programs per multiprocessor, cut into a power of 2 of slices for about eight
    per multiprocessor, no slice shorter than 256 keys and at most 32 slices. Any split beats
    none by 3-7x at batch 1-4; the best count is not settled yet (docs/reference/gpu-kernels.md).
    """
    programs = batch * num_kv_heads
    if device.type != "cuda" or programs >= 2 * sm_count(device):
        return 1
    splits = min(triton.cdiv(8 * sm_count(device), programs), triton.cdiv(max_context, 256), 32)
    return 1 << (splits.bit_length() - 1)


def _step_kv_splits(metadata: AttentionMetadata, k_cache: torch.Tensor, device: torch.device) -> int:
    """The split count a step gets from its shapes: decode_kv_splits for a decode, else 1."""
    if metadata.max_query_len != 1:
        return 1
    max_context = metadata.block_tables.shape[1] * k_cache.shape[1]     # the table's capacity in tokens
    return decode_kv_splits(metadata.seq_lens.shape[0], k_cache.shape[2], max_context, device)


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           metadata: AttentionMetadata, scale: float, *,
                           num_kv_splits: int | None = None,
                           config: AttentionKernelConfig | None = None,
                           batch_invariant: bool = False, k_scale: float = 1.0,
                           v_scale: float = 1.0) -> torch.Tensor:
    """q [T, Hq, D] -> out [T, Hq, D]; the same contract as `paged_attention_torch`.

    num_kv_splits and config override the choices made from the shapes (tests, tuning).
    batch_invariant: one split and the prefill configuration for every step (see
    `rotary_store_and_attend_triton`). Rows of q that belong to no sequence (past
    query_start_loc[-1]) are left unwritten. k_scale, v_scale: an FP8 cache's scales.
    """
    scales = (k_scale, v_scale)
    if batch_invariant:
        return _attention(q, k_cache, v_cache, metadata, scale, scales, 1, None, None, batch_invariant=True)
    return _attention(q, k_cache, v_cache, metadata, scale, scales, num_kv_splits, config, None)


def rotary_store_and_attend_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                                   cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                   metadata: AttentionMetadata, scale: float,
                                   q_norm_weight: torch.Tensor | None = None,
                                   k_norm_weight: torch.Tensor | None = None, eps: float = 0.0, *,
                                   num_kv_splits: int | None = None, fused: bool | None = None,
                                   batch_invariant: bool = False, k_scale: float = 1.0,
                                   v_scale: float = 1.0) -> torch.Tensor:
    """`rotary_store_and_attend_torch` (ops/rotary.py). A decode step of few sequences runs as one
    kernel, which rotates q and k, writes k and v into the cache and attends, leaving q, k and v as
    they were; any other step as the RoPE + cache-write kernel, then attention.

    Few sequences: the attention splits each context (fewer programs than two per SM), so each
    program is a chain of dependent loads and a kernel less saves its launch and ramp (-2 us a
    layer at batch 1 on an H200). With a full grid the RoPE work inside every attention program
    cost more than the separate kernel (+7 us a layer at batch 256): docs/reference/gpu-kernels.md.
    fused: force the choice (tests).

    batch_invariant: a query's result must not depend on the rest of the step. Then every step, decode
    or not, runs the separate RoPE kernel and the attention kernel in its prefill configuration (the
    same tiles: BLOCK_N keys at a time from key 0, in order, a decode's token alone in its tile), with
    one split. Keys past a row's position add exact zeros to its sums, so a token gets the same bits
    in a decode step, in a prefill chunk of any length or beside any other sequences.

    k_scale, v_scale: an FP8 cache's scales; every path quantizes the new k and v by them."""
    scales = (k_scale, v_scale)
    if batch_invariant:
        q, _ = rotary_and_store_kv_triton(q, k, v, positions, cos_sin_cache, k_cache, v_cache,
                                          metadata.slot_mapping, q_norm_weight, k_norm_weight, eps,
                                          k_scale=k_scale, v_scale=v_scale)
        return _attention(q, k_cache, v_cache, metadata, scale, scales, 1, None, None, batch_invariant=True)
    decode = metadata.max_query_len == 1 and not batch_invariant
    if num_kv_splits is None:
        num_kv_splits = _step_kv_splits(metadata, k_cache, q.device)
    if fused is None:
        fused = decode and num_kv_splits > 1
    if not fused:
        q, _ = rotary_and_store_kv_triton(q, k, v, positions, cos_sin_cache, k_cache, v_cache,
                                          metadata.slot_mapping, q_norm_weight, k_norm_weight, eps,
                                          k_scale=k_scale, v_scale=v_scale)
        return _attention(q, k_cache, v_cache, metadata, scale, scales, num_kv_splits, None, None)
    if not decode:
        raise ValueError("the fused kernel takes decode steps only (one new token per sequence)")
    if k.stride(2) != 1 or v.stride(2) != 1:
        k, v = k.contiguous(), v.contiguous()
    new_token = (k, v, positions.contiguous(), cos_sin_cache, q_norm_weight, k_norm_weight, eps)
    return _attention(q, k_cache, v_cache, metadata, scale, scales, num_kv_splits, None, new_token)


def _attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, metadata: AttentionMetadata,
               scale: float, kv_scales: tuple[float, float], num_kv_splits: int | None,
               config: AttentionKernelConfig | None, new_token: tuple | None,
               batch_invariant: bool = False) -> torch.Tensor:
    """Launch the attention kernel (and the merge of its splits). kv_scales: (k_scale, v_scale), an FP8
    cache's. new_token: a decode's un-rotated
    (k, v, positions, cos_sin_cache, q_norm_weight, k_norm_weight, eps), for the kernel's ROPE path.
    batch_invariant: the prefill configuration for decode steps too."""
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"{num_heads} query heads cannot share {num_kv_heads} KV heads evenly; "
                         "num_attention_heads must be a multiple of num_key_value_heads")
    if q.stride(2) != 1:
        q = q.contiguous()
    group = num_heads // num_kv_heads
    num_seqs = metadata.seq_lens.shape[0]
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)   # [T, Hq, D]
    if num_tokens == 0:
        return out

    decode = metadata.max_query_len == 1 and not batch_invariant
    if config is None:
        config = decode_config(group, head_dim, k_cache.dtype == FP8_DTYPE) if decode else prefill_config(group)
    # Every compile-time constant below comes from the model's shapes and the config, never from the
    # step's (number of sequences, chunk lengths): a step of a new shape must not stop to compile a kernel.
    block_q = 1 if decode else max(1, config.block_m // group)
    block_m = max(16, triton.next_power_of_2(block_q * group))
    num_tiles = num_tokens if block_q == 1 else num_tokens // block_q + num_seqs
    if num_kv_splits is None:
        num_kv_splits = _step_kv_splits(metadata, k_cache, q.device)

    if num_kv_splits == 1:
        partial, lse = out, out          # lse is not written with one split
        partial_strides = (out.stride(0), out.stride(1), 0)
        lse_strides = (0, 0)
    else:
        partial = torch.empty(num_tokens, num_heads, num_kv_splits, head_dim, dtype=torch.float32,
                              device=q.device)                                    # [T, Hq, S, D]
        lse = torch.empty(num_tokens, num_heads, num_kv_splits, dtype=torch.float32,
                          device=q.device)                                        # [T, Hq, S]
        partial_strides = (partial.stride(0), partial.stride(1), partial.stride(2))
        lse_strides = (lse.stride(0), lse.stride(1))

    rope = new_token is not None
    if rope:
        k_new, v_new, positions, cos_sin_cache, q_norm_weight, k_norm_weight, eps = new_token
        has_norm = q_norm_weight is not None
        rope_args = (k_new, v_new, positions, cos_sin_cache, q_norm_weight if has_norm else q,
                     k_norm_weight if has_norm else q, metadata.slot_mapping, eps,
                     k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1), cos_sin_cache.stride(0))
    else:   # unused: any valid pointer will do
        has_norm = False
        rope_args = (q, q, q, q, q, q, q, 0.0, 0, 0, 0, 0, 0)

    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    v_keys_inner = block_size > 1 and v_cache.stride(1) == 1     # an FP8 cache's V (attention.layer_caches)
    heads_together = num_kv_heads if decode and DECODE_HEADS_TOGETHER else 0
    grid = (num_tiles * num_kv_heads, 1, num_kv_splits) if heads_together else (num_tiles, num_kv_heads, num_kv_splits)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, partial, lse,
        metadata.query_start_loc, metadata.seq_lens, metadata.block_tables,
        scale * LOG2_E, num_seqs, *kv_scales,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        *v_cache.stride(),
        *partial_strides, *lse_strides,
        metadata.block_tables.stride(0),
        *rope_args,
        GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=block_size, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=config.block_n,
        BLOCK_B=SEQUENCE_SEARCH_BLOCK, NUM_SPLITS=num_kv_splits, DECODE=decode, ROPE=rope, HAS_NORM=has_norm,
        IEEE=q.dtype == torch.float32, NUM_STAGES=config.num_stages, FP8_KV=k_cache.dtype == FP8_DTYPE,
        CODES_ASM=k_cache.is_cuda, HEADS_TOGETHER=heads_together,
        V_KEYS_INNER=v_keys_inner, **pdl_between(q, "attention"),
        num_warps=config.num_warps)
    if num_kv_splits == 1:
        return out
    _merge_splits_kernel[(num_tokens, num_heads)](
        partial, lse, out,
        partial.stride(0), partial.stride(1), partial.stride(2), lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        NUM_SPLITS=num_kv_splits, SPLITS_PAD=triton.next_power_of_2(num_kv_splits),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, **pdl_between(out, "merge"), num_warps=1)
    return out
