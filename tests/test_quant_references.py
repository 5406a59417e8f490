"""The torch references of the checkpoint quantization formats (ops/quant_linear.py), checked on
the CPU against the formats written out by hand: the bits of a packed int4 word, a group's scale
and zero point, an FP8 row's scale and codes, and which dtype each product is rounded to.

These references are the CPU path and the oracle of the Triton kernels (tests/test_quant_kernels.py
compares the two under Triton's interpreter); tests/test_quant_formats.py checks whole checkpoints
against the libraries that wrote them. Each test here takes milliseconds.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nanovllm.ops.quant_format import FP8_DTYPE, FP8_MAX, FP8_MIN_SCALE
from nanovllm.ops.quant_linear import (_w4a16_tiles_fit, dequantize_w4, fp8_linear, fp8_linear_or_partials,
                                       fp8_linear_torch, fp8_w8a8_linear_torch, pack_int4, quantize_fp8_per_channel,
                                       quantize_fp8_per_token_torch, unpack_int4, w4a16_linear,
                                       w4a16_linear_or_partials, w4a16_linear_torch, w8a16_linear,
                                       w8a16_linear_or_partials, w8a16_linear_torch)


# ---- W4A16 -----------------------------------------------------------------------------------

def test_pack_int4_puts_code_k_in_bits_4k_low_nibble_first_as_a_signed_int32():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8],        # 0x87654321: the top bit set
                          [0, 1, 2, 3, 4, 5, 6, 7],        # 0x76543210
                          [15] * 8,                        # 0xFFFFFFFF
                          [0] * 7 + [8],                   # 0x80000000, the smallest int32
                          [15] + [0] * 7])                 # 0x0000000F
    words = [0x87654321, 0x76543210, 0xFFFFFFFF, 0x80000000, 0x0000000F]
    signed = [word - 2 ** 32 if word >= 2 ** 31 else word for word in words]
    packed = pack_int4(codes)
    assert packed.dtype == torch.int32 and packed.shape == (5, 1)
    assert packed[:, 0].tolist() == signed
    unpacked = unpack_int4(packed)
    assert unpacked.dtype == torch.uint8 and torch.equal(unpacked, codes.to(torch.uint8))


def test_unpack_int4_inverts_pack_int4_over_several_words_a_row():
    codes = torch.randint(0, 16, (5, 48), generator=torch.Generator().manual_seed(0))
    packed = pack_int4(codes)
    assert packed.shape == (5, 6)
    assert torch.equal(unpack_int4(packed), codes.to(torch.uint8))
    assert packed[0, 1].item() == pack_int4(codes[:1, 8:16])[0, 0].item()   # word j holds codes 8j .. 8j + 7


def four_bit_weight(num_rows: int, in_features: int, group_size: int, seed: int = 0):
    """(codes [N, K], qweight [N, K / 8] int32, scales [N, G] float32, zeros [N, G] uint8)."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (num_rows, in_features), generator=generator)
    groups = in_features // group_size
    scales = torch.rand(num_rows, groups, generator=generator) * 0.1 + 0.01
    zeros = torch.randint(0, 16, (num_rows, groups), generator=generator).to(torch.uint8)
    return codes, pack_int4(codes), scales, zeros


def test_dequantize_w4_subtracts_each_groups_zero_and_multiplies_by_its_scale():
    codes, qweight, scales, zeros = four_bit_weight(3, 48, 16)
    want = torch.empty(3, 48)
    for n in range(3):
        for k in range(48):
            g = k // 16
            want[n, k] = (codes[n, k].item() - zeros[n, g].item()) * scales[n, g].item()
    got = dequantize_w4(qweight, scales, zeros)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_dequantize_w4_with_float_offsets_multiplies_by_the_scale_then_subtracts_the_offset():
    """GGUF Q4_K's layout: a float offset per group (float zeros) instead of an integer zero point."""
    codes, qweight, scales, _ = four_bit_weight(3, 48, 16)
    offsets = torch.rand(3, 3, generator=torch.Generator().manual_seed(4)) + 0.5             # [N, G] float32
    want = torch.empty(3, 48)
    for n in range(3):
        for k in range(48):
            want[n, k] = codes[n, k].item() * scales[n, k // 16].item() - offsets[n, k // 16].item()
    torch.testing.assert_close(dequantize_w4(qweight, scales, offsets), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_w4a16_reference_rounds_the_weight_to_xs_dtype_and_adds_up_in_float32(dtype, bias):
    codes, qweight, scales, zeros = four_bit_weight(24, 64, 32, seed=1)
    x = torch.randn(5, 64).to(dtype)
    b = torch.randn(24).to(dtype) if bias else None
    weight = dequantize_w4(qweight, scales, zeros).to(dtype).float()        # rounded to x's dtype once
    want = F.linear(x.float(), weight) + (b.float() if bias else 0)
    got = w4a16_linear_torch(x, qweight, scales, zeros, b)
    assert got.dtype == dtype
    assert torch.equal(got, want.to(dtype))
    for on_the_cpu in (w4a16_linear, w4a16_linear_or_partials):             # the CPU takes the reference
        assert torch.equal(on_the_cpu(x, qweight, scales, zeros, b), got)


@pytest.mark.parametrize("in_features,group_size,fits", [
    (256, 128, True), (128, 32, True), (64, 16, True), (96, 96, True),    # 96 = 32 * 3: tiles of 32
    (72, 24, False), (40, 40, False), (48, 8, False),                     # no tile of 16 divides the group
])
def test_w4a16_takes_the_kernels_only_where_the_group_splits_into_tiles_of_16(in_features, group_size, fits):
    x = torch.zeros(2, in_features)
    scales = torch.zeros(3, in_features // group_size)
    assert _w4a16_tiles_fit(x, scales) is fits


# ---- FP8 -------------------------------------------------------------------------------------

def test_fp8_row_scale_maps_each_rows_largest_magnitude_to_448():
    x = torch.tensor([[1.0, -3.0, 0.5, 2.0],
                      [0.0, 0.0, 0.0, 0.0],               # an all-zero row keeps a tiny positive scale
                      [-896.0, 100.0, 7.0, -0.001]])
    xq, scale = quantize_fp8_per_token_torch(x)
    assert xq.dtype == FP8_DTYPE and scale.dtype == torch.float32
    assert scale.tolist() == pytest.approx([3.0 / FP8_MAX, FP8_MIN_SCALE, 896.0 / FP8_MAX], rel=1e-7)
    assert torch.equal(xq.float(), (x / scale[:, None]).to(FP8_DTYPE).float())
    assert xq.float()[0, 1].item() == -FP8_MAX and xq.float()[2, 0].item() == -FP8_MAX
    assert torch.equal(xq.float()[1], torch.zeros(4))


def test_fp8_codes_never_leave_the_e4m3_range():
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * 1000
    xq, scale = quantize_fp8_per_token_torch(x)
    codes = xq.float()
    assert codes.isfinite().all() and codes.abs().max().item() == FP8_MAX
    assert torch.equal(codes.abs().amax(-1), torch.full((64,), FP8_MAX))
    torch.testing.assert_close(codes * scale[:, None], x, rtol=2 ** -3, atol=0)   # e4m3: 3 mantissa bits


def test_fp8_weights_are_quantized_per_output_channel():
    weight = torch.randn(6, 32, generator=torch.Generator().manual_seed(2))
    wq, scale = quantize_fp8_per_channel(weight)
    assert scale.shape == (6,)
    torch.testing.assert_close(scale, weight.abs().amax(1) / FP8_MAX, rtol=1e-7, atol=0)
    assert torch.equal(wq.float(), (weight / scale[:, None]).to(FP8_DTYPE).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_reference_multiplies_the_codes_and_scales_both_sides_per_row_and_channel(dtype, bias):
    generator = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 32, generator=generator) * torch.tensor([[0.1], [1.0], [10.0], [100.0]])).to(dtype)
    wq, w_scale = quantize_fp8_per_channel(torch.randn(7, 32, generator=generator) * torch.arange(1, 8)[:, None])
    b = torch.randn(7, generator=generator).to(dtype) if bias else None
    xq, x_scale = quantize_fp8_per_token_torch(x)
    want = torch.empty(4, 7)
    for m in range(4):
        for n in range(7):
            want[m, n] = (xq[m].float() * wq[n].float()).sum() * x_scale[m] * w_scale[n]
    if bias:
        want += b.float()
    got = fp8_linear_torch(x, wq, w_scale, b)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.to(dtype).float(), rtol=1e-5, atol=1e-5)
    for on_the_cpu in (fp8_linear, fp8_linear_or_partials):                 # the CPU takes the reference
        assert torch.equal(on_the_cpu(x, wq, w_scale, b), got)


def test_fp8_weight_only_reference_skips_the_activation_rounding():
    """At one row the reference multiplies x as it is; at two it quantizes each row to e4m3 first."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 64, generator=generator)
    weight, weight_scale = quantize_fp8_per_channel(torch.randn(9, 64, generator=generator))
    exact = x @ (weight.float() * weight_scale[:, None]).T
    torch.testing.assert_close(fp8_linear_torch(x[:1], weight, weight_scale), exact[:1], rtol=1e-5, atol=1e-5)
    w8a8 = fp8_linear_torch(x, weight, weight_scale)
    assert torch.equal(w8a8, fp8_w8a8_linear_torch(x, weight, weight_scale))
    assert torch.equal(fp8_linear(x[:1], weight, weight_scale), fp8_linear_torch(x[:1], weight, weight_scale))
    assert (w8a8[:1] - exact[:1]).abs().max() > 1e-3      # e4m3 activations: 3 mantissa bits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_weight_only_reference_adds_the_bias_and_answers_in_xs_dtype(dtype):
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(1, 48, generator=generator).to(dtype)
    weight, weight_scale = quantize_fp8_per_channel(torch.randn(5, 48, generator=generator))
    bias = (torch.randn(5, generator=generator) * 10).to(dtype)
    want = x.float() @ (weight.float() * weight_scale[:, None]).T + bias.float()             # [1, 5]
    got = fp8_linear_torch(x, weight, weight_scale, bias)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want.to(dtype), rtol=1e-5, atol=1e-5)


# ---- W8A16 -----------------------------------------------------------------------------------

def test_w8a16_reference_rounds_the_weight_to_xs_dtype_and_answers_in_it():
    """The dequantized int8 weight (code x scale - offset per group of 16) is rounded to x's dtype before
    the float32 products: in bfloat16 the result is that of the rounded weight, not the exact one."""
    generator = torch.Generator().manual_seed(7)
    qweight = torch.randint(-127, 128, (6, 64), dtype=torch.int8, generator=generator)
    scales = torch.rand(6, 4, generator=generator) * 0.01 + 0.001
    offsets = torch.rand(6, 4, generator=generator) * 0.01
    x = torch.randn(3, 64, generator=generator).to(torch.bfloat16)
    exact = qweight.float() * scales.repeat_interleave(16, dim=1) - offsets.repeat_interleave(16, dim=1)
    want = (x.float() @ exact.to(torch.bfloat16).float().T).to(torch.bfloat16)               # [3, 6]
    got = w8a16_linear_torch(x, qweight, scales, offsets)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(got, (x.float() @ exact.T).to(torch.bfloat16))   # the rounding shows
    bias = torch.randn(6, generator=generator).to(torch.bfloat16)
    with_bias = w8a16_linear_torch(x, qweight, scales, offsets, bias)
    torch.testing.assert_close(with_bias, (want.float() + bias.float()).to(torch.bfloat16), rtol=0.01, atol=0.01)
    for on_the_cpu in (w8a16_linear, w8a16_linear_or_partials):            # the CPU takes the reference
        assert torch.equal(on_the_cpu(x, qweight, scales, offsets, bias), with_bias)
