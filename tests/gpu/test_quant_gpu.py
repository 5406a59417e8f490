"""The FP8, W4A16 and W8A16 Triton kernels on a CUDA GPU, in bfloat16 at Llama-3.2-1B's and
Llama-3.1-8B's layer shapes, at batch 1, 7, 64 and 256, against the torch references
(by relative error of the whole output: one bfloat16 rounding of the outputs, 1e-2, allowing
for float32 summation order). FP8 is also held to torch._scaled_mm on the same codes, and a
tiny model loaded with quantization="fp8" / "w4a16" runs on the GPU as on the CPU, as do tiny
GGUFs of Q4_K, Q5_K, Q4_0 or Q4_1 blocks beside Q6_K and Q8_0 (kept quantized, the default on CUDA).
Run on a GPU machine: `python3 -m pytest -q -m gpu tests/gpu/test_quant_gpu.py`.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from nanovllm.ops.activation import silu_and_mul_torch
from nanovllm.ops.quant_linear import (fp8_linear_torch, pack_int4, quantize_fp8_per_channel,
                                       quantize_fp8_per_token_torch, w4a16_linear_torch, w8a16_linear_torch)
from conftest import assert_same_fp8_rows

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
triton = pytest.importorskip("triton")
tl = triton.language

DEVICE = "cuda"
BATCHES = (1, 7, 64, 256)
# (N, K): Llama-3.2-1B's qkv, o, gate_up, down; Llama-3.1-8B's qkv and down
SHAPES = ((3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192), (6144, 4096), (4096, 14336))


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "the kernel left NaN in its output"
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("num_rows", BATCHES + (32,))      # 32: a decode batch's tiles of 32 rows
@pytest.mark.parametrize("out_features,in_features", SHAPES + ((28672, 4096),))   # 8B gate_up: 128-wide tiles
def test_fp8_kernel_matches_reference_and_scaled_mm(num_rows, out_features, in_features):
    from nanovllm.ops.quant_linear_triton import fp8_linear_triton, quantize_fp8_per_token_triton

    x = torch.randn(num_rows, in_features, device=DEVICE, dtype=torch.bfloat16)
    weight, weight_scale = quantize_fp8_per_channel(torch.randn(out_features, in_features, device=DEVICE) * 0.02)
    xq, x_scale = quantize_fp8_per_token_triton(x)
    ref_q, ref_scale = quantize_fp8_per_token_torch(x)
    torch.testing.assert_close(x_scale, ref_scale)
    assert (xq.float() != ref_q.float()).float().mean() < 1e-3      # division order may flip a rare tie
    out = fp8_linear_triton(x, weight, weight_scale)
    assert relative_error(out, fp8_linear_torch(x, weight, weight_scale)) < 1e-2
    if num_rows <= 16:   # some torch versions' rowwise fp8 cuBLAS path wants more than 16 rows (vLLM pads to 17)
        return
    scaled_mm = torch._scaled_mm(ref_q, weight.T, scale_a=ref_scale[:, None], scale_b=weight_scale[None, :],
                                 out_dtype=torch.bfloat16)
    assert relative_error(out, scaled_mm) < 1e-2


def descriptor_kernel_against_pointers(switch: str, num_rows: int, out_features: int, in_features: int,
                                       bound: float, monkeypatch) -> None:
    """The W8A8 GEMM of bf16 rows with the descriptor kernel that `switch` (a module setting) turns on,
    against the pointer kernel (relative error under bound) and the torch reference (under 1e-2)."""
    from nanovllm.ops import quant_linear_triton as kernels

    x = torch.randn(num_rows, in_features, device=DEVICE, dtype=torch.bfloat16)
    weight, weight_scale = quantize_fp8_per_channel(torch.randn(out_features, in_features, device=DEVICE) * 0.02)
    rows = kernels.quantize_fp8_rows_triton(x)
    monkeypatch.setattr(kernels, switch, False)
    if switch == "FP8_SWAP_GEMM":       # past 64 rows the pointer kernel, not the prefill rows' descriptor kernel
        monkeypatch.setattr(kernels, "FP8_TMA_GEMM", False)
    by_pointers = kernels.fp8_linear_triton(rows, weight, weight_scale)
    monkeypatch.setattr(kernels, switch, True)
    out = kernels.fp8_linear_triton(rows, weight, weight_scale)       # torch.empty: a tile left unwritten shows
    assert relative_error(out, by_pointers) < bound
    assert relative_error(out, fp8_linear_torch(x, weight, weight_scale)) < 1e-2


@pytest.mark.parametrize("num_rows", [257, 1000, 8192 + 7])     # prefill chunks; rows that end a tile part-full
@pytest.mark.parametrize("out_features,in_features", SHAPES + ((28672, 4096), (200, 40)))   # K of 40: no descriptor
def test_fp8_prefill_rows_through_descriptors_match_the_pointer_gemm(num_rows, out_features, in_features,
                                                                      monkeypatch):
    descriptor_kernel_against_pointers("FP8_TMA_GEMM", num_rows, out_features, in_features, 1e-3, monkeypatch)


@pytest.mark.parametrize("num_rows", [2, 7, 16, 17, 32, 64, 65, 200, 256])   # a decode batch's rows: tiles of
                                                                                # 16 to 64, then of 128
@pytest.mark.parametrize("out_features,in_features", SHAPES + ((28672, 4096), (128256, 2048), (200, 40)))
def test_fp8_decode_rows_transposed_match_the_pointer_gemm(num_rows, out_features, in_features, monkeypatch):
    """The transposed W8A8 GEMM (FP8_SWAP_GEMM, tensor descriptors) against the pointer kernel at the
    engine's tiles and the torch reference; K of 40 cannot back a descriptor (the pointer kernel).
    4e-3 against the pointer kernel: a bfloat16 output flipped by the float32 sums' other order."""
    descriptor_kernel_against_pointers("FP8_SWAP_GEMM", num_rows, out_features, in_features, 4e-3, monkeypatch)


@pytest.mark.parametrize("intermediate,hidden", [(8192, 2048), (14336, 4096)])    # Llama-3.2-1B, Llama-3.1-8B
def test_fp8_gated_gemv_is_the_gemv_then_silu_and_mul(intermediate, hidden):
    """gate_up_proj's one-row GEMV with the SiLU in its epilogue gives the bits of the plain GEMV
    followed by the SiLU-and-mul kernel."""
    from nanovllm.ops.activation_triton import silu_and_mul_triton
    from nanovllm.ops.quant_linear_triton import fp8_linear_silu_and_mul_triton, fp8_linear_triton

    x = torch.randn(1, hidden, device=DEVICE, dtype=torch.bfloat16)
    weight, weight_scale = quantize_fp8_per_channel(torch.randn(2 * intermediate, hidden, device=DEVICE) * 0.05)
    fused = fp8_linear_silu_and_mul_triton(x, weight, weight_scale)
    assert torch.equal(fused, silu_and_mul_triton(fp8_linear_triton(x, weight, weight_scale)))
    assert relative_error(fused, silu_and_mul_torch(fp8_linear_torch(x, weight, weight_scale))) < 1e-2


@triton.jit
def _slow_copy_kernel(src_ptr, dst_ptr, N, SPINS: tl.constexpr, BLOCK: tl.constexpr):
    """dst = src, written only after SPINS dependent float steps (t = t / 2 + v / 2 = v, exactly),
    having let the next kernel launch from its first instruction, as the norms do."""
    tl.extra.cuda.gdc_launch_dependents()
    offs = tl.arange(0, BLOCK)
    v = tl.load(src_ptr + offs, mask=offs < N, other=0.0).to(tl.float32)
    t = v
    for _ in range(SPINS):
        t = t * 0.5 + v * 0.5
    tl.store(dst_ptr + offs, t.to(dst_ptr.dtype.element_ty), mask=offs < N)


def slow_copy(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    _slow_copy_kernel[(1,)](x, out, x.numel(), SPINS=20000, BLOCK=triton.next_power_of_2(x.numel()), num_warps=8)
    return out


@pytest.mark.parametrize("before", ["rms-norm", "slow-copy"])
@pytest.mark.parametrize("gemv", ["fp8", "fp8-gated", "w4a16"])
def test_gemv_launched_early_waits_for_its_input(gemv, before):
    """In a CUDA graph the one-row GEMVs are launched with PDL while the kernel before them runs (the
    norms let them start at once): they may load weights early, but must read that kernel's output,
    not what the buffer held before. Each replay writes a new input; every result must be the eager
    one. (A GEMV that read x before its gdc_wait would see the last replay's x.) Before them: the
    RMSNorm, as in the model, and a copy that writes x only after tens of microseconds, so that an
    early read cannot be in time by luck."""
    from nanovllm.ops import use_pdl
    from nanovllm.ops.quant_linear_triton import (fp8_linear_silu_and_mul_triton, fp8_linear_triton,
                                                  w4a16_linear_triton)
    from nanovllm.ops.rmsnorm_triton import rms_norm_triton

    hidden, out_features = 4096, 28672
    if gemv == "w4a16":
        codes = torch.randint(0, 16, (out_features, hidden), device=DEVICE)
        weights = (pack_int4(codes), torch.rand(out_features, hidden // 128, device=DEVICE) * 0.01,
                   torch.full((out_features, hidden // 128), 8, dtype=torch.uint8, device=DEVICE))
        product = w4a16_linear_triton
    else:
        weights = quantize_fp8_per_channel(torch.randn(out_features, hidden, device=DEVICE) * 0.02)
        product = fp8_linear_silu_and_mul_triton if gemv == "fp8-gated" else fp8_linear_triton
    norm_weight = torch.rand(hidden, device=DEVICE, dtype=torch.bfloat16) + 0.5
    first = slow_copy if before == "slow-copy" else lambda x: rms_norm_triton(x, norm_weight, 1e-5)
    step = lambda x: product(first(x), *weights)                                   # noqa: E731
    assert use_pdl(norm_weight) == (torch.cuda.get_device_capability()[0] >= 9)
    static_x = torch.randn(1, hidden, device=DEVICE, dtype=torch.bfloat16)
    step(static_x)                                                     # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(static_x)
    for i in range(20):
        x = torch.randn(1, hidden, device=DEVICE, dtype=torch.bfloat16) * (1 + i)
        static_x.copy_(x)
        graph.replay()
        assert torch.equal(static_out, step(x)), f"replay {i}"


@pytest.mark.parametrize("num_rows", (1, 3) + BATCHES[1:])     # 3: the GEMV kernel with a masked row
@pytest.mark.parametrize("out_features,in_features", SHAPES)
def test_w4a16_kernel_matches_reference(num_rows, out_features, in_features):
    from nanovllm.ops.quant_linear_triton import w4a16_linear_triton

    generator = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(num_rows, in_features, device=DEVICE, dtype=torch.bfloat16, generator=generator)
    codes = torch.randint(0, 16, (out_features, in_features), device=DEVICE, generator=generator)
    groups = in_features // 128
    scales = torch.rand(out_features, groups, device=DEVICE, generator=generator) * 0.01
    zeros = torch.randint(0, 16, (out_features, groups), device=DEVICE, generator=generator).to(torch.uint8)
    qweight = pack_int4(codes)
    out = w4a16_linear_triton(x, qweight, scales, zeros)
    assert relative_error(out, w4a16_linear_torch(x, qweight, scales, zeros)) < 1e-2


@pytest.mark.parametrize("num_rows", (3, 16))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_features,in_features", SHAPES)
def test_w4a16_tensor_core_gemv_matches_the_reference_given_float32_x(num_rows, dtype, out_features, in_features,
                                                                       poisoned_outputs):
    """The tensor-core GEMV multiplies q - z exactly in 16 bits and applies each group's scale to the
    float32 sum, so its float32 partials are the reference's given float32 x to float32 rounding (1e-5),
    not to the weight's 16-bit rounding; every partial written (the outputs start as NaN)."""
    from nanovllm.ops import quant_linear_triton as kernels

    generator = torch.Generator(device=DEVICE).manual_seed(num_rows)
    x = torch.randn(num_rows, in_features, device=DEVICE, dtype=dtype, generator=generator)
    codes = torch.randint(0, 16, (out_features, in_features), device=DEVICE, generator=generator)
    scales = torch.rand(out_features, in_features // 128, device=DEVICE, generator=generator) * 0.01
    zeros = torch.randint(0, 16, scales.shape, device=DEVICE, generator=generator).to(torch.uint8)
    qweight = pack_int4(codes)
    assert kernels.takes_w4a16_dot_gemv(x, zeros, 128)
    tiles = replace(kernels.choose_w4a16_dot_tiles(num_rows, out_features, in_features // 128, x.device), split_k=4)
    out = kernels.w4a16_linear_tiles(x, qweight, scales, zeros, None, tiles)                    # [4, M, N]
    assert relative_error(out.sum(0), w4a16_linear_torch(x.float(), qweight, scales, zeros)) < 1e-5


def row_gemv_operands(out_features: int, in_features: int, group_size: int, seed: int):
    """One bfloat16 row x [1, K] and a 4-bit weight (qweight, scales, zeros) on the GPU: integer zero
    points, or for groups of 32 GGUF's Q4_K float32 offsets (w = q s - m)."""
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(1, in_features, device=DEVICE, dtype=torch.bfloat16, generator=generator)
    codes = torch.randint(0, 16, (out_features, in_features), device=DEVICE, generator=generator)
    scales = torch.rand(out_features, in_features // group_size, device=DEVICE, generator=generator) * 0.01
    if group_size == 32:
        zeros = torch.rand(scales.shape, device=DEVICE, generator=generator) * 0.1
    else:
        zeros = torch.randint(0, 16, scales.shape, device=DEVICE, generator=generator).to(torch.uint8)
    return x, pack_int4(codes), scales, zeros


@pytest.mark.parametrize("group_size", [128, 32], ids=["w4a16", "gguf-4-bit"])
@pytest.mark.parametrize("block_k,rows,warps", [(512, 4, 1), (512, 8, 2), (128, 8, 1)])
@pytest.mark.parametrize("out_features,in_features", SHAPES + ((200, 1024),))
def test_w4a16_row_gemv_matches_the_reference_given_float32_x(block_k, rows, warps, out_features, in_features,
                                                               group_size, monkeypatch, poisoned_outputs):
    """The one-row GEMV that keeps many rows' words in a thread (each thread loading its x as 16-byte
    pairs in PTX): its products are exact in float32 and meet the scale once a row and step, so its
    float32 partials are the reference's given float32 x to float32 rounding; every partial written
    (the outputs start as NaN), a width that no tile divides, and the dispatch at one row."""
    from nanovllm.ops import quant_linear_triton as kernels

    x, qweight, scales, zeros = row_gemv_operands(out_features, in_features, group_size, seed=in_features)
    monkeypatch.setattr(kernels, "ROW_GEMV", True)
    monkeypatch.setattr(kernels, "ROW_GEMV_MIN_WEIGHTS", 0)
    assert kernels.takes_w4a16_row_gemv(x, zeros, group_size)
    tiles = replace(kernels.choose_w4a16_row_tiles(out_features, in_features // block_k, x.device, rows, warps,
                                                   block_k=block_k), split_k=3)
    out = kernels.w4a16_linear_tiles(x, qweight, scales, zeros, None, tiles)                    # [3, 1, N]
    reference = w4a16_linear_torch(x.float(), qweight, scales, zeros)
    assert relative_error(out.sum(0), reference) < 1e-5
    chosen = kernels.w4a16_linear_triton(x, qweight, scales, zeros)
    assert relative_error(chosen, reference) < 1e-2


@pytest.mark.parametrize("group_size", [128, 32], ids=["w4a16", "gguf-4-bit"])
@pytest.mark.parametrize("intermediate,hidden", [(8192, 2048), (14336, 4096)])     # Llama-3.2-1B, Llama-3.1-8B
def test_w4a16_gated_row_gemv_is_the_row_gemv_then_silu_and_mul(intermediate, hidden, group_size, poisoned_outputs):
    """gate_up_proj's one-row GEMV with the SiLU in its epilogue, as the engine launches it (x loaded as
    16-byte pairs, launched early): the bits of the row GEMV followed by the SiLU-and-mul kernel, every
    output written (they start as NaN)."""
    from nanovllm.ops import quant_linear_triton as kernels
    from nanovllm.ops.activation_triton import silu_and_mul_triton

    x, qweight, scales, zeros = row_gemv_operands(2 * intermediate, hidden, group_size, seed=hidden + group_size)
    fused = kernels.w4a16_linear_silu_and_mul_triton(x, qweight, scales, zeros)
    assert fused is not None and fused.shape == (1, intermediate)
    assert torch.equal(fused, silu_and_mul_triton(kernels.w4a16_linear_triton(x, qweight, scales, zeros)))


GGUF_SHAPES = SHAPES[:4]     # Llama-3.2-1B's


@pytest.mark.parametrize("num_rows", (1, 3) + BATCHES[1:])
@pytest.mark.parametrize("out_features,in_features", GGUF_SHAPES)
@pytest.mark.parametrize("layout", ["q4_k", "q4_0", "q8_0", "q6_k", "q6_k+q4_k", "int8-channel", "e4m3-block"])
def test_gguf_layouts_match_reference(layout, num_rows, out_features, in_features):
    """GGUF's layouts: Q4_K as W4A16 codes with float offsets per 32, Q4_0 with the zero point 8
    per 32, Q8_0 and Q6_K as int8 codes with a scale per 32 or 16, a layer mixing Q6_K and Q4_K
    with offsets as well; int8 codes with one scale a row (compressed-tensors' W8A8, channel-wise
    W8A16); e4m3 codes with a scale per 128 (block-scaled FP8 checkpoints)."""
    from nanovllm.ops.quant_linear_triton import w4a16_linear_triton, w8a16_linear_triton

    generator = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(num_rows, in_features, device=DEVICE, dtype=torch.bfloat16, generator=generator)
    group_size = {"q4_k": 32, "q4_0": 32, "q8_0": 32, "int8-channel": in_features, "e4m3-block": 128}.get(layout, 16)
    groups = in_features // group_size
    scales = torch.rand(out_features, groups, device=DEVICE, generator=generator) * 0.01
    offsets = torch.rand(out_features, groups, device=DEVICE, generator=generator) * 0.05
    if layout in ("q4_k", "q4_0"):
        qweight = pack_int4(torch.randint(0, 16, (out_features, in_features), device=DEVICE, generator=generator))
        if layout == "q4_0":
            offsets = torch.full((out_features, groups), 8, device=DEVICE, dtype=torch.uint8)
        out = w4a16_linear_triton(x, qweight, scales, offsets)
        reference = w4a16_linear_torch(x, qweight, scales, offsets)
    else:
        qweight = torch.randint(-128, 128, (out_features, in_features), device=DEVICE,
                                generator=generator).to(torch.int8)
        offsets = offsets if layout == "q6_k+q4_k" else None
        if layout == "e4m3-block":
            qweight = qweight.to(torch.float8_e4m3fn)
        out = w8a16_linear_triton(x, qweight, scales, offsets)
        reference = w8a16_linear_torch(x, qweight, scales, offsets)
    assert relative_error(out, reference) < 1e-2


@pytest.mark.parametrize("main_type", ["Q4_K", "Q5_K", "Q4_0", "Q4_1"])
def test_gguf_tiny_model_on_the_gpu_matches_the_cpu_references(main_type, tiny_llama, tmp_path, monkeypatch):
    """A "_M"-like GGUF (v and down in Q6_K, the rest `main_type`, the embedding Q8_0) loads
    quantized by default on CUDA, and runs as the torch references run it on the CPU (bfloat16 on
    both sides). gate_up_proj: Q4_K and Q4_1 as 4-bit codes with float offsets, Q4_0 with the
    integer zero point 8, Q5_K as int8 codes with offsets."""
    from conftest import PagedSequence, write_tiny_gguf

    from nanovllm.model.loader import load_model
    from nanovllm.model.quantization.layers import W4A16Linear, W8A16Linear

    monkeypatch.setenv("NANO_VLLM_CACHE", str(tmp_path / "cache"))

    def mix(name: str) -> str:
        if name.startswith(("token_embd", "output")):
            return "Q8_0"
        return "Q6_K" if ".attn_v." in name or ".ffn_down." in name else main_type

    path = str(write_tiny_gguf(tiny_llama, tmp_path / f"{main_type}-mix.gguf", mix))
    prompt = [256, 17, 99, 3, 250, 64, 7, 180, 42, 5]
    gpu, _ = load_model(path, device=DEVICE, dtype=torch.bfloat16)
    assert isinstance(gpu.layers[0].self_attn.qkv_proj, W8A16Linear)
    assert isinstance(gpu.layers[0].mlp.gate_up_proj, W8A16Linear if main_type == "Q5_K" else W4A16Linear)
    cpu, _ = load_model(path, device="cpu", dtype=torch.bfloat16, quantization="gguf")
    on_cpu = PagedSequence(cpu).step(prompt)
    # bfloat16 activations rounded in different orders, carried far by the tiny model's sharp attention
    # (fp8 and w4a16 above: under 0.07); a decoding or packing bug is off by the whole output
    assert relative_error(PagedSequence(gpu).step(prompt).cpu(), on_cpu) < 0.1


@pytest.mark.parametrize("method", ["fp8", "w4a16"])
def test_quantized_tiny_model_on_the_gpu_matches_the_cpu_references(tiny_llama, method):
    from conftest import PagedSequence

    from nanovllm.model.loader import load_model

    prompt = [256, 17, 99, 3, 250, 64, 7, 180, 42, 5]
    gpu, _ = load_model(str(tiny_llama), device=DEVICE, dtype=torch.bfloat16, quantization=method)
    cpu, _ = load_model(str(tiny_llama), device="cpu", dtype=torch.bfloat16, quantization=method)
    unquantized, _ = load_model(str(tiny_llama), device="cpu", dtype=torch.bfloat16)
    on_cpu = PagedSequence(cpu).step(prompt)
    # The two sides round activations (fp8) and sums in different orders, and the tiny model's sharp
    # attention carries a flipped rounding far; a loading or packing bug is off by the whole output.
    # So the bound is relative to what quantizing costs: the GPU must be clearly nearer the CPU's
    # quantized model than that model is to the unquantized one (measured on an H200: fp8 0.063
    # against a quantization error of 0.098; w4a16 under 0.03).
    quantization_error = relative_error(on_cpu, PagedSequence(unquantized).step(prompt))
    error = relative_error(PagedSequence(gpu).step(prompt).cpu(), on_cpu)
    assert error < max(3e-2, 0.75 * quantization_error), (error, quantization_error)


@pytest.mark.parametrize("method", ["fp8", "w4a16"])
def test_quantized_engine_decodes_the_same_through_cuda_graphs(tiny_llama, method, monkeypatch):
    """13 sequences: the decode graph (batch 16, the 3 padding rows zeros) gives the eager tokens, and
    their log-probabilities to float32 rounding. A row's quantized products do not depend on the other
    rows (13 and 16 rows take the same tiles, and FP8 quantizes each row's activations alone), so the
    two runs must agree exactly, not merely to a near-tie. Attention is held to one split of the
    context in both: the graph's split count follows the block table's width and the eager step's its
    context (a different summation order on purpose, which the attention tests bound), and this
    sharp bfloat16 model turns one flipped rounding there into a different token."""
    from nanovllm import LLM, SamplingParams
    from nanovllm.ops import attention_triton

    monkeypatch.setattr(attention_triton, "_step_kv_splits", lambda *args: 1)
    prompts = [list(range(3 + i, 20 + 3 * i)) for i in range(13)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    runs = []
    for enforce_eager in (False, True):
        llm = LLM(str(tiny_llama), device=DEVICE, dtype="bfloat16", quantization=method, max_num_seqs=16,
                  enforce_eager=enforce_eager, num_kv_blocks=64)
        assert (llm.engine.runner.decode_graphs is None) == enforce_eager
        runs.append([o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)])
        del llm
    for index, (graphed, eager) in enumerate(zip(*runs)):
        if graphed.token_ids != eager.token_ids:
            step = next(i for i, (a, b) in enumerate(zip(graphed.token_ids, eager.token_ids)) if a != b)
            raise AssertionError(f"sequence {index} parts at step {step}: graph {graphed.logprobs[step]}, "
                                 f"eager {eager.logprobs[step]}; the step before: graph "
                                 f"{graphed.logprobs[step - 1]}, eager {eager.logprobs[step - 1]}")
        for step, (mine, theirs) in enumerate(zip(graphed.logprobs, eager.logprobs)):
            assert mine.keys() == theirs.keys(), f"sequence {index} step {step}"
            assert list(mine.values()) == pytest.approx(list(theirs.values()), abs=1e-4), \
                f"sequence {index} step {step}"


@pytest.mark.parametrize("between", ["as set", "every kind"])
@pytest.mark.parametrize("method", [None, "fp8", "w4a16", "w4a16-row"])
def test_one_sequence_decodes_the_same_with_its_gemvs_launched_early(tiny_llama, method, between, monkeypatch):
    """A decode step of one sequence through the CUDA graphs: its GEMVs and the kernels between them
    launched early (PDL; PDL_BETWEEN as set, or every kind of kernel between GEMVs), gate_up_proj's FP8
    and W4A16 GEMVs with the SiLU in them (w4a16-row: the one-row GEMV taken by every layer, in steps
    of 256), and gate_up_proj's partials added up by SiLU-and-mul; or none of these. The kernels multiply alike either way, so tokens and
    log-probabilities must be the same bits; a kernel launched early that read its input before the
    kernel writing it had finished would part from the other run."""
    import nanovllm.ops as ops
    from nanovllm import LLM, SamplingParams
    from nanovllm.ops import activation, quant_linear_triton

    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, logprobs=2)
    if between == "every kind":
        monkeypatch.setattr(ops, "PDL_BETWEEN", ops.PDL_KINDS)
    fused = []
    if method == "w4a16-row":       # the tiny model's 256 features: steps of 256, any layer
        monkeypatch.setattr(quant_linear_triton, "ROW_GEMV_BLOCK_K", 256)
        monkeypatch.setattr(quant_linear_triton, "ROW_GEMV_MIN_WEIGHTS", 0)
        gated = quant_linear_triton.w4a16_linear_silu_and_mul_triton
        monkeypatch.setattr(quant_linear_triton, "w4a16_linear_silu_and_mul_triton",
                            lambda *args: fused.append(gated(*args)) or fused[-1])
    runs = []
    for early in (True, False):
        monkeypatch.setattr(ops, "PDL", early)
        monkeypatch.setattr(quant_linear_triton, "FUSED_SILU", early)
        monkeypatch.setattr(activation, "PARTIALS_INTO_SILU", early)
        llm = LLM(str(tiny_llama), device=DEVICE, dtype="bfloat16",
                  quantization="w4a16" if method == "w4a16-row" else method, max_num_seqs=4, num_kv_blocks=64)
        assert llm.engine.runner.decode_graphs is not None
        runs.append(llm.generate([list(range(5, 30))], params, use_tqdm=False)[0].outputs[0])
        del llm
    assert runs[0].token_ids == runs[1].token_ids
    assert runs[0].logprobs == runs[1].logprobs
    assert len(set(runs[0].token_ids)) > 4        # neither constant nor a short loop
    if method == "w4a16-row":       # gate_up_proj's GEMV wrote silu(gate) * up in the first run, not the second
        assert any(out is not None for out in fused) and fused[-1] is None


@pytest.mark.parametrize("hidden,intermediate", [(2048, 8192), (4096, 14336)])   # Llama-3.2-1B, Llama-3.1-8B
@pytest.mark.parametrize("num_rows", [2, 7, 64, 256])
def test_norms_and_silu_and_mul_write_the_rows_the_product_after_them_asks_for(num_rows, hidden, intermediate):
    """On the GPU's own e4m3 cast, in bfloat16: the fp8=True norms and SiLU-and-mul write the codes
    and scales of quantize_fp8_rows_triton on their plain output, bit for bit."""
    from nanovllm.ops.activation_triton import silu_and_mul_triton
    from nanovllm.ops.rmsnorm_triton import add_rms_norm_triton, rms_norm_triton

    torch.manual_seed(num_rows)
    x = torch.randn(num_rows, hidden, device=DEVICE, dtype=torch.bfloat16) * 3
    residual = torch.randn_like(x)
    weight = torch.randn(hidden, device=DEVICE, dtype=torch.bfloat16)
    assert_same_fp8_rows(rms_norm_triton(x, weight, 1e-5, fp8=True), rms_norm_triton(x, weight, 1e-5))
    partials = torch.randn(4, num_rows, hidden, device=DEVICE)
    for given in (x, partials):
        rows, new_residual = add_rms_norm_triton(given, residual, weight, 1e-5, fp8=True)
        plain, plain_residual = add_rms_norm_triton(given, residual, weight, 1e-5)
        assert_same_fp8_rows(rows, plain)
        assert torch.equal(new_residual, plain_residual)
    gate_up = torch.randn(num_rows, 2 * intermediate, device=DEVICE, dtype=torch.bfloat16) * 4
    assert_same_fp8_rows(silu_and_mul_triton(gate_up, fp8=True), silu_and_mul_triton(gate_up))


@pytest.mark.parametrize("method", ["fp8"])
def test_a_batch_decodes_the_same_with_its_rows_quantized_by_the_norms(tiny_llama, method, monkeypatch):
    """Thirteen sequences through the CUDA graphs, their W8A8 products given rows that the norms
    and SiLU-and-mul quantized, or quantizing their rows themselves: the same codes into the same
    GEMM, so the same tokens and log-probabilities, to the bit."""
    from nanovllm import LLM, SamplingParams
    from nanovllm.ops import quant_linear

    prompts = [list(range(3 + i, 20 + 3 * i)) for i in range(13)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    runs = []
    for fused in (True, False):
        monkeypatch.setattr(quant_linear, "FP8_ROWS_FROM_PRODUCER", fused)
        llm = LLM(str(tiny_llama), device=DEVICE, dtype="bfloat16", quantization=method, max_num_seqs=16,
                  num_kv_blocks=64)
        assert llm.engine.runner.decode_graphs is not None
        runs.append([o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)])
        del llm
    for fused, unfused in zip(*runs):
        assert fused.token_ids == unfused.token_ids
        assert fused.logprobs == unfused.logprobs
    assert len({token for run in runs[0] for token in run.token_ids}) > 8      # neither constant nor one loop


@pytest.mark.parametrize("intermediate", [8192, 14336])      # Llama-3.2-1B, Llama-3.1-8B
@pytest.mark.parametrize("num_partials,num_rows", [(4, 1), (2, 1), (8, 2)])
def test_silu_and_mul_adds_up_partial_products_as_sum_partials_does(intermediate, num_partials, num_rows):
    """On the GPU, in bfloat16: SiLU-and-mul given gate_up_proj's float32 partial products writes the
    bits of sum_partials followed by SiLU-and-mul."""
    from nanovllm.ops.activation_triton import silu_and_mul_triton
    from nanovllm.ops.quant_linear_triton import sum_partials

    torch.manual_seed(num_partials)
    partials = torch.randn(num_partials, num_rows, 2 * intermediate, device=DEVICE) * 4
    summed = sum_partials(partials, torch.bfloat16)
    assert torch.equal(silu_and_mul_triton(partials, partials_dtype=torch.bfloat16), silu_and_mul_triton(summed))
