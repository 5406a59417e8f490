"""The Triton kernels compute what their torch references compute, checked on the CPU
under Triton's interpreter (CI has no GPU).

Triton decides when a kernel (and its own standard library: tl.sum, tl.cdiv, ...) is
decorated whether it is compiled or interpreted, that is when `triton` is imported.
So the one test a normal run collects here, `test_triton_kernels_match_references_in_the_interpreter`,
runs this file again in a fresh Python with TRITON_INTERPRET=1 set from the start;
there the kernel cases below are collected instead (`@in_interpreter`). Whatever ran
before, the interpreter is used, and no other test file sees the variable.
Inside, `torch.empty` in the kernel modules fills floating-point buffers with NaN, so
an element a kernel forgets to write shows up. float32 and float16 only: bfloat16 is
broken in the interpreter (it is tested on the GPU, tests/gpu/test_kernels_gpu.py).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from nanovllm.ops import use_numba, use_triton
from nanovllm.ops.activation import silu_and_mul, silu_and_mul_torch
from nanovllm.ops.attention import AttentionMetadata, paged_attention, paged_attention_torch
from nanovllm.ops.rmsnorm import add_rms_norm, add_rms_norm_torch, rms_norm, rms_norm_torch
from nanovllm.ops.rotary import (apply_rotary, apply_rotary_torch, qk_norm_rotary_torch, rope_cos_sin_cache,
                                 rotary_and_store_kv, rotary_and_store_kv_torch, rotary_store_and_attend,
                                 rotary_store_and_attend_torch)
from conftest import IN_INTERPRETER, PoisonedTorch, assert_same_fp8_rows, in_interpreter, run_in_interpreter

KERNEL_MODULES = ("attention_triton", "rmsnorm_triton", "rotary_triton", "activation_triton", "sampling_triton",
                  "matmul_triton", "fp8_rows_triton", "all_reduce_triton")
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3)}


@pytest.mark.interpreter_run
def test_triton_kernels_match_references_in_the_interpreter():
    stdout = run_in_interpreter(__file__)
    assert "skipped" not in stdout, stdout[-2000:]


test_triton_kernels_match_references_in_the_interpreter.__test__ = not IN_INTERPRETER


@pytest.fixture
def kernels(monkeypatch) -> SimpleNamespace:
    """The kernel modules, with poisoned `torch.empty`."""
    import importlib
    modules = {name: importlib.import_module(f"nanovllm.ops.{name}") for name in KERNEL_MODULES}
    for module in modules.values():
        monkeypatch.setattr(module, "torch", PoisonedTorch())
    return SimpleNamespace(**modules)


@in_interpreter
def test_every_kernel_runs_in_the_interpreter(kernels):
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    found = list({id(value): value for module in vars(kernels).values() for value in vars(module).values()
                  if isinstance(value, (InterpretedFunction, JITFunction))}.values())   # once each, if imported
    assert len(found) == 28
    assert all(isinstance(kernel, InterpretedFunction) for kernel in found)


# ---- paged attention -----------------------------------------------------------------------

def make_batch(q_lens: list[int], context_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
               block_size: int, dtype: torch.dtype, seed: int):
    """A batch over a shuffled block pool. Returns q (a view of a fused qkv buffer), the caches
    with every slot no sequence owns set to NaN, the same caches with those slots zeroed (for
    the reference) and the metadata; block tables are padded with -1 past what is needed."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in zip(context_lens, q_lens)]
    blocks_needed = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_needed) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()
    block_tables = torch.full((len(q_lens), max(blocks_needed) + 2), -1, dtype=torch.int32)
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    for b, (seq_len, needed) in enumerate(zip(seq_lens, blocks_needed)):
        owned, order = order[:needed], order[needed:]
        block_tables[b, :needed] = torch.tensor(owned, dtype=torch.int32)
        slots = torch.tensor([owned[i // block_size] * block_size + i % block_size for i in range(seq_len)])
        k_cache.view(-1, num_kv_heads, head_dim)[slots] = torch.randn(
            seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
        v_cache.view(-1, num_kv_heads, head_dim)[slots] = torch.randn(
            seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
    num_tokens = sum(q_lens)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(dtype)
    q = qkv[:, :num_heads * head_dim].view(num_tokens, num_heads, head_dim)      # [T, Hq, D], strided
    query_start_loc = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    metadata = AttentionMetadata(query_start_loc=query_start_loc,
                                 seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                                 slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64),
                                 block_tables=block_tables, max_query_len=max(q_lens), max_seq_len=max(seq_lens))
    return q, k_cache, v_cache, k_cache.nan_to_num(0.0), v_cache.nan_to_num(0.0), metadata


def reference_attention(q, k_clean, v_clean, metadata, scale):
    return paged_attention_torch(q.float(), k_clean.float(), v_clean.float(), metadata, scale)


# (query heads per KV head, KV heads, head_dim): GQA 1, 2, 4, 7; head_dim 80 is not a power of 2.
GQA_SHAPES = [(1, 3, 80), (2, 2, 64), (4, 1, 32), (7, 1, 64)]
MIXED_Q_LENS, MIXED_CONTEXTS = [3, 1, 17, 1], [6, 0, 0, 21]     # chunks of 3 and 17, decodes, a fresh prompt


def small_tiles(kernels):
    """16-key steps and 16-row tiles: several inner-loop steps and several tiles per chunk."""
    return kernels.attention_triton.AttentionKernelConfig(block_m=16, block_n=16, num_warps=4, num_stages=2)


@in_interpreter
@pytest.mark.parametrize("tiles", ["default", "small"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("group,num_kv_heads,head_dim", GQA_SHAPES)
def test_paged_attention_kernel_matches_reference_on_mixed_batches(kernels, group, num_kv_heads, head_dim,
                                                                  block_size, dtype, tiles):
    q, k_cache, v_cache, k_clean, v_clean, metadata = make_batch(
        MIXED_Q_LENS, MIXED_CONTEXTS, group * num_kv_heads, num_kv_heads, head_dim, block_size, dtype, seed=group)
    scale = head_dim ** -0.5
    config = small_tiles(kernels) if tiles == "small" else None
    out = kernels.attention_triton.paged_attention_triton(q, k_cache, v_cache, metadata, scale, config=config)
    torch.testing.assert_close(out.float(), reference_attention(q, k_clean, v_clean, metadata, scale),
                               **TOLERANCE[dtype])


@in_interpreter
@pytest.mark.parametrize("num_kv_splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group,num_kv_heads,head_dim", GQA_SHAPES)
def test_paged_attention_kernel_matches_reference_on_decodes(kernels, group, num_kv_heads, head_dim, dtype,
                                                            num_kv_splits):
    block_size = 4 if group % 2 else 16
    q, k_cache, v_cache, k_clean, v_clean, metadata = make_batch(
        [1, 1, 1], [0, 12, 70], group * num_kv_heads, num_kv_heads, head_dim, block_size, dtype, seed=10 + group)
    scale = head_dim ** -0.5
    out = kernels.attention_triton.paged_attention_triton(q, k_cache, v_cache, metadata, scale,
                                                              num_kv_splits=num_kv_splits,
                                                              config=small_tiles(kernels))
    torch.testing.assert_close(out.float(), reference_attention(q, k_clean, v_clean, metadata, scale),
                               **TOLERANCE[dtype])


@in_interpreter
@pytest.mark.parametrize("num_kv_splits", [1, 3])
def test_padding_rows_of_a_graph_batch_come_out_as_zeros(kernels, num_kv_splits):
    """A CUDA-graph batch padded with dummy sequences (seq_len 0, block table all -1) gives 0 there."""
    q, k_cache, v_cache, k_clean, v_clean, metadata = make_batch([1, 1, 1], [9, 30, 0], 8, 2, 64, 16,
                                                                 torch.float32, seed=5)
    metadata.seq_lens[2] = 0
    metadata.block_tables[2] = -1
    out = kernels.attention_triton.paged_attention_triton(q, k_cache, v_cache, metadata, 0.125,
                                                          num_kv_splits=num_kv_splits)
    real = AttentionMetadata(metadata.query_start_loc[:3], metadata.seq_lens[:2], metadata.slot_mapping[:2],
                             metadata.block_tables[:2], 1, 31)
    torch.testing.assert_close(out[:2], reference_attention(q[:2], k_clean, v_clean, real, 0.125),
                               **TOLERANCE[torch.float32])
    assert torch.equal(out[2], torch.zeros_like(out[2]))


@in_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group,num_kv_heads,head_dim", GQA_SHAPES)
def test_batch_invariant_attention_gives_a_query_the_same_bits_decoded_or_beside_chunks(kernels, group, num_kv_heads,
                                                                                         head_dim, dtype):
    """batch_invariant: the reference's result, and for each query the same bits whether its sequence is
    decoded alone or sits beside prefill chunks (one kernel configuration, keys in the same tiles)."""
    q_lens, contexts = [3, 1, 17, 1], [6, 130, 0, 201]     # decodes past two tiles of keys
    q, k_cache, v_cache, k_clean, v_clean, metadata = make_batch(
        q_lens, contexts, group * num_kv_heads, num_kv_heads, head_dim, 16, dtype, seed=40 + group)
    scale = head_dim ** -0.5
    attend = kernels.attention_triton.paged_attention_triton
    mixed = attend(q, k_cache, v_cache, metadata, scale, batch_invariant=True)
    torch.testing.assert_close(mixed.float(), reference_attention(q, k_clean, v_clean, metadata, scale),
                               **TOLERANCE[dtype])
    starts = metadata.query_start_loc.tolist()
    for b in range(len(q_lens)):   # each sequence in a step of its own
        rows = slice(starts[b], starts[b + 1])
        alone = AttentionMetadata(torch.tensor([0, q_lens[b]], dtype=torch.int32), metadata.seq_lens[b:b + 1],
                                  metadata.slot_mapping[rows], metadata.block_tables[b:b + 1], q_lens[b],
                                  int(metadata.seq_lens[b]))
        assert torch.equal(attend(q[rows], k_cache, v_cache, alone, scale, batch_invariant=True), mixed[rows]), b


@in_interpreter
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,k", [(100, 150), (64, 64), (130, 40)])   # tails in N and K
def test_batch_invariant_matmul_matches_torch_and_gives_a_row_the_same_bits_in_any_batch(kernels, n, k, dtype, bias):
    gen = torch.Generator().manual_seed(n * k)
    x = torch.randn(70, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) * k ** -0.5).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    matmul = kernels.matmul_triton.matmul_batch_invariant_triton
    full = matmul(x, w, b)
    want = x.float() @ w.float().T + (b.float() if bias else 0.0)
    torch.testing.assert_close(full.float(), want, **TOLERANCE[dtype])
    for rows in (1, 5, 64, 65):
        assert torch.equal(matmul(x[:rows], w, b), full[:rows]), f"rows={rows}"
    assert matmul(x.view(7, 10, k), w, b).shape == (7, 10, n)


def decode_step_before_rope(group: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                            context_lens: list[int], seed: int):
    """A decode step as a decoder layer hands it to `rotary_store_and_attend`: q, k, v split from one
    qkv buffer, before RoPE; each sequence's new slot in the caches poisoned (NaN), since the
    kernel must take the new key from registers, not from a slot it has not written yet."""
    num_heads = group * num_kv_heads
    _, k_cache, v_cache, k_clean, v_clean, metadata = make_batch(
        [1] * len(context_lens), context_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(len(context_lens), num_heads + 2 * num_kv_heads, head_dim, generator=gen).to(dtype)
    positions = metadata.seq_lens.long() - 1
    tables = metadata.block_tables
    slots = torch.stack([tables[b, p // block_size].long() * block_size + p % block_size
                         for b, p in enumerate(positions.tolist())])
    metadata.slot_mapping = slots
    for cache in (k_cache, v_cache):
        cache.view(-1, num_kv_heads, head_dim)[slots] = float("nan")
    return qkv, positions, k_cache, v_cache, k_clean, v_clean, metadata


@in_interpreter
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("num_kv_splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group,num_kv_heads,head_dim", GQA_SHAPES)
def test_fused_decode_rotary_store_and_attention_matches_the_steps_in_turn(kernels, group, num_kv_heads, head_dim,
                                                                          dtype, num_kv_splits, qk_norm):
    """One kernel for a decode step: the output of RoPE, then the cache write, then attention; the
    new K and V in their slots; q, k, v and every other slot of the caches left as they were."""
    block_size = 4 if group % 2 else 16
    qkv, positions, k_cache, v_cache, k_clean, v_clean, metadata = decode_step_before_rope(
        group, num_kv_heads, head_dim, block_size, dtype, [0, 12, 70, 5], seed=30 + group)
    cos_sin_cache = rope_cos_sin_cache(head_dim, 128, 10000.0, None)
    norm = (*torch.randn(2, head_dim).to(dtype).unbind(0), 1e-6) if qk_norm else ()
    split = [group * num_kv_heads, num_kv_heads, num_kv_heads]
    scale = head_dim ** -0.5
    before, caches_before = qkv.clone(), (k_cache.clone(), v_cache.clone())
    out = kernels.attention_triton.rotary_store_and_attend_triton(
        *qkv.split(split, dim=1), positions, cos_sin_cache, k_cache, v_cache, metadata, scale, *norm,
        num_kv_splits=num_kv_splits, fused=True)
    q_ref, k_ref, v_ref = qkv.clone().split(split, dim=1)
    rotary_and_store_kv_torch(q_ref, k_ref, v_ref, positions, cos_sin_cache, k_clean, v_clean,
                              metadata.slot_mapping, *norm)
    torch.testing.assert_close(out.float(), reference_attention(q_ref, k_clean, v_clean, metadata, scale),
                               **TOLERANCE[dtype])
    assert torch.equal(qkv, before)
    slots = metadata.slot_mapping
    for cache, ref, old in zip((k_cache, v_cache), (k_clean, v_clean), caches_before):
        flat, flat_ref, flat_old = (c.view(-1, num_kv_heads, head_dim) for c in (cache, ref, old))
        torch.testing.assert_close(flat[slots], flat_ref[slots], **TOLERANCE[dtype])
        others = torch.ones(flat.shape[0], dtype=torch.bool)
        others[slots] = False
        assert torch.equal(flat[others].nan_to_num(7.0), flat_old[others].nan_to_num(7.0))


@in_interpreter
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("num_kv_splits", [1, 3])
def test_a_decode_grid_with_a_sequences_kv_heads_together_gives_the_same_bits(kernels, monkeypatch, num_kv_splits,
                                                                               fused):
    """DECODE_HEADS_TOGETHER lays a decode step's programs out sequence by sequence, a sequence's KV heads
    side by side: each program still attends its own (sequence, KV head), so the output and the cache
    writes are those of the head-major grid, bit for bit (3 KV heads: a program p is p // 3, p % 3)."""
    group, num_kv_heads, head_dim, block_size = 2, 3, 32, 4
    qkv, positions, k_cache, v_cache, *_, metadata = decode_step_before_rope(
        group, num_kv_heads, head_dim, block_size, torch.float32, [0, 12, 70, 5], seed=44)
    cos_sin_cache = rope_cos_sin_cache(head_dim, 128, 10000.0, None)
    q, k, v = qkv.split([group * num_kv_heads, num_kv_heads, num_kv_heads], dim=1)
    results = []
    for together in (False, True):
        monkeypatch.setattr(kernels.attention_triton, "DECODE_HEADS_TOGETHER", together)
        if fused:
            caches = (k_cache.clone(), v_cache.clone())
            out = kernels.attention_triton.rotary_store_and_attend_triton(
                q, k, v, positions, cos_sin_cache, *caches, metadata, head_dim ** -0.5,
                num_kv_splits=num_kv_splits, fused=True)
        else:               # attention alone reads the new token's slot: give it a key and a value
            caches = (k_cache.nan_to_num(0.5), v_cache.nan_to_num(0.5))
            out = kernels.attention_triton.paged_attention_triton(q, *caches, metadata, head_dim ** -0.5,
                                                                  num_kv_splits=num_kv_splits)
        results.append((out, *(cache.nan_to_num(7.0) for cache in caches)))
    assert not results[0][0].isnan().any()
    for apart, together in zip(*results):
        assert torch.equal(apart, together)


@in_interpreter
def test_only_decodes_that_split_their_contexts_take_the_fused_kernel(kernels, monkeypatch):
    """Few sequences (split contexts): one kernel; a full grid, or prefill chunks: RoPE, then attention."""
    fused = []
    attention = kernels.attention_triton._attention

    def recording_attention(*args, **kwargs):
        fused.append(args[-1] is not None)                      # the decode's un-rotated k, v given
        return attention(*args, **kwargs)

    monkeypatch.setattr(kernels.attention_triton, "_attention", recording_attention)
    qkv, positions, _, _, k_clean, v_clean, metadata = decode_step_before_rope(2, 2, 32, 4, torch.float32, [3, 9], 7)
    cos_sin_cache = rope_cos_sin_cache(32, 64, 10000.0, None)
    for splits in (1, 3):
        kernels.attention_triton.rotary_store_and_attend_triton(
            *qkv.clone().split([4, 2, 2], dim=1), positions, cos_sin_cache, k_clean.clone(), v_clean.clone(),
            metadata, 0.2, num_kv_splits=splits)
    metadata.max_query_len = 2                                  # as if a prefill chunk were in the step
    with pytest.raises(ValueError, match="decode steps only"):
        kernels.attention_triton.rotary_store_and_attend_triton(
            *qkv.split([4, 2, 2], dim=1), positions, cos_sin_cache, k_clean, v_clean, metadata, 0.2, fused=True)
    assert fused == [False, True]


@in_interpreter
@pytest.mark.parametrize("num_kv_splits", [1, 3])
def test_fused_decode_leaves_padding_rows_zero_and_writes_nothing_for_them(kernels, num_kv_splits):
    qkv, positions, k_cache, v_cache, k_clean, v_clean, metadata = decode_step_before_rope(
        2, 2, 64, 16, torch.float32, [9, 30, 0], seed=6)
    metadata.seq_lens[2] = 0                                  # a dummy row of a padded graph batch
    metadata.block_tables[2] = -1
    metadata.slot_mapping[2] = -1
    positions[2] = 0
    caches_before = (k_cache.clone(), v_cache.clone())
    out = kernels.attention_triton.rotary_store_and_attend_triton(
        *qkv.split([4, 2, 2], dim=1), positions, rope_cos_sin_cache(64, 64, 10000.0, None), k_cache, v_cache,
        metadata, 0.125, num_kv_splits=num_kv_splits, fused=True)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    written = torch.zeros(k_cache.shape[0] * k_cache.shape[1], dtype=torch.bool)
    written[metadata.slot_mapping[:2]] = True
    for cache, old in zip((k_cache, v_cache), caches_before):
        flat, flat_old = cache.view(written.shape[0], -1), old.view(written.shape[0], -1)
        assert torch.equal(flat[~written].nan_to_num(7.0), flat_old[~written].nan_to_num(7.0))
        assert not flat[written].isnan().any()


@in_interpreter
def test_a_batch_of_more_sequences_than_one_search_block_finds_every_sequence(kernels):
    """70 sequences: a program finds its own among the query starts in two 64-wide passes."""
    q_lens = [1 + (7 * i) % 5 for i in range(70)]                       # chunks of 1-5 tokens, decodes among them
    contexts = [(11 * i) % 9 for i in range(70)]
    q, k_cache, v_cache, k_clean, v_clean, metadata = make_batch(q_lens, contexts, 4, 2, 32, 4, torch.float32,
                                                                 seed=70)
    for config in (None, small_tiles(kernels)):
        out = kernels.attention_triton.paged_attention_triton(q, k_cache, v_cache, metadata, 0.2, config=config)
        torch.testing.assert_close(out, reference_attention(q, k_clean, v_clean, metadata, 0.2),
                                   **TOLERANCE[torch.float32])


@in_interpreter
def test_kernel_constants_depend_on_the_model_not_on_the_step(kernels, monkeypatch):
    """Steps of any number of sequences and chunk lengths launch the same two kernels (prefill, decode)
    per split count: a new batch shape never waits for a compilation while serving."""
    launched = []
    kernel = kernels.attention_triton._paged_attention_kernel

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **constants):
                launched.append(tuple(sorted((k, v) for k, v in constants.items() if k.isupper())))
                return kernel[grid](*args, **constants)
            return launch

    monkeypatch.setattr(kernels.attention_triton, "_paged_attention_kernel", Recorder())
    for num_seqs, q_len in [(1, 3), (2, 17), (5, 2), (9, 40), (33, 1), (3, 1)]:
        q, k_cache, v_cache, *_, metadata = make_batch([q_len] * num_seqs, [5] * num_seqs, 8, 2, 32, 4,
                                                       torch.float32, seed=num_seqs)
        kernels.attention_triton.paged_attention_triton(q, k_cache, v_cache, metadata, 0.2, num_kv_splits=1)
    assert len(set(launched)) == 2


@in_interpreter
@pytest.mark.parametrize("group,num_kv_heads,head_dim", GQA_SHAPES)
def test_split_kv_matches_reference_on_mixed_batches(kernels, group, num_kv_heads, head_dim):
    q, k_cache, v_cache, k_clean, v_clean, metadata = make_batch(
        MIXED_Q_LENS, MIXED_CONTEXTS, group * num_kv_heads, num_kv_heads, head_dim, 4, torch.float32, seed=20)
    scale = head_dim ** -0.5
    out = kernels.attention_triton.paged_attention_triton(q, k_cache, v_cache, metadata, scale,
                                                              num_kv_splits=2, config=small_tiles(kernels))
    torch.testing.assert_close(out, reference_attention(q, k_clean, v_clean, metadata, scale),
                               **TOLERANCE[torch.float32])


# ---- the peer all-reduce -------------------------------------------------------------------
# The interpreter runs one rank's kernel, and its programs one after another, so the other ranks are
# simulated: their buffers hold their chunks and their signals to this rank before the kernel starts.

SENTINEL = 0xA5     # every byte of a slot the kernel must not write


def simulated_ranks(xs: list[torch.Tensor], rank: int, slot: int, programs: int, slot_bytes: int):
    """Every rank's buffer (ops/all_reduce_triton.py's layout) with the other ranks' chunks in `slot`
    and their signals to `rank` set for `programs` programs -> (buffers, flags(r), chunks(r))."""
    from nanovllm.ops.all_reduce_triton import FLAGS_BYTES, MAX_PROGRAMS, NUM_SLOTS
    world_size = len(xs)
    buffers = [torch.full((FLAGS_BYTES + NUM_SLOTS * slot_bytes,), SENTINEL, dtype=torch.uint8)
               for _ in range(world_size)]
    for buffer in buffers:
        buffer[:FLAGS_BYTES] = 0

    def flags(r: int) -> torch.Tensor:         # [MAX_PROGRAMS, WORLD] int32
        return buffers[r][:FLAGS_BYTES].view(torch.int32)[:MAX_PROGRAMS * world_size].view(-1, world_size)

    def slot_bytes_of(r: int, s: int = slot) -> torch.Tensor:   # [slot_bytes] uint8
        start = FLAGS_BYTES + s * slot_bytes
        return buffers[r][start:start + slot_bytes]

    for r, x in enumerate(xs):
        if r != rank:
            slot_bytes_of(r)[:x.numel() * x.element_size()] = x.view(-1).view(torch.uint8)
            flags(rank)[:programs, r] = 1
    return tuple(buffers), flags, slot_bytes_of


@in_interpreter
@pytest.mark.parametrize("world_size, rank", [(2, 0), (2, 1), (4, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("numel, max_programs", [(1, 64), (37, 64), (3001, 2)])   # 3001: 2 programs, 2 chunks each
def test_peer_all_reduce_adds_every_ranks_chunks_in_rank_order_and_leaves_the_flags_zero(kernels, world_size, rank,
                                                                                          dtype, numel, max_programs):
    from nanovllm.ops.all_reduce_triton import BLOCK, NUM_SLOTS, peer_all_reduce_torch
    slot, slot_bytes = 1, 16384
    generator = torch.Generator().manual_seed(numel + rank)
    xs = [torch.randn(numel, generator=generator).to(dtype) * 10 ** r for r in range(world_size)]
    programs = min(-(-numel // BLOCK), max_programs)
    buffers, flags, slot_bytes_of = simulated_ranks(xs, rank, slot, programs, slot_bytes)
    x = xs[rank].clone()
    kernels.all_reduce_triton.peer_all_reduce_triton(x, buffers, rank, slot, torch.zeros(1, dtype=torch.int32),
                                                     slot_bytes, max_programs)
    assert torch.equal(x, peer_all_reduce_torch(xs))
    written = numel * x.element_size()
    assert torch.equal(slot_bytes_of(rank)[:written], xs[rank].view(torch.uint8))     # this rank's chunks, shared
    assert (slot_bytes_of(rank)[written:] == SENTINEL).all()
    assert all((slot_bytes_of(r, s) == SENTINEL).all() for r in range(world_size) for s in range(NUM_SLOTS)
               if s != slot)
    assert (flags(rank) == 0).all()                                   # every peer's signal taken
    for r in range(world_size):                                       # and this rank's signal sent, once a program
        if r != rank:
            assert (flags(r)[:programs, rank] == 1).all() and (flags(r)[programs:] == 0).all()
            assert (flags(r)[:, [c for c in range(world_size) if c != rank]] == 0).all()


@in_interpreter
def test_an_aborted_peer_all_reduce_ends_without_its_peers_and_leaves_x_as_it_was(kernels):
    xs = [torch.randn(100), torch.randn(100)]
    buffers, flags, _ = simulated_ranks(xs, 0, 0, programs=0, slot_bytes=1024)      # no peer has signalled
    x = xs[0].clone()
    kernels.all_reduce_triton.peer_all_reduce_triton(x, buffers, 0, 0, torch.ones(1, dtype=torch.int32), 1024)
    assert torch.equal(x, xs[0])


@in_interpreter
def test_the_peer_all_reduce_refuses_what_its_slots_cannot_hold(kernels):
    buffers, _, _ = simulated_ranks([torch.zeros(1), torch.zeros(1)], 0, 0, 0, slot_bytes=1024)
    abort_flag = torch.zeros(1, dtype=torch.int32)
    for x in (torch.zeros(257), torch.zeros(8, 2)[:, 0], torch.zeros(4, dtype=torch.int32)):
        with pytest.raises(ValueError, match="peer all-reduce takes"):
            kernels.all_reduce_triton.peer_all_reduce_triton(x, buffers, 0, 0, abort_flag, 1024)
    with pytest.raises(ValueError, match="out of range"):
        kernels.all_reduce_triton.peer_all_reduce_triton(torch.zeros(4), buffers, 0, 3, abort_flag, 1024)


# ---- norms, rotary, activation -------------------------------------------------------------

@in_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden", [37, 256])
def test_rms_norm_kernel_matches_reference(kernels, hidden, dtype):
    x = torch.randn(5, hidden).to(dtype) * 3
    weight = torch.randn(hidden).to(dtype)
    out = kernels.rmsnorm_triton.rms_norm_triton(x, weight, 1e-6)
    torch.testing.assert_close(out, rms_norm_torch(x, weight, 1e-6), **TOLERANCE[dtype])


@in_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_kernel_normalizes_each_head_of_a_strided_view(kernels, dtype):
    qkv = torch.randn(3, 10 * 80).to(dtype)
    q = qkv[:, :7 * 80].view(3, 7, 80)                     # [T, Hq, D], row stride 800
    weight = torch.randn(80).to(dtype)
    out = kernels.rmsnorm_triton.rms_norm_triton(q, weight, 1e-5)
    torch.testing.assert_close(out, rms_norm_torch(q, weight, 1e-5), **TOLERANCE[dtype])


@in_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden", [37, 256])
def test_add_rms_norm_kernel_matches_reference(kernels, hidden, dtype):
    x, residual = torch.randn(2, 7, hidden).to(dtype).unbind(0)
    weight = torch.randn(hidden).to(dtype)
    out, new_residual = kernels.rmsnorm_triton.add_rms_norm_triton(x, residual, weight, 1e-6)
    ref_out, ref_residual = add_rms_norm_torch(x, residual, weight, 1e-6)
    torch.testing.assert_close(new_residual, ref_residual, rtol=0, atol=0)
    torch.testing.assert_close(out, ref_out, **TOLERANCE[dtype])


@in_interpreter
@pytest.mark.parametrize("num_partials", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_add_rms_norm_kernel_adds_float32_partial_sums_of_x(kernels, num_partials, dtype):
    """x as S partial products of a split-K matmul (ops/linear.py): summed in float32 with the
    residual and rounded once to the residual's dtype."""
    partials = torch.randn(num_partials, 5, 37)                                      # float32, as bmm writes them
    residual, weight = torch.randn(5, 37).to(dtype), torch.randn(37).to(dtype)
    out, new_residual = kernels.rmsnorm_triton.add_rms_norm_triton(partials, residual, weight, 1e-6)
    ref_out, ref_residual = add_rms_norm_torch(partials, residual, weight, 1e-6)
    assert new_residual.dtype == out.dtype == dtype
    torch.testing.assert_close(new_residual, ref_residual, **TOLERANCE[dtype])
    torch.testing.assert_close(out, ref_out, **TOLERANCE[dtype])
    plain = (partials.double().sum(0) + residual.double()).to(dtype)                # the sum, rounded once
    torch.testing.assert_close(new_residual, plain, **TOLERANCE[dtype])


def rotary_inputs(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, scaled: bool):
    num_tokens = 7
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64} if scaled else None
    cos_sin_cache = rope_cos_sin_cache(head_dim, 300, 10000.0, scaling)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim).to(dtype)
    q = qkv[:, :num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim:(num_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    positions = torch.randint(0, 300, (num_tokens,))
    return qkv, q, k, positions, cos_sin_cache


@in_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,scaled", [(7, 1, 64, True), (3, 3, 80, False),
                                                                     (4, 2, 32, False)])
def test_rotary_kernel_rotates_q_and_k_in_place_like_the_reference(kernels, num_heads, num_kv_heads,
                                                                   head_dim, scaled, dtype):
    qkv, q, k, positions, cos_sin_cache = rotary_inputs(num_heads, num_kv_heads, head_dim, dtype, scaled)
    qkv_ref = qkv.clone()
    q_ref = qkv_ref[:, :q.shape[1] * head_dim].view_as(q)
    k_ref = qkv_ref[:, q.shape[1] * head_dim:(q.shape[1] + k.shape[1]) * head_dim].view_as(k)
    kernels.rotary_triton.apply_rotary_triton(q, k, positions, cos_sin_cache)
    apply_rotary_torch(q_ref, k_ref, positions, cos_sin_cache)
    torch.testing.assert_close(qkv, qkv_ref, **TOLERANCE[dtype])     # v untouched, q and k rotated


@in_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(7, 1, 64), (3, 3, 80)])
def test_fused_qk_norm_rotary_kernel_matches_norm_then_rotary(kernels, num_heads, num_kv_heads, head_dim,
                                                              dtype):
    qkv, q, k, positions, cos_sin_cache = rotary_inputs(num_heads, num_kv_heads, head_dim, dtype, False)
    q_weight, k_weight = torch.randn(2, head_dim).to(dtype).unbind(0)
    qkv_ref = qkv.clone()
    q_ref = qkv_ref[:, :num_heads * head_dim].view_as(q)
    k_ref = qkv_ref[:, num_heads * head_dim:(num_heads + num_kv_heads) * head_dim].view_as(k)
    kernels.rotary_triton.qk_norm_rotary_triton(q, k, positions, cos_sin_cache, q_weight, k_weight, 1e-6)
    qk_norm_rotary_torch(q_ref, k_ref, positions, cos_sin_cache, q_weight, k_weight, 1e-6)
    torch.testing.assert_close(qkv, qkv_ref, **TOLERANCE[dtype])


def rotary_and_store_inputs(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                            dtype: torch.dtype, seed: int):
    """What a decoder layer hands `rotary_and_store_kv`: q, k, v split from one qkv buffer
    [T, Hq + 2 Hkv, D] as llama.py splits it, positions that are a strided view, and a slot
    mapping with padding rows (-1). The caches are random and sit behind a guard block, so a
    write meant to be skipped (slot -1 lands just before the cache) shows up in the buffer."""
    gen = torch.Generator().manual_seed(seed)
    num_tokens, num_blocks = 9, 5
    cos_sin_cache = rope_cos_sin_cache(head_dim, 300, 10000.0, None)
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, generator=gen).to(dtype)
    positions = torch.randint(0, 300, (2 * num_tokens,), generator=gen)[::2]        # [T], stride 2
    slot_mapping = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slot_mapping[[2, 7]] = -1
    cache_buffers = torch.randn(2, 1 + num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    return qkv, positions, cos_sin_cache, slot_mapping, cache_buffers


@in_interpreter
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(7, 1, 64), (3, 3, 80)])
def test_rotary_and_store_kv_kernel_matches_rotary_then_store(kernels, num_heads, num_kv_heads, head_dim,
                                                              block_size, dtype, qk_norm):
    """q and k rotated in place (after the per-head norm for Qwen3), rotated k and v written at
    their slots, padding rows (-1) and every other cache row left as they were."""
    qkv, positions, cos_sin_cache, slot_mapping, cache_buffers = rotary_and_store_inputs(
        num_heads, num_kv_heads, head_dim, block_size, dtype, seed=block_size + num_heads)
    norm = (*torch.randn(2, head_dim).to(dtype).unbind(0), 1e-6) if qk_norm else ()
    qkv_ref, cache_buffers_ref = qkv.clone(), cache_buffers.clone()
    for buffer, caches, op in [(qkv, cache_buffers, kernels.rotary_triton.rotary_and_store_kv_triton),
                               (qkv_ref, cache_buffers_ref, rotary_and_store_kv_torch)]:
        q, k, v = buffer.split([num_heads, num_kv_heads, num_kv_heads], dim=1)
        k_cache, v_cache = caches[:, 1:]                                        # behind the guard block
        q_out, k_out = op(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, *norm)
        assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()
    torch.testing.assert_close(qkv, qkv_ref, **TOLERANCE[dtype])                 # q, k rotated; v untouched
    torch.testing.assert_close(cache_buffers[0], cache_buffers_ref[0], **TOLERANCE[dtype])   # k cache
    assert torch.equal(cache_buffers[1], cache_buffers_ref[1])                                # v cache
    written = torch.zeros(cache_buffers.shape[1:3], dtype=torch.bool)
    written[1:].view(-1)[slot_mapping[slot_mapping >= 0]] = True
    assert torch.equal(cache_buffers[:, ~written], cache_buffers_ref[:, ~written])   # the rest, bit for bit


@in_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("intermediate", [45, 1100])
def test_silu_and_mul_kernel_matches_reference(kernels, intermediate, dtype):
    x = (torch.randn(3, 2 * intermediate) * 4).to(dtype)
    out = kernels.activation_triton.silu_and_mul_triton(x)
    torch.testing.assert_close(out, silu_and_mul_torch(x), **TOLERANCE[dtype])


@in_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("intermediate", [40, 1096])
def test_silu_and_mul_adds_up_partial_products_as_sum_partials_does(kernels, intermediate, dtype):
    """Given gate_up_proj's float32 partial products over K, SiLU-and-mul adds them up in the order
    sum_partials does and rounds them as its output: the bits of sum_partials then SiLU-and-mul; and
    the torch reference's (the CPU's) add up to the same."""
    from nanovllm.ops.activation import silu_and_mul
    from nanovllm.ops.quant_linear_triton import sum_partials

    partials = torch.randn(3, 5, 2 * intermediate, generator=torch.Generator().manual_seed(intermediate)) * 4
    silu = kernels.activation_triton.silu_and_mul_triton
    summed = sum_partials(partials, dtype)                                            # [5, 2 I] in dtype
    assert torch.equal(silu(partials, partials_dtype=dtype), silu(summed))
    assert torch.equal(silu_and_mul(partials, partials_dtype=dtype), silu_and_mul_torch(summed))


@in_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("features", [37, 1100])
def test_norms_and_silu_and_mul_write_the_rows_the_product_after_them_asks_for(kernels, features, dtype,
                                                                               monkeypatch):
    """fp8=True: the kernel writes the e4m3 codes and row scales that quantizing its 16-bit output
    would give (quantize_fp8_rows_triton, itself tested against the torch reference in
    test_quant_kernels.py): the same bits, a row of zeros included; SiLU-and-mul's rows wider than
    one program takes go through the two kernels."""
    generator = torch.Generator().manual_seed(features)
    x = (torch.randn(5, features, generator=generator) * torch.linspace(0.5, 8, 5)[:, None]).to(dtype)
    x[2] = 0.0
    weight = torch.randn(features, generator=generator).to(dtype)
    norms = kernels.rmsnorm_triton
    assert_same_fp8_rows(norms.rms_norm_triton(x, weight, 1e-6, fp8=True), norms.rms_norm_triton(x, weight, 1e-6))
    partials = torch.randn(3, 5, features, generator=generator)                     # float32 partial sums of x
    residual = torch.randn(5, features, generator=generator).to(dtype)
    for given in (x, partials):
        rows, new_residual = norms.add_rms_norm_triton(given, residual, weight, 1e-6, fp8=True)
        plain, plain_residual = norms.add_rms_norm_triton(given, residual, weight, 1e-6)
        assert_same_fp8_rows(rows, plain)
        assert torch.equal(new_residual, plain_residual)
    gate_up = (torch.randn(5, 2 * features, generator=generator) * 4).to(dtype)
    gate_up[4] = 0.0
    silu = kernels.activation_triton.silu_and_mul_triton
    assert_same_fp8_rows(silu(gate_up, fp8=True), silu(gate_up))
    monkeypatch.setattr(kernels.activation_triton, "FP8_MAX_FEATURES", 32)
    assert_same_fp8_rows(silu(gate_up, fp8=True), silu(gate_up))


def test_rows_for_a_product_are_refused_where_they_cannot_be_laid_out():
    """Fp8Rows are [T, K]: anything else is refused with the reason, before a kernel writes out of
    bounds."""
    pytest.importorskip("triton")
    from nanovllm.ops.fp8_rows_triton import empty_rows

    with pytest.raises(ValueError, match=r"fp8 rows are \[T, K\]; got a \(2, 3, 8\) output"):
        empty_rows((2, 3, 8), torch.float16, torch.device("cpu"), fp8=True)


@in_interpreter
@pytest.mark.parametrize("vocab_size", [7, 2048, 5001])
def test_exponential_race_kernel_draws_the_reference_tokens(kernels, vocab_size):
    from nanovllm.ops.sampling import exponential_race_torch
    gen = torch.Generator().manual_seed(vocab_size)
    scores = torch.randn(5, vocab_size, generator=gen) * 3
    scores[1, : vocab_size // 2] = float("-inf")              # a masked row (top-k / top-p)
    scores[2, :-1] = float("-inf")                             # only the last token left
    keys = torch.randint(0, 2**32, (5,), generator=gen, dtype=torch.int64)
    for step in range(4):
        keys = (keys * 7 + step) % 2**32
        expected = exponential_race_torch(scores, keys)
        assert torch.equal(kernels.sampling_triton.exponential_race_triton(scores, keys), expected)
    assert expected[1] >= vocab_size // 2 and expected[2] == vocab_size - 1


@in_interpreter
@pytest.mark.parametrize("vocab_size", [7, 2048, 5001])
@pytest.mark.parametrize("greedy", [True, False])
def test_fused_sampling_kernel_gives_the_reference_tokens_logprobs_and_log_normalizer(kernels, vocab_size, greedy):
    from nanovllm.ops.sampling import sample_from_logits_torch
    gen = torch.Generator().manual_seed(vocab_size + greedy)
    logits = torch.randn(5, vocab_size, generator=gen) * 4 + torch.arange(5)[:, None] * 30.0   # rows far apart
    logits[3, vocab_size // 3] = 1000.0                                # one dominant token
    temperature = torch.tensor([0.3, 0.7, 1.0, 1.3, 2.0])
    keys = torch.randint(0, 2**32, (5,), generator=gen, dtype=torch.int64)
    for step in range(3):
        keys = (keys * 7 + step) % 2**32
        args = (None, None) if greedy else (keys, temperature)
        expected_tokens, expected_logprobs, expected_lse = sample_from_logits_torch(logits, *args)
        for num_splits in (None, 1, 2, 3):     # 5001 tokens: 5 chunks of 1024 at most
            tokens, logprobs, lse = kernels.sampling_triton.sample_from_logits_triton(logits, *args,
                                                                                      num_splits=num_splits)
            assert torch.equal(tokens, expected_tokens)
            torch.testing.assert_close(lse, expected_lse, rtol=1e-6, atol=1e-5)
            torch.testing.assert_close(logprobs, expected_logprobs, rtol=1e-6, atol=1e-5)
    assert not greedy or tokens[3] == vocab_size // 3


@in_interpreter
@pytest.mark.parametrize("greedy", [True, False])
def test_fused_sampling_kernel_reads_half_precision_logits_with_strided_rows(kernels, greedy):
    """The model's logits as they come: float16 here (bfloat16 on the GPU), rows of a wider buffer
    (tensor parallelism pads the vocabulary); the same results as the float32 reference."""
    from nanovllm.ops.sampling import sample_from_logits_torch
    gen = torch.Generator().manual_seed(7)
    padded = (torch.randn(4, 3000 + 13, generator=gen) * 4).half()
    logits = padded[:, :3000]                                          # [4, 3000], row stride 3013
    keys = torch.randint(0, 2**32, (4,), generator=gen, dtype=torch.int64)
    args = (None, None) if greedy else (keys, torch.tensor([0.5, 0.8, 1.0, 1.7]))
    tokens, logprobs, lse = kernels.sampling_triton.sample_from_logits_triton(logits, *args)
    expected_tokens, expected_logprobs, expected_lse = sample_from_logits_torch(logits, *args)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(logprobs, expected_logprobs, rtol=1e-6, atol=1e-5)


@in_interpreter
def test_fused_sampling_takes_the_argmax_on_rows_of_temperature_zero(kernels):
    """A decode graph samples greedy and random rows in one pass: temperature 0 marks a greedy row."""
    from nanovllm.ops.sampling import first_argmax, sample_from_logits_torch
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 3000, generator=gen) * 3
    keys = torch.randint(0, 2**32, (6,), generator=gen, dtype=torch.int64)
    temperature = torch.tensor([0.0, 0.7, 0.0, 1.0, 1.5, 0.0])
    expected_tokens, expected_logprobs, expected_lse = sample_from_logits_torch(logits, keys, temperature)
    greedy = temperature == 0
    assert torch.equal(expected_tokens[greedy], first_argmax(logits)[greedy])
    random_rows = sample_from_logits_torch(logits[~greedy], keys[~greedy], temperature[~greedy])[0]
    assert torch.equal(expected_tokens[~greedy], random_rows)
    tokens, logprobs, lse = kernels.sampling_triton.sample_from_logits_triton(logits, keys, temperature)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(logprobs, expected_logprobs, rtol=1e-6, atol=1e-5)


@in_interpreter
def test_fused_sampling_writes_into_the_buffers_it_is_given(kernels):
    """The runner's SampleBuffers: token ids and float32 log-probabilities packed in one int64 tensor;
    the kernel fills the views it is handed (poisoned first) and returns them."""
    from nanovllm.ops.sampling import sample_from_logits_torch
    from nanovllm.runner.sampler import SampleBuffers
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(3, 2500, generator=gen) * 3
    buffers = SampleBuffers(8, "cpu")
    buffers.packed.fill_(-7)
    out = (buffers.token_ids[:3], buffers.logprobs[:3])
    tokens, logprobs, _ = kernels.sampling_triton.sample_from_logits_triton(logits, None, None, out=out)
    expected_tokens, expected_logprobs, _ = sample_from_logits_torch(logits, None, None)
    assert tokens.data_ptr() == out[0].data_ptr() and logprobs.data_ptr() == out[1].data_ptr()
    assert torch.equal(buffers.token_ids[:3], expected_tokens)
    torch.testing.assert_close(buffers.logprobs[:3], expected_logprobs, rtol=1e-6, atol=1e-5)
    assert (buffers.token_ids[3:] == -7).all()                          # rows past the batch untouched


@in_interpreter
def test_fused_sampling_breaks_ties_towards_the_first_token(kernels):
    """A winner tied across chunks, or across the lanes of one chunk, is the lowest token, as torch.argmax's."""
    logits = torch.zeros(3, 5000)
    logits[:2, [100, 2100, 4500]] = 5.0
    logits[1, 4500] = 6.0
    logits[2, [1500, 500, 2548]] = 3.0     # tokens 500 and 2548 share a lane (1024 apart twice), 1500 another
    for num_splits in (1, 2, 3, 5):
        tokens, _, _ = kernels.sampling_triton.sample_from_logits_triton(logits, None, None, num_splits=num_splits)
        assert tokens.tolist() == [100, 4500, 500]


def test_dispatchers_send_cpu_tensors_to_the_torch_references():
    """On the CPU every public op returns exactly what its reference returns."""
    assert not use_triton(torch.zeros(1))
    q, k_cache, v_cache, k_clean, v_clean, metadata = make_batch(MIXED_Q_LENS, MIXED_CONTEXTS, 4, 2, 32, 4,
                                                                 torch.float32, seed=3)
    assert torch.equal(paged_attention(q, k_clean, v_clean, metadata, 0.2),
                       paged_attention_torch(q, k_clean, v_clean, metadata, 0.2))
    x = torch.randn(4, 37)
    assert torch.equal(rms_norm(x, torch.ones(37), 1e-6), rms_norm_torch(x, torch.ones(37), 1e-6))
    assert torch.equal(add_rms_norm(x, x, torch.ones(37), 1e-6)[0], add_rms_norm_torch(x, x, torch.ones(37), 1e-6)[0])
    assert torch.equal(silu_and_mul(x[:, :36]), silu_and_mul_torch(x[:, :36]))
    _, q1, k1, positions, cache = rotary_inputs(4, 2, 32, torch.float32, False)
    q2, k2 = q1.clone(), k1.clone()
    apply_rotary(q1, k1, positions, cache)
    apply_rotary_torch(q2, k2, positions, cache)
    assert torch.equal(q1, q2) and torch.equal(k1, k2)
    weight = torch.randn(32)
    qkv, positions, cos_sin, slots, caches = rotary_and_store_inputs(4, 2, 32, 4, torch.float32, seed=3)
    for norm in [(), (weight, weight, 1e-6)]:
        outputs = []
        for op in (rotary_and_store_kv, rotary_and_store_kv_torch):
            buffer, cache_buffers = qkv.clone(), caches.clone()
            q, k, v = buffer.split([4, 2, 2], dim=1)
            op(q, k, v, positions, cos_sin, *cache_buffers[:, 1:], slots, *norm)
            outputs.append((buffer, cache_buffers))
        assert all(torch.equal(a, b) for a, b in zip(*outputs))
    qkv, positions, _, _, k_clean, v_clean, metadata = decode_step_before_rope(2, 2, 32, 4, torch.float32, [3, 9], 4)
    outputs = []
    for op in (rotary_store_and_attend, rotary_store_and_attend_torch):
        caches = (k_clean.clone(), v_clean.clone())
        outputs.append((op(*qkv.clone().split([4, 2, 2], dim=1), positions, cos_sin, *caches, metadata, 0.2),
                        *caches))
    # With numba installed, float32 attention on the CPU is attention_numba's (batch-invariant): the
    # caches it writes are the reference's bit for bit, its softmax sums in its own order.
    (out, k_cache, v_cache), (out_ref, k_ref, v_ref) = outputs
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    if use_numba(out, k_cache):
        torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(out, out_ref)
