"""Quantized weights under tensor parallelism (CPU, gloo): each rank's quantized layers hold its rows
(q/k/v, gate/up) or its inputs (o, down) of the one-rank model's, to the bit once dequantized, and
two ranks give one rank's greedy tokens and log-probabilities.

Every checkpoint format's shards are held to one rank's weights bit for bit. The greedy test takes
GGUF and GPTQ, whose products differ from one rank's by summation order only; FP8 quantizes each
row of activations over the inputs a rank has, so two ranks round o_proj's and down_proj's inputs
over half a row each, and the tiny model's sharp attention turns that into other tokens within a
few steps (checked on two GPUs only for each prompt's first token, tests/gpu)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import write_tiny_gguf
from test_gguf_quantized import q4_k_m
from test_tensor_parallel import (ENGINE_ARGS, assert_logprobs_close, assert_no_children_left, greedy_logprobs,
                                  greedy_tokens)

from nanovllm import LLM
from nanovllm.model.loader import load_model
from nanovllm.model.quantization.layers import Fp8Linear, W4A16Linear, W8A16Linear
from nanovllm.ops.quant_linear import dequantize_w4, dequantize_w8

# llama-gqa4 with 2 KV heads: hidden 256, 4 q heads of 64, intermediate 256 (each rank: 128 inputs of o and down)
MODEL = ("llama-gqa4", dict(num_key_value_heads=2))


def checkpoint(fmt: str, src: Path, root: Path) -> tuple[str, dict]:
    """(path, load_model keyword arguments) of the tiny model at `src` in format `fmt`."""
    if fmt == "gguf-q4_k_m":
        return str(write_tiny_gguf(src, root / "q4_k_m.gguf", q4_k_m)), dict(quantization="gguf")
    if fmt in ("gptq", "awq", "gptq-int8"):
        from test_quant_formats import write_four_bit      # (it needs compressed-tensors, which the GPU tests do not)
        return str(write_four_bit(src, root / fmt, fmt.removesuffix("-int8"), bits=8 if "int8" in fmt else 4)[0]), {}
    if fmt == "fp8-block":
        from test_quant_formats import write_fp8_block
        return str(write_fp8_block(src, root / fmt)), {}
    if fmt.startswith("compressed-"):
        from test_quant_formats import write_compressed_tensors
        scheme = {"compressed-w4a16": "W4A16", "compressed-fp8": "FP8_DYNAMIC", "compressed-w8a8": "W8A8",
                  "compressed-w6a16-asym": "W6A16_ASYM"}[fmt]
        return str(write_compressed_tensors(src, root / "quantized", scheme)[0]), {}
    return str(src), dict(quantization=fmt.removeprefix("online-"))


def dense(layer: torch.nn.Module) -> torch.Tensor:
    """A linear layer's weight [N, K] in float32, as the torch references dequantize it."""
    if isinstance(layer, Fp8Linear):
        return layer.weight.float() * layer.weight_scale[:, None]
    if isinstance(layer, W4A16Linear):
        return dequantize_w4(layer.qweight, layer.scales, layer.zeros)
    if isinstance(layer, W8A16Linear):
        return dequantize_w8(layer.qweight, layer.scales, layer.offsets)
    return layer.weight.float()


FORMATS = {   # format -> the layer types of qkv_proj and down_proj
    "gguf-q4_k_m": (W8A16Linear, W8A16Linear), "gptq": (W4A16Linear, W4A16Linear),
    "awq": (W4A16Linear, W4A16Linear), "gptq-int8": (W8A16Linear, W8A16Linear),
    "compressed-w4a16": (W4A16Linear, W4A16Linear),
    "compressed-fp8": (Fp8Linear, Fp8Linear), "compressed-w8a8": (W8A16Linear, W8A16Linear),
    "compressed-w6a16-asym": (W8A16Linear, W8A16Linear), "fp8-block": (W8A16Linear, W8A16Linear),
    "online-w4a16": (W4A16Linear, W4A16Linear),
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_rank_holds_its_rows_or_inputs_of_the_quantized_layers(fmt, tiny_model_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("NANO_VLLM_CACHE", str(tmp_path / "cache"))
    path, kwargs = checkpoint(fmt, tiny_model_factory(MODEL[0], **MODEL[1]), tmp_path)
    full, config = load_model(path, **kwargs)
    shards = [load_model(path, tp_rank=rank, tp_size=2, **kwargs)[0] for rank in range(2)]
    q, kv, inter = (config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim,
                    config.intermediate_size)
    for index, (full_layer, *shard_layers) in enumerate(zip(full.layers, *(shard.layers for shard in shards))):
        full_q, full_k, full_v = dense(full_layer.self_attn.qkv_proj).split([q, kv, kv])
        gate, up = dense(full_layer.mlp.gate_up_proj).split([inter, inter])
        for rank, layer in enumerate(shard_layers):
            attn, mlp = layer.self_attn, layer.mlp
            assert (type(attn.qkv_proj), type(mlp.down_proj)) == FORMATS[fmt]
            rows = lambda size: slice(rank * size // 2, (rank + 1) * size // 2)   # noqa: E731
            assert torch.equal(dense(attn.qkv_proj), torch.cat([full_q[rows(q)], full_k[rows(kv)], full_v[rows(kv)]]))
            assert torch.equal(dense(attn.o_proj), dense(full_layer.self_attn.o_proj)[:, rows(q)])
            assert torch.equal(dense(mlp.gate_up_proj), torch.cat([gate[rows(inter)], up[rows(inter)]]))
            assert torch.equal(dense(mlp.down_proj), dense(full_layer.mlp.down_proj)[:, rows(inter)]), (index, rank)


@pytest.mark.parametrize("fmt", ["gguf-q4_k_m", "gptq"])
def test_two_ranks_of_a_quantized_model_give_the_greedy_tokens_of_one(fmt, tiny_model_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("NANO_VLLM_CACHE", str(tmp_path / "cache"))
    src = tiny_model_factory(MODEL[0], **MODEL[1])
    path, kwargs = checkpoint(fmt, src, tmp_path)
    kwargs["tokenizer"] = str(src)         # the tiny GGUF carries no tokenizer
    one = LLM(path, **kwargs, **ENGINE_ARGS)
    expected, expected_logprobs = greedy_tokens(one), greedy_logprobs(one)
    llm = LLM(path, tensor_parallel_size=2, **kwargs, **ENGINE_ARGS)
    try:
        assert type(llm.engine.runner.model.layers[0].mlp.down_proj) is FORMATS[fmt][1]
        assert greedy_tokens(llm) == expected
        assert_logprobs_close(greedy_logprobs(llm), expected_logprobs)
    finally:
        llm.engine.shutdown()
    assert_no_children_left()


def test_a_group_larger_than_a_ranks_share_of_the_inputs_is_refused_naming_the_share(tiny_model_factory, tmp_path,
                                                                                      monkeypatch):
    """qwen3's o_proj has 128 inputs, 64 a rank at TP=2: GPTQ groups of 128 fit one rank, not two."""
    import test_quant_formats

    monkeypatch.setattr(test_quant_formats, "GROUP_SIZE", 128)
    path = str(test_quant_formats.write_four_bit(tiny_model_factory("qwen3"), tmp_path / "gptq", "gptq")[0])
    load_model(path)
    with pytest.raises(ValueError, match=r"group size \(128\).*each rank's share.*tensor_parallel_size=2"):
        load_model(path, tp_rank=1, tp_size=2)
