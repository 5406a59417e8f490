"""GGUF's quantized blocks load quantized (model/quantization/gguf.py): each block decodes to the
very floats the gguf package dequantizes it to, and so does each layer's buffers through the
torch references; a tiny model loaded that way on the CPU gives the logits and greedy tokens of
the dequantized load of the same file.

The gguf package writes the 32-weight types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) but no k-quant, so
Q4_K, Q5_K and Q6_K blocks are made by conftest.quantize_k_blocks, and Q2_K, Q3_K, IQ4_NL and
IQ4_XS are random bytes only: either way gguf.quants.dequantize of the same bytes is the oracle.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import PagedSequence, assert_logits_close, quantize_k_blocks, write_tiny_gguf

from nanovllm.model.loader import keeps_gguf_blocks, load_model
from nanovllm.model.quantization.gguf import KEPT_TYPES, Layout, decode_blocks, gguf_bytes_per_weight
from nanovllm.model.quantization.layers import W4A16Linear, W8A16Linear
from nanovllm.ops.quant_linear import dequantize_w4, dequantize_w8

SHAPE = (37, 768)     # odd rows; three superblocks of 256 along K


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NANO_VLLM_CACHE", str(tmp_path / "cache"))


WRITTEN_BY_GGUF = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
WRITTEN_BY_CONFTEST = ("Q4_K", "Q5_K", "Q6_K")
GROUP_SIZE = {"Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "Q2_K": 16, "Q3_K": 16, "Q4_K": 32,
              "Q5_K": 32, "Q6_K": 16, "IQ4_NL": 32, "IQ4_XS": 32}
HAS_OFFSETS = {"Q4_1", "Q5_1", "Q2_K", "Q4_K", "Q5_K"}


def gguf_blocks(qtype: str, seed: int = 0, random_bytes: bool = False) -> np.ndarray:
    """[N, K / block * bytes] uint8 blocks of `qtype` for a weight of SHAPE: a quantized random
    weight, or random bytes (every code, scale and min bit pattern) with finite fp16 d (and dmin, m)."""
    import gguf

    rng = np.random.default_rng(seed)
    weight = rng.standard_normal(SHAPE).astype(np.float32) * 0.05
    if not random_bytes:
        if qtype in WRITTEN_BY_GGUF:
            return gguf.quants.quantize(weight, gguf.GGMLQuantizationType[qtype])
        return quantize_k_blocks(weight, qtype)
    block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    blocks = rng.integers(0, 256, (SHAPE[0] * SHAPE[1] // block_size, type_size), dtype=np.uint8)
    halves = (rng.standard_normal((blocks.shape[0], 2)) * 0.01).astype(np.float16).view(np.uint8)  # d (and dmin, m)
    columns = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82],
               "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_NL": [0], "IQ4_XS": [0]}[qtype]
    for index, column in enumerate(columns):
        blocks[:, column:column + 2] = halves[:, 2 * index:2 * index + 2]
    return blocks.reshape(SHAPE[0], -1)


def oracle(blocks: np.ndarray, qtype: str) -> torch.Tensor:
    import gguf
    return torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype]).reshape(SHAPE).copy())


# every kept type from random bytes; the types something here writes from quantized weights too
@pytest.mark.parametrize("qtype,random_bytes", [(qtype, True) for qtype in KEPT_TYPES] +
                         [(qtype, False) for qtype in WRITTEN_BY_GGUF + WRITTEN_BY_CONFTEST])
def test_blocks_decode_to_what_gguf_dequantizes_bit_for_bit(qtype, random_bytes):
    blocks = gguf_blocks(qtype, random_bytes=random_bytes)
    weight = decode_blocks(blocks, qtype, SHAPE)
    expected = oracle(blocks, qtype)
    assert weight.group_size == GROUP_SIZE[qtype]
    assert (weight.offsets is not None) == (qtype in HAS_OFFSETS)
    assert torch.equal(weight.dequantize(), expected)


@pytest.mark.parametrize("qtypes", [{"Q8_0"}, {"Q6_K"}, {"Q4_K"}, {"Q8_0", "Q6_K"}, {"Q4_K", "Q6_K"},
                                    {"Q4_K", "Q8_0"}, {"Q4_0"}, {"Q4_1"}, {"Q4_0", "Q4_K"}, {"Q4_0", "Q8_0"},
                                    {"Q5_0"}, {"Q5_1"}, {"Q5_K", "Q6_K"}, {"Q3_K", "Q4_K", "Q5_K"}, {"Q2_K"},
                                    {"IQ4_NL"}, {"IQ4_XS", "Q6_K"}])
def test_each_layout_holds_each_of_its_parts_bit_for_bit(qtypes):
    """The layer buffers, dequantized by the torch references of the kernels, are gguf's floats:
    a layer of 4-bit types alone packs 4-bit codes (Q4_0 alone with its zero point 8, else with
    offsets); any other holds int8 codes in the smallest group of its parts, with offsets when a
    part has them."""
    layout = Layout.of(qtypes)
    four_bit = qtypes <= {"Q4_0", "Q4_1", "Q4_K"}
    assert layout.kind == ("w4a16" if four_bit else "w8a16")
    assert layout.group_size == min(GROUP_SIZE[qtype] for qtype in qtypes)
    assert layout.offsets == bool(qtypes & HAS_OFFSETS)
    for seed, qtype in enumerate(sorted(qtypes)):
        blocks = gguf_blocks(qtype, seed=seed, random_bytes=True)
        buffers = layout.buffers(decode_blocks(blocks, qtype, SHAPE))
        if layout.kind == "w4a16":
            assert buffers["zeros"].dtype == (torch.float32 if layout.offsets else torch.uint8)
            weight = dequantize_w4(buffers["qweight"], buffers["scales"], buffers["zeros"])
        else:
            weight = dequantize_w8(buffers["qweight"], buffers["scales"], buffers.get("offsets"))
            assert buffers["scales"].shape == (SHAPE[0], SHAPE[1] // layout.group_size)
        assert torch.equal(weight, oracle(blocks, qtype)), qtype


def test_other_types_stay_float():
    assert Layout.of({"Q4_K", "F16"}) is None and Layout.of({"IQ2_XXS"}) is None
    assert Layout.of({"Q4_0", "IQ3_S"}) is None
    assert Layout.of({"F32"}) is None and Layout.of(set()) is None


def q4_k_m(gguf_name: str) -> str:
    """A Q4_K_M-like file: v and down in Q6_K, the other linears in Q4_K, the embedding in Q8_0."""
    if gguf_name.startswith("token_embd") or gguf_name.startswith("output"):
        return "Q8_0"
    return "Q6_K" if ".attn_v." in gguf_name or ".ffn_down." in gguf_name else "Q4_K"


def q5_k_m(gguf_name: str) -> str:
    """A Q5_K_M-like file: v and down in Q6_K, the other linears in Q5_K."""
    return "Q8_0" if gguf_name.startswith(("token_embd", "output")) else q4_k_m(gguf_name).replace("Q4_K", "Q5_K")


MIXES = {"q4_k_m": q4_k_m, "q8_0": "Q8_0", "q4_k": "Q4_K", "q5_k_m": q5_k_m, "q4_0": "Q4_0", "q4_1": "Q4_1",
         "q5_0": "Q5_0", "q5_1": "Q5_1"}


# llama's q/k rows permuted; qwen2's biases (and rows of 128: mostly Q8_0, see below)
@pytest.mark.parametrize("name,mix", [("llama-gqa4", mix) for mix in MIXES] + [("qwen2", "q4_k_m")])
def test_quantized_load_gives_the_logits_and_greedy_tokens_of_the_dequantized_load(
        name, mix, tiny_model_factory, tmp_path, private_cache):
    """Float32 activations: the references multiply by the dequantized weight in float32, as the
    dequantized model does, so the two agree to float32 rounding (the bias is added apart)."""
    path = str(write_tiny_gguf(tiny_model_factory(name), tmp_path / f"{name}-{mix}.gguf", MIXES[mix]))
    dequantized, config = load_model(path)
    quantized, _ = load_model(path, quantization="gguf")
    layers = {kind: type(getattr(getattr(quantized.layers[0], parent), kind))
              for parent, kind in (("self_attn", "qkv_proj"), ("self_attn", "o_proj"), ("mlp", "gate_up_proj"),
                                   ("mlp", "down_proj"))}
    expected = {"q4_k_m": (W8A16Linear, W4A16Linear, W4A16Linear, W8A16Linear),
                "q4_k": (W4A16Linear,) * 4, "q4_0": (W4A16Linear,) * 4, "q4_1": (W4A16Linear,) * 4}.get(
        mix, (W8A16Linear,) * 4)
    if name == "qwen2":   # hidden size 128: all but down_proj fall back to Q8_0 (write_tiny_gguf)
        expected = (W8A16Linear,) * 3 + expected[3:]
    assert tuple(layers.values()) == expected
    assert type(dequantized.layers[0].self_attn.qkv_proj) is torch.nn.Linear
    if mix == "q4_0":     # Q4_0 alone: the integer zero point 8, no float offsets
        assert quantized.layers[0].mlp.down_proj.zeros.dtype == torch.uint8
    prompt = torch.randint(0, config.vocab_size, (23,), generator=torch.Generator().manual_seed(1)).tolist()
    assert_logits_close(PagedSequence(quantized).step(prompt), PagedSequence(dequantized).step(prompt))
    assert PagedSequence(quantized).greedy(prompt, 32) == PagedSequence(dequantized).greedy(prompt, 32)


def test_the_embedded_gguf_loads_through_the_quantized_path_with_the_same_logits(private_cache):
    """SmolLM2's linears are Q4_1 (kept: 4-bit codes with float offsets, w = d q - (-m)) and its
    embedding Q8_0 (dequantized, as every embedding): float32 activations through the torch
    reference give the very logits of the dequantized, cached load."""
    from nanovllm.model.embedded import embedded_gguf_path

    path = embedded_gguf_path()
    if path is None:
        pytest.skip("the embedded model is not installed")
    prompt = [1, 504, 3458, 314, 253, 1345, 28, 2495, 30]
    quantized, _ = load_model(str(path), quantization="gguf")
    assert all(type(layer.mlp.gate_up_proj) is W4A16Linear for layer in quantized.layers)
    expected = PagedSequence(quantized).step(prompt)
    del quantized
    dequantized, _ = load_model(str(path))
    assert torch.equal(PagedSequence(dequantized).step(prompt), expected)


def test_a_quantized_load_writes_no_float_weights(tiny_model_factory, tmp_path, private_cache):
    from nanovllm.model.gguf import cache_entry

    path = str(write_tiny_gguf(tiny_model_factory("llama-gqa4"), tmp_path / "q4_k.gguf", "Q4_K"))
    load_model(path, quantization="gguf")
    assert not (cache_entry(path) / "model.safetensors").exists()
    load_model(path)
    assert (cache_entry(path) / "model.safetensors").exists()      # the dequantized load caches its floats


def test_cuda_keeps_the_blocks_by_default_and_none_or_the_cpu_do_not(tiny_model_factory, tmp_path, private_cache):
    path = str(write_tiny_gguf(tiny_model_factory("llama-gqa4"), tmp_path / "q4_k.gguf", "Q4_K"))
    float_path = str(write_tiny_gguf(tiny_model_factory("llama-gqa4"), tmp_path / "f16.gguf", "F16"))
    assert keeps_gguf_blocks(path, "auto", None, "cuda")
    assert not keeps_gguf_blocks(path, "auto", None, "cpu")
    assert not keeps_gguf_blocks(path, "auto", "none", "cuda")
    assert not keeps_gguf_blocks(path, "auto", "fp8", "cuda")
    assert not keeps_gguf_blocks(float_path, "auto", None, "cuda")
    assert keeps_gguf_blocks(path, "auto", "gguf", "cpu")
    with pytest.raises(ValueError, match="loads as safetensors"):
        keeps_gguf_blocks(str(tiny_model_factory("llama-gqa4")), "auto", "gguf", "cpu")
    with pytest.raises(ValueError, match="loads as dummy"):
        load_model("llama-3.2-1b", load_format="dummy", quantization="gguf")


def test_the_roofline_counts_the_linear_weights_as_loaded(tiny_model_factory, tmp_path, private_cache):
    hf_dir = tiny_model_factory("llama-gqa4")
    assert gguf_bytes_per_weight(str(write_tiny_gguf(hf_dir, tmp_path / "a.gguf", "Q4_K"))) == 0.5 + 8 / 32
    assert gguf_bytes_per_weight(str(write_tiny_gguf(hf_dir, tmp_path / "b.gguf", "Q8_0"))) == 1 + 4 / 32
    assert gguf_bytes_per_weight(str(write_tiny_gguf(hf_dir, tmp_path / "c.gguf", "F16"))) == 2.0
    assert gguf_bytes_per_weight(str(write_tiny_gguf(hf_dir, tmp_path / "e.gguf", "Q4_0"))) == 0.5 + 5 / 32
    assert gguf_bytes_per_weight(str(write_tiny_gguf(hf_dir, tmp_path / "f.gguf", "Q5_1"))) == 1 + 8 / 32
    # Q4_K_M-like, hidden and intermediate 256, 4 q heads and 1 kv head of 64: qkv 384 rows in
    # w8a16 with offsets (groups of 16), o 256 and gate/up 512 in w4a16, down 256 in w8a16 (groups of 16)
    mixed = gguf_bytes_per_weight(str(write_tiny_gguf(hf_dir, tmp_path / "d.gguf", q4_k_m)))
    assert mixed == pytest.approx((384 * 1.5 + 768 * 0.75 + 256 * 1.25) / 1408)


@pytest.mark.parametrize("method,layer", [("gguf-q8_0", W8A16Linear), ("gguf-q4_k", W4A16Linear)])
def test_online_gguf_layouts_quantize_a_float_model_closely(tiny_llama, method, layer):
    """The dummy-benchmark way in: a float checkpoint quantized at load into the GGUF layouts."""
    prompt = [256, 17, 99, 3, 250, 64, 7, 180, 42, 5]
    quantized, _ = load_model(str(tiny_llama), quantization=method)
    unquantized, _ = load_model(str(tiny_llama))
    assert type(quantized.layers[0].mlp.down_proj) is layer
    ours, reference = PagedSequence(quantized).step(prompt), PagedSequence(unquantized).step(prompt)
    error = ((ours - reference).norm() / reference.norm()).item()
    assert error < {"gguf-q8_0": 0.02, "gguf-q4_k": 0.2}[method], error
