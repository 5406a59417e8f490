"""The FP8, W4A16 and W8A16 Triton kernels compute what their torch references compute: under
Triton's interpreter at small odd shapes (this file runs itself again with TRITON_INTERPRET=1,
as test_ops_triton.py does), and compiled for Hopper (sm_90) without a GPU.

The interpreter's float -> e4m3 cast drops the carry when a value rounds up to a power of
two (124.7 becomes 64, not 128) and rounds subnormals (below 2^-6) down; the GPU's cast does
neither. So the interpreter checks the per-row quantization kernel's scales exactly and its
codes wherever the reference code is a normal number and not a power of two, and the FP8 GEMM
on codes quantized by torch; tests/gpu/test_quant_gpu.py checks the whole op.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from nanovllm.ops.quant_linear import (fp8_w8a8_linear_torch, fp8_weight_only_linear_torch, pack_int4,
                                       quantize_fp8_per_channel, quantize_fp8_per_token_torch, w4a16_linear_torch,
                                       w8a16_linear_torch)
from conftest import IN_INTERPRETER, in_interpreter, run_in_interpreter

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3)}


@pytest.mark.interpreter_run
def test_quant_kernels_match_references_in_the_interpreter():
    stdout = run_in_interpreter(__file__)
    assert "skipped" not in stdout, stdout[-2000:]


test_quant_kernels_match_references_in_the_interpreter.__test__ = not IN_INTERPRETER


def four_bit_weight(num_rows: int, in_features: int, group_size: int, seed: int = 0, offsets: bool = False):
    """Random (qweight [N, K / 8] int32, scales [N, G] float32, zeros [N, G] uint8, or with
    offsets float32 offsets as GGUF's 4-bit blocks have)."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (num_rows, in_features), generator=generator)
    groups = in_features // group_size
    scales = torch.rand(num_rows, groups, generator=generator) * 0.1 + 0.01
    zeros = torch.randint(0, 16, (num_rows, groups), generator=generator).to(torch.uint8)
    if offsets:
        zeros = zeros.float() * scales + torch.rand(num_rows, groups, generator=generator) * 0.01
    return pack_int4(codes), scales, zeros


@in_interpreter
@pytest.mark.parametrize("offsets", [False, True], ids=["zero-points", "offsets"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_rows,out_features,in_features,group_size,bias", [
    (1, 37, 256, 128, False), (3, 37, 256, 32, False), (7, 50, 96, 32, True), (33, 19, 128, 64, False),
    (70, 45, 64, 64, True), (9, 21, 384, 128, True),
    (1, 37, 1024, 32, False), (1, 19, 2048, 128, True),    # one row: [8, 512], [16, 512] steps
    (1, 13, 4608, 32, False),   # one row, groups of 32, 9 steps of 512: K split in two
    (2, 21, 384, 48, False),    # a group that 128 does not divide: the GEMV steps 16
])
def test_w4a16_kernel_matches_reference(dtype, num_rows, out_features, in_features, group_size, bias, offsets,
                                        poisoned_outputs):
    """tl.dot multiplies the weight rounded to x's dtype, as the reference does; the GEMV kernels
    (a few rows: on the FMA units, or on the tensor cores with the weight q - z exact in 16 bits and
    the group's scale applied to the float32 sum) multiply it as the reference does given float32 x.
    The tensor-core GEMV is checked in float16 only: the interpreter's bfloat16 tl.dot is wrong."""
    from nanovllm.ops.quant_linear_triton import (GEMV_MAX_ROWS, Tiles, sum_partials, takes_w4a16_dot_gemv,
                                                  w4a16_linear_partials_triton, w4a16_linear_tiles,
                                                  w4a16_linear_triton)

    x = torch.randn(num_rows, in_features, dtype=dtype, generator=torch.Generator().manual_seed(num_rows))
    qweight, scales, zeros = four_bit_weight(out_features, in_features, group_size, offsets=offsets)
    b = torch.randn(out_features, dtype=dtype) if bias else None
    by_dot = w4a16_linear_torch(x, qweight, scales, zeros, b)
    by_gemv = w4a16_linear_torch(x.float(), qweight, scales, zeros, b).to(dtype)
    expected = by_gemv if num_rows <= GEMV_MAX_ROWS or takes_w4a16_dot_gemv(x, zeros, group_size) else by_dot
    torch.testing.assert_close(w4a16_linear_triton(x, qweight, scales, zeros, b), expected, **TOLERANCE[dtype])
    partials = w4a16_linear_partials_triton(x, qweight, scales, zeros, b)    # [S, M, N] float32 at a few rows
    torch.testing.assert_close(sum_partials(partials, dtype), expected, **TOLERANCE[dtype])
    # the GEMV kernel, 4 rows at a time (loading each step's words ahead, or not); tl.dot's. Steps of 16
    # along K are slow in the interpreter, so these take at most 9 rows (tiles of 4 and 16 still end
    # part-full), none of the long one-row K's, which are there for the engine's tiles above, and float32
    # x only (float16 x takes the same code, through the engine's tiles above)
    rows = min(num_rows, 9)
    small_tiles = (((4, by_gemv, False), (4, by_gemv, True), (16, by_dot, False))
                   if in_features < 1024 and dtype == torch.float32 else ())
    for block_m, expected, prefetch in small_tiles:
        split = Tiles(block_m, 16, 16, split_k=3, prefetch=prefetch)   # K split unevenly: the last split has fewer steps, or none
        partials = w4a16_linear_tiles(x[:rows], qweight, scales, zeros, b, split)
        assert partials.shape == (3, rows, out_features) and partials.dtype == torch.float32
        torch.testing.assert_close(partials.sum(0).to(dtype), expected[:rows], **TOLERANCE[dtype])
    if 64 % group_size == 0 and group_size < 64 and in_features % 64 == 0:     # two groups a step: a scale a run
        partials = w4a16_linear_tiles(x, qweight, scales, zeros, b, Tiles(4, 16, 64, split_k=3, prefetch=True))
        torch.testing.assert_close(partials.sum(0).to(dtype), by_gemv, **TOLERANCE[dtype])
    if dtype == torch.float16 and not offsets and group_size % 128 == 0:   # the tensor-core GEMV, up to 16 rows
        for split_k in (1, 3):
            out = w4a16_linear_tiles(x, qweight, scales, zeros, b, Tiles(16, 16, 128, split_k, planes=True))
            torch.testing.assert_close(out.sum(0).to(dtype) if split_k > 1 else out, by_gemv, **TOLERANCE[dtype])


@in_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_features,in_features,group_size,bias,offsets", [
    (37, 256, 128, False, False), (130, 512, 256, True, False), (8, 384, 128, True, False),
    (37, 256, 32, False, True), (19, 384, 32, True, False),      # GGUF's groups of 32: a group a thread
])
def test_w4a16_row_gemv_matches_reference(dtype, out_features, in_features, group_size, bias, offsets,
                                          poisoned_outputs, monkeypatch):
    """The one-row GEMV with many rows' words a thread multiplies as the reference does given float32 x:
    unsplit, with K split unevenly (the last split has fewer steps, or none) and with the bias; steps
    of 128 to 512 (several groups a step: a group a thread); widths its tiles do not divide; and
    w4a16_linear_triton takes it at one row on a layer of more than ROW_GEMV_MIN_WEIGHTS (integer
    zero points and groups its steps divide, or GGUF's groups of 32 with offsets or zero points), and
    not at two rows, nor with float offsets in larger groups."""
    from nanovllm.ops import quant_linear_triton as kernels

    x = torch.randn(1, in_features, dtype=dtype, generator=torch.Generator().manual_seed(out_features))
    qweight, scales, zeros = four_bit_weight(out_features, in_features, group_size, offsets=offsets)
    b = torch.randn(out_features, dtype=dtype) if bias else None
    expected = w4a16_linear_torch(x.float(), qweight, scales, zeros, b)                # [1, N] float32
    tolerance = {torch.bfloat16: dict(rtol=1e-2, atol=1e-2), **TOLERANCE}[dtype]      # the output's rounding
    for block_k, rows, warps, split_k in ((128, 1, 1, 1), (128, 2, 1, 3), (128, 1, 2, 2), (256, 1, 1, 3), (512, 2, 1, 1)):
        if in_features % block_k:
            continue
        lanes_along_n = 32 // (block_k // 32)     # a thread's four words are 32 weights along K
        tiles = kernels.Tiles(1, lanes_along_n * rows * warps, block_k, split_k, num_warps=warps, num_stages=1,
                              row_gemv=True)
        out = kernels.w4a16_linear_tiles(x, qweight, scales, zeros, b, tiles)
        if split_k > 1:        # float32 partials [S, 1, N]
            torch.testing.assert_close(out.sum(0), expected, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(out, expected.to(dtype), **tolerance)
    monkeypatch.setattr(kernels, "ROW_GEMV", True)
    monkeypatch.setattr(kernels, "ROW_GEMV_BLOCK_K", 128)
    monkeypatch.setattr(kernels, "ROW_GEMV_MIN_WEIGHTS", out_features * in_features)
    assert not kernels.takes_w4a16_row_gemv(x, zeros, group_size)          # a layer too small for it
    monkeypatch.setattr(kernels, "ROW_GEMV_MIN_WEIGHTS", out_features * in_features - 1)
    assert kernels.takes_w4a16_row_gemv(x, zeros, group_size)
    assert not kernels.takes_w4a16_row_gemv(torch.cat([x, x]), zeros, group_size)
    assert kernels.takes_w4a16_row_gemv(x, scales.float(), group_size) == (group_size == 32)   # offsets
    assert not kernels.takes_w4a16_row_gemv(x[:, :in_features - 64], zeros, 64)
    chosen, choose = [], kernels.choose_w4a16_row_tiles
    monkeypatch.setattr(kernels, "choose_w4a16_row_tiles", lambda *args: chosen.append(choose(*args)) or chosen[-1])
    torch.testing.assert_close(kernels.w4a16_linear_triton(x, qweight, scales, zeros, b), expected.to(dtype),
                               **tolerance)
    assert chosen and chosen[0].row_gemv


@in_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("intermediate,in_features,group_size,offsets", [
    (37, 256, 128, False), (21, 512, 256, False), (13, 256, 32, True),     # GGUF's groups of 32, offsets
])
def test_w4a16_gated_row_gemv_is_silu_and_mul_of_the_row_gemv(dtype, intermediate, in_features, group_size, offsets,
                                                              poisoned_outputs, monkeypatch):
    """gate_up_proj's one-row W4A16 GEMV with silu(gate) * up in its epilogue: the same bits as the row
    GEMV followed by the SiLU-and-mul kernel (each rounding where the two kernels round), and close to
    the torch reference. The gate reaches both signs and a few units, where silu bends; outputs past the
    last full tile (37, 21, 13) are masked, and each up row sits `intermediate` rows below its gate row.
    w4a16_linear_silu_and_mul_triton takes it where the row GEMV takes the layer unsplit, and answers
    None (the caller runs the two kernels) with a bias or at two rows."""
    from nanovllm.ops import quant_linear_triton as kernels
    from nanovllm.ops.activation import silu_and_mul_torch
    from nanovllm.ops.activation_triton import silu_and_mul_triton

    x = (torch.randn(1, in_features, generator=torch.Generator().manual_seed(intermediate)) * 0.3).to(dtype)
    qweight, scales, zeros = four_bit_weight(2 * intermediate, in_features, group_size, offsets=offsets)
    expected = silu_and_mul_torch(w4a16_linear_torch(x, qweight, scales, zeros))
    assert (expected < -0.01).any() and (expected > 0.01).any()
    for block_k, rows, warps in ((128, 1, 1), (256, 2, 1), (128, 1, 2)):
        lanes_along_n = 32 // (block_k // 32)
        tiles = kernels.Tiles(1, lanes_along_n * rows * warps, block_k, num_warps=warps, num_stages=1, row_gemv=True)
        gated = kernels.w4a16_linear_tiles(x, qweight, scales, zeros, None, tiles, gated=True)
        assert gated.shape == (1, intermediate) and gated.dtype == dtype
        plain = kernels.w4a16_linear_tiles(x, qweight, scales, zeros, None, tiles)
        assert torch.equal(gated, silu_and_mul_triton(plain))
        torch.testing.assert_close(gated, expected, rtol=2e-2, atol=2e-2)    # x and the weight rounded to dtype
    split = kernels.Tiles(1, 4, 128, split_k=2, num_warps=1, num_stages=1, row_gemv=True)
    with pytest.raises(ValueError, match="unsplit"):
        kernels.w4a16_linear_tiles(x, qweight, scales, zeros, None, split, gated=True)
    monkeypatch.setattr(kernels, "ROW_GEMV_BLOCK_K", 128)
    monkeypatch.setattr(kernels, "ROW_GEMV_MIN_WEIGHTS", 0)
    monkeypatch.setattr(kernels, "GEMV_MAX_SPLITS", 1)
    fused = kernels.w4a16_linear_silu_and_mul_triton(x, qweight, scales, zeros)
    assert fused is not None and torch.equal(fused, gated)
    bias = torch.randn(2 * intermediate).to(dtype)
    assert kernels.w4a16_linear_silu_and_mul_triton(x, qweight, scales, zeros, bias) is None
    assert kernels.w4a16_linear_silu_and_mul_triton(torch.cat([x, x]), qweight, scales, zeros) is None
    monkeypatch.setattr(kernels, "FUSED_SILU", False)
    assert kernels.w4a16_linear_silu_and_mul_triton(x, qweight, scales, zeros) is None
    monkeypatch.setattr(kernels, "ROW_GEMV_PROGRAMS_PER_SM", 16)     # the interpreter counts 2 SMs
    assert kernels._one_wave((1, 16, 2), x.device) and not kernels._one_wave((1, 33, 1), x.device)


@in_interpreter
@pytest.mark.parametrize("offsets", [False, True], ids=["zero-points", "offsets"])
@pytest.mark.parametrize("num_rows,out_features,in_features,group_size,tile", [
    (1, 37, 256, 128, (1, 16, 128, 1)), (1, 37, 1024, 32, (1, 8, 512, 2)), (1, 19, 2048, 128, (1, 16, 512, 1)),
    (2, 21, 384, 128, (2, 16, 128, 3)),     # two rows, K split unevenly
    (3, 13, 512, 32, (4, 16, 128, 2)),      # a row past M in the tile
])
def test_w4a16_gemv_loads_ahead_or_not_to_the_same_bits(num_rows, out_features, in_features, group_size, tile,
                                                        offsets, poisoned_outputs):
    """The GEMV with each step's words loaded ahead (PREFETCH) or loaded in the step multiplies the
    same values in the same order: the same bits, and the reference's product."""
    from nanovllm.ops.quant_linear_triton import Tiles, w4a16_linear_tiles

    x = torch.randn(num_rows, in_features, generator=torch.Generator().manual_seed(in_features)).to(torch.float16)
    qweight, scales, zeros = four_bit_weight(out_features, in_features, group_size, offsets=offsets)
    expected = w4a16_linear_torch(x.float(), qweight, scales, zeros)                  # [M, N] float32
    in_step, ahead = (w4a16_linear_tiles(x, qweight, scales, zeros, None, Tiles(*tile, prefetch=prefetch))
                      for prefetch in (False, True))
    assert torch.equal(in_step, ahead)
    total = in_step.sum(0) if in_step.dim() == 3 else in_step.float()
    torch.testing.assert_close(total, expected, rtol=2e-3, atol=2e-3)


def eight_bit_weight(num_rows: int, in_features: int, group_size: int, offsets: bool, seed: int = 0):
    """Random (qweight [N, K] int8, scales [N, G] float32, offsets [N, G] float32 or None)."""
    generator = torch.Generator().manual_seed(seed)
    qweight = torch.randint(-128, 128, (num_rows, in_features), generator=generator).to(torch.int8)
    groups = in_features // group_size
    scales = torch.rand(num_rows, groups, generator=generator) * 0.01 + 0.001
    return qweight, scales, torch.randn(num_rows, groups, generator=generator) * 0.1 if offsets else None


@in_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_rows,out_features,in_features,group_size,offsets,bias", [
    (1, 37, 96, 32, False, False),      # Q8_0: K three groups, less than one step
    (3, 19, 224, 32, False, True),      # seven groups: two steps, the second one masked along K
    (7, 37, 768, 16, False, False),     # Q6_K: three superblocks of 256
    (64, 19, 144, 16, True, True),      # Q4_K's groups split in two, with offsets (a mixed layer)
    (1, 50, 272, 16, True, False),
    (5, 21, 320, 320, True, False),     # one group a row (compressed-tensors' channel scales), with offsets
])
@pytest.mark.parametrize("codes", ["int8", "e4m3"])
def test_w8a16_kernel_matches_reference(dtype, num_rows, out_features, in_features, group_size, offsets, bias, codes,
                                        poisoned_outputs):
    """As the W4A16 kernels: tl.dot multiplies the weight rounded to x's dtype, the few-row path in float32.
    The codes are int8, or e4m3 (block-scaled FP8 checkpoints; the same int values, all exact in e4m3
    up to 16, and larger ones rounded as the file would hold them)."""
    from nanovllm.ops.quant_linear_triton import (GEMV_MAX_ROWS, Tiles, sum_partials, w8a16_linear_partials_triton,
                                                  w8a16_linear_tiles, w8a16_linear_triton)

    x = torch.randn(num_rows, in_features, dtype=dtype, generator=torch.Generator().manual_seed(num_rows))
    qweight, scales, offset = eight_bit_weight(out_features, in_features, group_size, offsets)
    if codes == "e4m3":
        qweight = qweight.to(torch.float8_e4m3fn)
    b = torch.randn(out_features, dtype=dtype) if bias else None
    by_dot = w8a16_linear_torch(x, qweight, scales, offset, b)
    by_fma = w8a16_linear_torch(x.float(), qweight, scales, offset, b).to(dtype)
    expected = by_fma if num_rows <= GEMV_MAX_ROWS else by_dot
    # float32: sums of up to 768 products of about 1 in another order, 1e-5 apart at times (a wrong code,
    # scale or group is off by far more); float16: one rounding of the output
    tolerance = dict(rtol=1e-5, atol=4e-5) if dtype == torch.float32 else TOLERANCE[dtype]
    torch.testing.assert_close(w8a16_linear_triton(x, qweight, scales, offset, b), expected, **tolerance)
    partials = w8a16_linear_partials_triton(x, qweight, scales, offset, b)    # [S, M, N] float32 at a few rows
    torch.testing.assert_close(sum_partials(partials, dtype), expected, **tolerance)
    for block_m, expected in ((4, by_fma), (16, by_dot)):     # the FMA path, 4 rows at a time; tl.dot's
        split = Tiles(block_m, 16, 32, split_k=3)     # K split unevenly: the last split has fewer steps, or none
        partials = w8a16_linear_tiles(x, qweight, scales, offset, b, split)
        assert partials.shape == (3, num_rows, out_features) and partials.dtype == torch.float32
        torch.testing.assert_close(partials.sum(0).to(dtype), expected, **tolerance)


@in_interpreter
@pytest.mark.parametrize("num_rows,out_features,in_features,bias,split_k", [
    (1, 37, 200, False, 1), (1, 37, 200, True, 2), (7, 50, 96, True, 1), (5, 50, 300, False, 3),
    (5, 50, 96, False, 4),   # 3 steps of K over 4 splits: the last split has none and writes zeros
    (33, 19, 130, False, 1), (70, 45, 64, True, 1),
])
def test_fp8_gemm_kernel_matches_reference(num_rows, out_features, in_features, bias, split_k):
    """The GEMM alone, on codes quantized by torch (see the module docstring)."""
    import triton

    from nanovllm.ops.quant_linear_triton import _fp8_gemm_kernel, _launch_grid, choose_fp8_gemm_tiles

    x = torch.randn(num_rows, in_features)
    weight, weight_scale = quantize_fp8_per_channel(torch.randn(out_features, in_features))
    b = torch.randn(out_features) if bias else None
    xq, x_scale = quantize_fp8_per_token_torch(x)
    tiles = choose_fp8_gemm_tiles(num_rows, out_features, in_features, x.device)     # the launch's tile sizes
    tiles = type(tiles)(tiles.block_m, tiles.block_n, 32, split_k)
    out = torch.full((split_k, num_rows, out_features), float("nan"))      # every split writes its partial
    k_per_split = triton.cdiv(triton.cdiv(in_features, 32), split_k) * 32
    _fp8_gemm_kernel[_launch_grid(num_rows, out_features, tiles)](
        xq, x_scale, weight, weight_scale, b if bias else weight_scale, out, num_rows, out_features, in_features,
        xq.stride(0), k_per_split, HAS_BIAS=bias, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=32)
    torch.testing.assert_close(out.sum(0), fp8_w8a8_linear_torch(x, weight, weight_scale, b), rtol=1e-5, atol=1e-5)


def fp8_case(num_rows: int, out_features: int, in_features: int, bias: bool):
    """Random x [M, K] float32, an e4m3 weight [N, K] with its channel scales, a bias or None, and x's
    Fp8Rows quantized by torch (the interpreter's own cast to e4m3 rounds otherwise), seeded by M."""
    from nanovllm.ops.quant_format import quantize_fp8_rows_torch

    generator = torch.Generator().manual_seed(num_rows)
    x = torch.randn(num_rows, in_features, generator=generator)
    weight, weight_scale = quantize_fp8_per_channel(torch.randn(out_features, in_features, generator=generator))
    b = torch.randn(out_features, generator=generator) if bias else None
    return x, weight, weight_scale, b, quantize_fp8_rows_torch(x)


@in_interpreter
@pytest.mark.parametrize("num_rows,out_features,in_features,bias", [
    (130, 200, 256, False), (77, 70, 96, True),    # tiles past M, N and K: the descriptors' zeros
    (65, 37, 40, True),                            # K of 40 bytes cannot back a descriptor: the pointer kernel
])
def test_fp8_descriptor_gemm_at_prefill_rows_is_the_pointer_gemm(num_rows, out_features, in_features, bias,
                                                                 poisoned_outputs, monkeypatch):
    """Past FP8_SWAP_MAX_ROWS rows (64 here, to keep the interpreter's cases small) with FP8_TMA_GEMM the
    W8A8 GEMM loads its tiles through tensor descriptors and walks its programs in groups of row tiles:
    the same products, bit for bit, as the pointer-load kernel's tiles (and the reference's within
    float32's rounding of the sums)."""
    from nanovllm.ops import quant_linear_triton as kernels

    x, weight, weight_scale, b, rows = fp8_case(num_rows, out_features, in_features, bias)
    monkeypatch.setattr(kernels, "FP8_TMA_GEMM", True)
    monkeypatch.setattr(kernels, "FP8_SWAP_MAX_ROWS", 64)
    monkeypatch.setattr(kernels, "FP8_TMA_GROUP_M", 2)       # groups end part-full at 130 and 77 rows of tiles of 32
    chosen = kernels.choose_fp8_gemm_tiles(num_rows, out_features, in_features, x.device)
    assert chosen.tma and chosen.block_m == 128
    for tiles in (kernels.Tiles(32, 32, 32, num_stages=2, tma=True), chosen):
        out = kernels.fp8_linear_tiles(rows, weight, weight_scale, b, tiles)
        assert torch.equal(out, kernels.fp8_linear_tiles(rows, weight, weight_scale, b, replace(tiles, tma=False)))
        torch.testing.assert_close(out, fp8_w8a8_linear_torch(x, weight, weight_scale, b), rtol=1e-5, atol=1e-5)


@in_interpreter
@pytest.mark.parametrize("num_rows,out_features,in_features,bias,split_k", [
    (2, 37, 96, False, 1), (7, 70, 96, True, 3),   # tiles past M, N and K: the descriptors' zeros; a split past K
    (33, 50, 256, True, 2), (64, 19, 208, False, 1),
    (5, 37, 40, True, 1),                          # K of 40 bytes cannot back a descriptor: the pointer kernel
    (70, 37, 96, True, 2),                         # past 64 rows: the wide tiles (FP8_SWAP_WIDE_ROWS a tile)
    (150, 300, 64, False, 1),                      # past 128 rows, more than two waves on 2 SMs: one tall tile
])
def test_fp8_transposed_gemm_at_decode_rows_is_the_pointer_gemm(num_rows, out_features, in_features, bias, split_k,
                                                                 poisoned_outputs, monkeypatch):
    """At a decode batch's rows with FP8_SWAP_GEMM the W8A8 GEMM computes out^T = W x^T, its tiles
    loaded through tensor descriptors: the pointer-load kernel's products at the same tiles, up to
    float32's rounding of the sums (the transposed dot adds in another order), and the reference's."""
    from nanovllm.ops import quant_linear_triton as kernels

    x, weight, weight_scale, b, rows = fp8_case(num_rows, out_features, in_features, bias)
    monkeypatch.setattr(kernels, "FP8_SWAP_GEMM", True)
    chosen = kernels.choose_fp8_gemm_tiles(num_rows, out_features, in_features, x.device)
    assert chosen.swap and chosen.block_m == (kernels.FP8_SWAP_TALL_ROWS if num_rows > 128 else
                                              kernels.FP8_SWAP_WIDE_ROWS if num_rows > 64 else
                                              min(64, max(16, 1 << (num_rows - 1).bit_length())))
    expected = fp8_w8a8_linear_torch(x, weight, weight_scale, b)
    several = replace(chosen, block_m=16, block_n=32, block_k=32, num_stages=2)    # rows past one tile: several
    for tiles in (replace(chosen, block_n=32, block_k=32, split_k=split_k, num_stages=2), chosen, several):
        out = kernels.fp8_linear_tiles(rows, weight, weight_scale, b, tiles)
        assert out.shape == ((tiles.split_k,) if tiles.split_k > 1 else ()) + (num_rows, out_features)
        by_pointers = kernels.fp8_linear_tiles(rows, weight, weight_scale, b, replace(tiles, swap=False))
        torch.testing.assert_close(out, by_pointers, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(kernels.sum_partials(out, x.dtype), expected, rtol=1e-5, atol=1e-5)


LLAMA_8B_LAYERS = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))   # qkv, o, gate_up, down: (N, K)


@pytest.mark.parametrize("num_rows", [65, 128, 200, 256])
def test_fp8_decode_batches_past_64_rows_fill_the_gpu_on_the_transposed_kernel(num_rows, monkeypatch):
    """Llama-3.1-8B's layers at 65 to FP8_SWAP_MAX_ROWS rows, on 132 SMs: the transposed GEMM in tiles of
    FP8_SWAP_WIDE_ROWS rows (past them, gate_up_proj and the LM head in one tile of FP8_SWAP_TALL_ROWS), at
    least half as many programs as SMs, and K split only while the programs stay within one an SM; one row
    more than FP8_SWAP_MAX_ROWS takes the prefill tiles."""
    pytest.importorskip("triton")
    from nanovllm.ops import quant_linear_triton as kernels

    monkeypatch.setattr(kernels, "_sms", lambda device: 132)
    for out_features, in_features in LLAMA_8B_LAYERS + ((128256, 4096),):
        tiles = kernels.choose_fp8_gemm_tiles(num_rows, out_features, in_features, torch.device("cpu"))
        tall = num_rows > kernels.FP8_SWAP_WIDE_ROWS and out_features in (28672, 128256)
        assert tiles.swap and tiles.block_m == (kernels.FP8_SWAP_TALL_ROWS if tall else kernels.FP8_SWAP_WIDE_ROWS)
        tall_tiles = (tiles.block_n, tiles.block_k, tiles.num_warps, tiles.num_stages) == kernels.FP8_SWAP_TALL_TILES
        assert tall_tiles == tall
        row_tiles, out_tiles, split_k = kernels._launch_grid(num_rows, out_features, tiles)
        assert row_tiles * out_tiles * split_k >= 132 // 2, (out_features, in_features, tiles)
        assert split_k == 1 or row_tiles * out_tiles * split_k <= 132, (out_features, in_features, tiles)
    past = kernels.choose_fp8_gemm_tiles(kernels.FP8_SWAP_MAX_ROWS + 1, 4096, 4096, torch.device("cpu"))
    assert past.tma and not past.swap


test_fp8_decode_batches_past_64_rows_fill_the_gpu_on_the_transposed_kernel.__test__ = not IN_INTERPRETER


def test_fp8_wide_decode_tiles_are_the_ones_measured_fastest(monkeypatch):
    """(rows a program, outputs a program, K's split) of Llama-3.1-8B's qkv_proj, o_proj, gate_up_proj and
    down_proj at 128 and 256 rows on 132 SMs: the fastest of tools/fp8_gemm_probe.py's sweep on an H100, or
    within 1% of it (gate_up_proj at 128 rows: 4% behind three stages in a later sweep;
    docs/reference/quantization.md). At 256 rows gate_up_proj takes one tile of every row (the tall tiles)."""
    pytest.importorskip("triton")
    from nanovllm.ops import quant_linear_triton as kernels

    monkeypatch.setattr(kernels, "_sms", lambda device: 132)
    measured = {128: [(128, 64, 1), (128, 64, 2), (128, 128, 1), (128, 64, 2)],
                256: [(128, 128, 1), (128, 64, 1), (256, 128, 1), (128, 64, 1)]}
    for num_rows, fastest in measured.items():
        tiles = [kernels.choose_fp8_gemm_tiles(num_rows, n, k, torch.device("cpu")) for n, k in LLAMA_8B_LAYERS]
        assert [(t.block_m, t.block_n, t.split_k) for t in tiles] == fastest, num_rows
        assert all((t.block_k, t.num_warps, t.num_stages) == ((128, 8, 4) if t.block_m == 256 else (128, 4, 5))
                   for t in tiles)


test_fp8_wide_decode_tiles_are_the_ones_measured_fastest.__test__ = not IN_INTERPRETER


@in_interpreter
@pytest.mark.parametrize("num_rows,out_features,in_features", [(2, 37, 200), (5, 50, 300), (33, 19, 520)])
def test_fp8_products_given_fp8_rows_are_the_products_of_x(num_rows, out_features, in_features, poisoned_outputs):
    """fp8_linear_triton and its partials given x's Fp8Rows (as a norm hands them over) are the
    same bits as given x, which they quantize with quantize_fp8_rows_triton first."""
    from nanovllm.ops.fp8_rows_triton import quantize_fp8_rows_triton
    from nanovllm.ops.quant_linear_triton import fp8_linear_partials_triton, fp8_linear_triton

    generator = torch.Generator().manual_seed(num_rows)
    x = torch.randn(num_rows, in_features, generator=generator)
    weight, weight_scale = quantize_fp8_per_channel(torch.randn(out_features, in_features, generator=generator))
    bias = torch.randn(out_features, generator=generator)
    rows = quantize_fp8_rows_triton(x)
    assert torch.equal(fp8_linear_triton(rows, weight, weight_scale, bias),
                       fp8_linear_triton(x, weight, weight_scale, bias))
    assert torch.equal(fp8_linear_partials_triton(rows, weight, weight_scale),
                       fp8_linear_partials_triton(x, weight, weight_scale))


@in_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_rows,out_features,in_features,bias", [
    (1, 37, 200, False), (1, 50, 1100, True), (3, 19, 96, True),    # 3 rows: a program each
])
def test_fp8_gemv_kernel_matches_the_weight_only_reference(dtype, num_rows, out_features, in_features, bias,
                                                           poisoned_outputs):
    """One row is weight-only: x is not quantized, the e4m3 weight times its channel's scale
    multiplies it in float32. K not a multiple of the step (masked), and split unevenly."""
    from nanovllm.ops.quant_linear_triton import Tiles, fp8_linear_tiles, fp8_linear_triton

    generator = torch.Generator().manual_seed(num_rows)
    x = (torch.randn(num_rows, in_features, generator=generator) * 4).to(dtype)
    weight, weight_scale = quantize_fp8_per_channel(torch.randn(out_features, in_features, generator=generator))
    b = torch.randn(out_features, generator=generator).to(dtype) if bias else None
    expected = fp8_weight_only_linear_torch(x, weight, weight_scale, b)
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else TOLERANCE[dtype]   # sums of ~1,000 terms
    if num_rows == 1:     # as the engine launches it
        torch.testing.assert_close(fp8_linear_triton(x, weight, weight_scale, b), expected, **tolerance)
    for block_n, block_k, split_k in ((8, 64, 3), (16, 32, 1)):    # 3 splits: the last has fewer steps, or none
        partials = fp8_linear_tiles(x, weight, weight_scale, b, Tiles(1, block_n, block_k, split_k))
        assert partials.shape[-2:] == (num_rows, out_features)
        summed = partials.sum(0) if split_k > 1 else partials.float()
        torch.testing.assert_close(summed.to(dtype), expected, **tolerance)


@in_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("intermediate,in_features", [(37, 200), (21, 1100)])
def test_fp8_gated_gemv_is_silu_and_mul_of_the_gemv(dtype, intermediate, in_features, poisoned_outputs):
    """gate_up_proj's one-row GEMV with silu(gate) * up in its epilogue: the same bits as the GEMV
    followed by the SiLU-and-mul kernel (each rounding where the two kernels round), and the torch
    reference. The gate's values reach both signs and a few units, where silu bends; rows past the
    last full tile (37, 21) and K past the last full step (200, 1100) are masked; the up rows sit
    `intermediate` rows below their gate rows."""
    from nanovllm.ops.activation import silu_and_mul_torch
    from nanovllm.ops.activation_triton import silu_and_mul_triton
    from nanovllm.ops.quant_linear_triton import Tiles, fp8_linear_silu_and_mul_triton, fp8_linear_tiles

    generator = torch.Generator().manual_seed(intermediate)
    x = torch.randn(1, in_features, generator=generator).to(dtype)
    weight, weight_scale = quantize_fp8_per_channel(torch.randn(2 * intermediate, in_features, generator=generator)
                                                    / in_features ** 0.5 * 3)
    fused = fp8_linear_silu_and_mul_triton(x, weight, weight_scale)
    expected = silu_and_mul_torch(fp8_weight_only_linear_torch(x, weight, weight_scale))
    assert fused.shape == (1, intermediate) and fused.dtype == dtype
    torch.testing.assert_close(fused, expected, **TOLERANCE[dtype])
    for block_n, block_k in ((4, 64), (8, 128)):
        gated = fp8_linear_tiles(x, weight, weight_scale, None, Tiles(1, block_n, block_k), gated=True)
        plain = fp8_linear_tiles(x, weight, weight_scale, None, Tiles(1, 2 * block_n, block_k))
        assert torch.equal(gated, silu_and_mul_triton(plain))
    assert (expected < 0).any() and (expected > 0).any()
    with pytest.raises(ValueError, match="unsplit"):
        fp8_linear_tiles(x, weight, weight_scale, None, Tiles(1, 4, 64, split_k=2), gated=True)
    bias = torch.randn(2 * intermediate, generator=generator).to(dtype)     # not fused: GEMV, then SiLU-and-mul
    torch.testing.assert_close(fp8_linear_silu_and_mul_triton(x, weight, weight_scale, bias),
                               silu_and_mul_torch(fp8_weight_only_linear_torch(x, weight, weight_scale, bias)),
                               **TOLERANCE[dtype])


@in_interpreter
@pytest.mark.parametrize("offsets", [False, True], ids=["zero-points", "offsets"])
def test_w4a16_gemv_keeps_its_products_normal_over_the_range_of_activations(offsets, poisoned_outputs):
    """The GEMV multiplies x 2^(EXP_X - 4 j) by subnormal codes: activations from 2^-40 to 2^30
    (a row each) still give the reference's products, each row to float32 rounding."""
    from nanovllm.ops.quant_linear_triton import Tiles, w4a16_linear_tiles

    qweight, scales, zeros = four_bit_weight(21, 256, 128, seed=3, offsets=offsets)
    generator = torch.Generator().manual_seed(7)
    magnitudes = torch.tensor([2.0 ** -40, 2.0 ** -12, 1.0, 2.0 ** 30])[:, None]
    x = torch.randn(4, 256, generator=generator) * magnitudes
    out = w4a16_linear_tiles(x, qweight, scales, zeros, None, Tiles(4, 16, 128, split_k=1))
    expected = w4a16_linear_torch(x, qweight, scales, zeros)
    torch.testing.assert_close(out / magnitudes, expected / magnitudes, rtol=1e-5, atol=1e-5)


@in_interpreter
@pytest.mark.parametrize("num_rows,in_features", [(1, 200), (5, 4099)])
def test_fp8_row_quantization_kernel_matches_reference(num_rows, in_features):
    from nanovllm.ops.quant_linear_triton import quantize_fp8_per_token_triton

    generator = torch.Generator().manual_seed(num_rows)
    x = torch.randn(num_rows, in_features, generator=generator) * torch.linspace(0.1, 10, num_rows)[:, None]
    x[0, :7] = 0.0
    codes, scale = quantize_fp8_per_token_triton(x)
    ref_codes, ref_scale = quantize_fp8_per_token_torch(x)
    torch.testing.assert_close(scale, ref_scale, rtol=0, atol=0)
    ref = ref_codes.float()
    exact = (torch.frexp(ref.abs()).mantissa != 0.5) & (ref.abs() >= 2 ** -6)   # where the interpreter rounds right
    assert exact.float().mean() > 0.5
    torch.testing.assert_close(codes.float()[exact], ref[exact], rtol=0, atol=0)


# ---- compiled for Hopper -------------------------------------------------------------------

@pytest.mark.parametrize("block_m,block_n", [(16, 32), (128, 128)])   # decode and large-batch tiles
def test_quant_kernels_compile_for_hopper(block_m, block_n):
    pytest.importorskip("triton")
    from test_triton_compile import compile_for_hopper

    from nanovllm.ops import fp8_rows_triton
    from nanovllm.ops import quant_linear_triton as kernels

    fp8 = {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "a_scale_ptr": "*fp32", "b_scale_ptr": "*fp32",
           "bias_ptr": "*bf16", "out_ptr": "*bf16"}
    fp8["out_ptr"] = out_type = "*fp32" if block_m == 16 else "*bf16"   # decode tiles write float32 partials
    tile = dict(num_warps=4, num_stages=4) if block_m == 16 else dict(num_warps=8, num_stages=3)   # as launched
    gemv = dict(num_warps=4, num_stages=3)
    assert compile_for_hopper(kernels._fp8_gemm_kernel, dict(HAS_BIAS=False, BLOCK_M=block_m, BLOCK_N=block_n,
                                                             BLOCK_K=128), fp8, **tile).asm["cubin"]
    if block_m == 16:       # a decode batch's rows, transposed, through tensor descriptors, at the engine's tiles
        for rows, (block_n, block_k, warps, stages) in ((16, kernels.FP8_SWAP_TILES), (64, kernels.FP8_SWAP_TILES),
                                                        (kernels.FP8_SWAP_WIDE_ROWS, kernels.FP8_SWAP_WIDE_TILES),
                                                        (kernels.FP8_SWAP_TALL_ROWS, kernels.FP8_SWAP_TALL_TILES)):
            compiled = compile_for_hopper(
                kernels._fp8_swap_gemm_kernel,
                dict(HAS_BIAS=True, BLOCK_M=rows, BLOCK_N=block_n, BLOCK_K=block_k, NUM_STAGES=stages),
                {**fp8, "a_desc": f"tensordesc<fp8e4nv[{rows}, {block_k}]>",
                 "b_desc": f"tensordesc<fp8e4nv[{block_n}, {block_k}]>"},
                num_warps=warps, num_stages=stages)
            assert "cp.async.bulk.tensor" in compiled.asm["ptx"]
            assert f"wgmma.mma_async.sync.aligned.m64n{rows}k32.f32.e4m3.e4m3" in compiled.asm["ptx"]
    if block_m == 128:      # prefill rows through tensor descriptors, at the engine's tiles
        block_n, block_k, warps, stages = kernels.FP8_TMA_TILES
        compiled = compile_for_hopper(
            kernels._fp8_tma_gemm_kernel,
            dict(HAS_BIAS=True, BLOCK_M=128, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=kernels.FP8_TMA_GROUP_M,
                 NUM_STAGES=stages),
            {**fp8, "a_desc": f"tensordesc<fp8e4nv[128, {block_k}]>",
             "b_desc": f"tensordesc<fp8e4nv[{block_n}, {block_k}]>"},
            num_warps=warps, num_stages=stages)
        assert "cp.async.bulk.tensor" in compiled.asm["ptx"] and "wgmma.mma_async" in compiled.asm["ptx"]
    gemv_rows = 1 if block_m == 16 else kernels.GEMV_MAX_ROWS
    for offsets in (False, True):     # integer zero points; GGUF's float offsets
        w4 = {"qweight_ptr": "*i32", "zeros_ptr": "*fp32" if offsets else "*u8", "scales_ptr": "*fp32",
              "x_ptr": "*bf16", "out_ptr": out_type}
        assert compile_for_hopper(kernels._w4a16_gemm_kernel,
                                  dict(GROUP_SIZE=128, ZERO_IS_OFFSET=offsets, HAS_BIAS=True, BLOCK_M=block_m,
                                       BLOCK_N=block_n, BLOCK_K=128), w4, **tile).asm["cubin"]
        if not offsets:     # the tensor-core GEMV (integer zero points only), its planes made by PTX
            compiled = compile_for_hopper(kernels._w4a16_dot_gemv_kernel,
                                          dict(GROUP_SIZE=128, HAS_BIAS=True, BLOCK_M=16, BLOCK_N=128, BLOCK_K=128,
                                               USE_ASM=True, USE_PDL=True),
                                          w4, num_warps=4, num_stages=3, launch_pdl=True)
            assert "sub.rn.bf16x2" in compiled.asm["ptx"] and "mma.sync" in compiled.asm["ptx"]
        for group_size in (128, 32):     # a scale a step; a scale a word (GGUF's groups of 32)
            assert compile_for_hopper(kernels._w4a16_gemv_kernel,
                                      dict(GROUP_SIZE=group_size, ZERO_IS_OFFSET=offsets, HAS_BIAS=True,
                                           BLOCK_M=gemv_rows, BLOCK_N=64, BLOCK_K=128, PREFETCH=True),
                                      w4, **gemv).asm["cubin"]
        w8 = {"qweight_ptr": "*i8", "scales_ptr": "*fp32", "offsets_ptr": "*fp32", "x_ptr": "*bf16",
              "out_ptr": out_type}
        for kernel, rows, block_n_k, options in ((kernels._w8a16_gemv_kernel, gemv_rows, (8, 256), gemv),
                                                 (kernels._w8a16_kernel, block_m, (block_n, 64), tile)):
            constexprs = dict(GROUP_SIZE=16, RUN=16, HAS_OFFSETS=offsets, HAS_BIAS=True, BLOCK_M=rows,
                              BLOCK_N=block_n_k[0], BLOCK_K=block_n_k[1])
            assert compile_for_hopper(kernel, constexprs, w8, **options).asm["cubin"]
            if not offsets:   # e4m3 codes with a scale per 128 (block-scaled FP8 checkpoints)
                constexprs.update(GROUP_SIZE=128, RUN=min(128, block_n_k[1]) if kernel is kernels._w8a16_kernel else 16)
                assert compile_for_hopper(kernel, constexprs, {**w8, "qweight_ptr": "*fp8e4nv"}, **options).asm["cubin"]
    if block_m == 16:
        for block_n, block_k in ((8, 512), (8, 1024), (4, 1024), (4, 2048)):     # the FP8 GEMV's tiles
            assert compile_for_hopper(kernels._fp8_gemv_kernel,
                                      dict(HAS_BIAS=True, BLOCK_M=1, BLOCK_N=block_n, BLOCK_K=block_k),
                                      {"w_ptr": "*fp8e4nv", "w_scale_ptr": "*fp32", "out_ptr": out_type},
                                      num_warps=4, num_stages=1).asm["cubin"]
        for gated in (False, True):     # launched after the kernel before it (PDL); gate_up_proj with its SiLU
            compiled = compile_for_hopper(kernels._fp8_gemv_kernel,
                                          dict(HAS_BIAS=False, BLOCK_M=1, BLOCK_N=4, BLOCK_K=512, GATED=gated,
                                               USE_PDL=True),
                                          {"w_ptr": "*fp8e4nv", "w_scale_ptr": "*fp32", "out_ptr": "*bf16"},
                                          num_warps=4, num_stages=1, launch_pdl=True)
            assert "griddepcontrol.wait" in compiled.asm["ptx"]
        assert compile_for_hopper(fp8_rows_triton._quantize_fp8_rows_kernel, dict(BLOCK_K=2048),
                                  {"x_ptr": "*bf16", "xq_ptr": "*fp8e4nv", "scale_ptr": "*fp32"}, num_warps=4).asm["cubin"]
        assert compile_for_hopper(kernels._sum_partials_kernel, dict(NUM_PARTIALS=4, BLOCK=1024),
                                  {"partial_ptr": "*fp32", "out_ptr": "*bf16"}).asm["cubin"]


test_quant_kernels_compile_for_hopper.__test__ = not IN_INTERPRETER


LAUNCHED_TILES = [   # (kernel, BLOCK_M, BLOCK_N, num_warps, num_stages) as the engine launches them
    ("_w4a16_gemv_kernel", 1, 64, 4, 3), ("_w4a16_gemv_kernel", 4, 32, 4, 3),
    ("_w4a16_gemv_kernel/gguf", 1, 64, 4, 3), ("_w4a16_gemv_kernel/gguf", 4, 32, 4, 3),   # groups of 32, offsets
    ("_w4a16_gemv_kernel/k512", 1, 16, 4, 1),                                              # one row, long steps
    ("_w4a16_gemv_kernel/gguf-k512", 1, 8, 4, 1), ("_w4a16_gemv_kernel/gguf-k512", 1, 16, 4, 1),
    ("_w4a16_dot_gemv_kernel", 16, 128, 4, 3),
    ("_w4a16_row_gemv_kernel/k512", 1, 8, 1, 1), ("_w4a16_row_gemv_kernel/gguf-k512", 1, 8, 1, 1),  # 4 rows a thread
    ("_w4a16_row_gemv_kernel/k512", 1, 32, 2, 1), ("_w4a16_row_gemv_kernel", 1, 64, 1, 1),     # 8 rows a thread
    ("_w4a16_row_gemv_kernel/gated-k512", 1, 8, 1, 1),        # gate_up_proj + SiLU
    ("_w4a16_gemm_kernel", 16, 32, 4, 4),
    ("_w4a16_gemm_kernel", 64, 64, 4, 4), ("_w4a16_gemm_kernel", 128, 128, 8, 3),
    ("_fp8_gemm_kernel", 16, 64, 4, 4), ("_fp8_gemm_kernel", 32, 64, 4, 4), ("_fp8_gemm_kernel", 64, 64, 4, 4),
    ("_fp8_gemm_kernel", 32, 128, 4, 3), ("_fp8_gemm_kernel", 64, 128, 4, 3), ("_fp8_gemm_kernel", 128, 128, 8, 3),
    ("_fp8_gemm_kernel/k256", 64, 64, 4, 4),      # 33 to 64 rows, 64 outputs: steps of 256 along K
    ("_fp8_gemv_kernel/k512", 1, 8, 4, 1), ("_fp8_gemv_kernel/k1024", 1, 8, 4, 1),
    ("_fp8_gemv_kernel/k1024", 1, 4, 4, 1), ("_fp8_gemv_kernel/k2048", 1, 4, 4, 1),
    ("_fp8_gemv_kernel/gated-k512", 1, 4, 4, 1),   # gate_up_proj + SiLU
    ("_w8a16_gemv_kernel/k512", 1, 8, 4, 1), ("_w8a16_gemv_kernel/k1024", 1, 4, 4, 1),
    ("_w8a16_gemv_kernel/k256", 4, 8, 4, 1), ("_w8a16_gemv_kernel/k512", 4, 4, 4, 1),
    ("_w8a16_kernel", 16, 32, 4, 4), ("_w8a16_kernel", 64, 64, 4, 4), ("_w8a16_kernel", 128, 128, 8, 3),
]


@pytest.mark.parametrize("name,block_m,block_n,num_warps,num_stages", LAUNCHED_TILES)
def test_quant_kernels_do_not_spill_registers_on_hopper(name, block_m, block_n, num_warps, num_stages, tmp_path):
    """Compiled as a launch at Llama's shapes specializes them (pointers, K and the strides multiples
    of 16), no thread spills registers to local memory: a spilling tile reads its own stack from
    memory on every step (the first W4A16 kernel spilled 1.5 KB a thread at 128 x 128)."""
    pytest.importorskip("triton")
    from test_triton_compile import compile_for_hopper, resource_usage

    from nanovllm.ops import quant_linear_triton as kernels

    name, _, variant = name.partition("/")
    step = variant.rpartition("k")[2]           # a variant ending in kNNN steps NNN along K
    kernel = getattr(kernels, name)
    block_k = int(step) if step.isdigit() else 64 if name == "_w8a16_kernel" else 128
    constexprs = dict(HAS_BIAS=True, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    if name == "_fp8_gemv_kernel":
        constexprs.update(GATED=variant.startswith("gated"), USE_PDL=True)
        types = {"w_ptr": "*fp8e4nv", "w_scale_ptr": "*fp32"}
    elif name == "_fp8_gemm_kernel":
        types = {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "a_scale_ptr": "*fp32", "b_scale_ptr": "*fp32"}
    elif name.startswith("_w8a16"):     # Q6_K's groups of 16, with the offsets of a mixed layer
        constexprs.update(GROUP_SIZE=16, RUN=16, HAS_OFFSETS=True)
        if name == "_w8a16_gemv_kernel":
            constexprs.update(USE_PDL=True)
        types = {"qweight_ptr": "*i8", "scales_ptr": "*fp32", "offsets_ptr": "*fp32"}
    elif variant.startswith("gguf"):  # Q4_K: a scale and an offset a word
        constexprs.update(GROUP_SIZE=32, ZERO_IS_OFFSET=True)
        types = {"qweight_ptr": "*i32", "zeros_ptr": "*fp32", "scales_ptr": "*fp32"}
    elif name == "_w4a16_dot_gemv_kernel":
        constexprs.update(GROUP_SIZE=128, USE_ASM=True, USE_PDL=True)
        types = {"qweight_ptr": "*i32", "zeros_ptr": "*u8", "scales_ptr": "*fp32"}
    else:
        constexprs.update(GROUP_SIZE=128, ZERO_IS_OFFSET=False)
        types = {"qweight_ptr": "*i32", "zeros_ptr": "*u8", "scales_ptr": "*fp32"}
    if name == "_w4a16_row_gemv_kernel":     # one row: no BLOCK_M; x loaded as pairs in PTX
        del constexprs["BLOCK_M"]
        gated = variant.startswith("gated")     # as Llama-3.2-1B's gate_up_proj: the next launch once the loop ends
        constexprs.update(X_PAIRS=True, USE_PDL=True, GATED=gated, LATE_DEPENDENTS=gated, HAS_BIAS=not gated)
    if name == "_w4a16_gemv_kernel":
        constexprs.update(PREFETCH=kernels.GEMV_PREFETCH, USE_PDL=True)     # as launched on Hopper
    types["out_ptr"] = "*fp32" if block_m <= 16 else "*bf16"
    compiled = compile_for_hopper(kernel, constexprs, types, aligned=True, num_warps=num_warps, num_stages=num_stages)
    usage = resource_usage(compiled, tmp_path)
    assert " STACK:0 " in usage and " LOCAL:0 " in usage, usage


test_quant_kernels_do_not_spill_registers_on_hopper.__test__ = not IN_INTERPRETER


def test_w4a16_tiles_whose_step_splits_a_group_are_refused():
    """A GEMV step must hold whole groups or lie in one (its runs of words share a scale): a step of
    64 over groups of 48 would mix two groups' codes under one scale, so it stops with an error."""
    pytest.importorskip("triton")
    from nanovllm.ops.quant_linear_triton import Tiles, w4a16_linear_tiles

    qweight, scales, zeros = four_bit_weight(21, 384, 48)
    with pytest.raises(ValueError, match="step of 64 neither holds whole groups of 48"):
        w4a16_linear_tiles(torch.zeros(1, 384), qweight, scales, zeros, None, Tiles(1, 16, 64))
