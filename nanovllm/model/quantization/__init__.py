"""Quantized checkpoints: which method a model uses, and how its weights get into the model.

A quantized checkpoint says how it was made in config.json's `quantization_config`
(`quant_method`: "compressed-tensors", "gptq", "awq", "fp8" with block scales); a float
checkpoint can also be quantized once loaded (`quantization="fp8"`, as vLLM's online fp8, or
"w4a16": 4-bit round-to-nearest in groups of 128, for trying the format's speed; GPTQ and AWQ lose
less; "gguf-q8_0" and "gguf-q4_k" likewise give the layouts of GGUF's blocks). A GGUF file's
legacy (Q4_0 ... Q8_0), k-quant (Q2_K ... Q6_K) and IQ4 blocks load as they are (gguf.py; on CUDA
by default). Whatever the method, the linear layers of the decoder (q/k/v, o, gate/up, down)
become one of three layers (layers.py): Fp8Linear (e4m3 weights, per-channel scales), W4A16Linear
(4-bit codes in groups) or W8A16Linear (int8 or e4m3 codes in groups). Each method is a
`QuantizationMethod` that names the layer it builds and turns the checkpoint's tensors of one
HuggingFace linear module (`...q_proj.qweight`, `...q_proj.scales`, ...) into that layer's
tensors. `quantized_weights` does the routing: tensors of quantized modules are converted and
copied into their (fused) layer (this rank's share of it under tensor parallelism), all others
go on to `LlamaForCausalLM.load_weights` unchanged. An online method converts the
loaded model's float layers instead (`quantize_loaded_model`).

The embeddings and norms stay in the model's dtype, and so does the LM head, except under
online fp8 (online.py).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from nanovllm.model.errors import ModelLoadError
from nanovllm.model.quantization.method import QuantizationMethod, quantized_weights

from nanovllm.config import ONLINE_METHODS
CHECKPOINT_METHODS = ("compressed-tensors", "gptq", "awq", "fp8")
_LINEARS = (("self_attn", "qkv_proj"), ("self_attn", "o_proj"), ("mlp", "gate_up_proj"), ("mlp", "down_proj"))


def quantization_method(quantization_config: dict[str, Any] | None, online: str | None = None,
                        tp_size: int = 1, source: str = "config.json") -> QuantizationMethod | None:
    """The method of a checkpoint's `quantization_config`, or the online method `online`; None
    for a float model. ValueError or ModelLoadError for a method or a setting nano-vllm cannot run."""
    method = _method(quantization_config, online, source)
    if getattr(method, "desc_act", False) and tp_size > 1:
        raise ValueError("a GPTQ checkpoint with act order (desc_act) runs with tensor_parallel_size=1: its "
                         "groups gather inputs from every rank's share of o_proj and down_proj")
    return method


def _method(quantization_config: dict[str, Any] | None, online: str | None,
            source: str) -> QuantizationMethod | None:
    if online is not None:
        if online not in ONLINE_METHODS:
            raise ValueError(f"quantization={online!r} is not supported; use one of {', '.join(ONLINE_METHODS)} "
                             "or leave it out")
        if quantization_config is not None:
            raise ValueError(f"the checkpoint is already quantized ({quantization_config.get('quant_method')!r}); "
                             f"leave quantization={online!r} out")
        from nanovllm.model.quantization.online import OnlineFp8, OnlineQ4_K, OnlineQ8_0, OnlineW4A16
        return {"fp8": OnlineFp8, "w4a16": OnlineW4A16, "gguf-q8_0": OnlineQ8_0, "gguf-q4_k": OnlineQ4_K}[online]()
    if quantization_config is None:
        return None
    name = str(quantization_config.get("quant_method", "")).lower()
    if name == "compressed-tensors":
        from nanovllm.model.quantization.compressed_tensors import CompressedTensors
        return CompressedTensors.from_config(quantization_config, source)
    if name == "fp8":
        from nanovllm.model.quantization.fp8_block import Fp8Block
        return Fp8Block.from_config(quantization_config, source)
    if name in ("gptq", "awq"):
        from nanovllm.model.quantization.gptq_awq import Awq, Gptq
        return (Gptq if name == "gptq" else Awq).from_config(quantization_config, source)
    raise ModelLoadError(f"{source}: quantization method {name or '(none named)'!r} is not supported; nano-vllm "
                         f"loads {', '.join(CHECKPOINT_METHODS)} checkpoints, or quantizes a float checkpoint "
                         f"with quantization={' or '.join(repr(m) for m in ONLINE_METHODS)}")


def load_quantized_checkpoint(model: nn.Module, method: QuantizationMethod,
                              weights: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    """Give `model` (built, weights empty) `method`'s layers; -> the checkpoint's tensors that
    `load_weights` fills, the quantized ones being copied into those layers on the way."""
    for parent, attr, linear in _linears(model):
        with _like(linear.weight), _naming_the_shard(model):
            setattr(parent, attr, method.make_layer(linear.in_features, linear.out_features, linear.bias is not None))
    return quantized_weights(model, method, weights)


def quantize_loaded_model(model: nn.Module, method: QuantizationMethod) -> None:
    """Replace each float linear layer of the decoder by `method`'s layer of its weight, and the LM
    head by its `lm_head_method`'s (if any), in place."""
    linears = [(parent, attr, linear, method) for parent, attr, linear in _linears(model)]
    head_method = method.lm_head_method()
    if head_method is not None:
        linears.append((model, "lm_head", model.lm_head, head_method))
    for parent, attr, linear, layer_method in linears:
        with _like(linear.weight), _naming_the_shard(model):
            layer = layer_method.make_layer(linear.in_features, linear.out_features, linear.bias is not None)
        for name, value in layer_method.convert(attr, {"weight": linear.weight.data}).items():
            getattr(layer, name).copy_(value)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.data)
        setattr(parent, attr, layer)


def _linears(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Linear]]:
    """(parent module, attribute, nn.Linear) of each linear layer of the decoder."""
    for layer in model.layers:
        for parent_name, attr in _LINEARS:
            parent = getattr(layer, parent_name)
            yield parent, attr, getattr(parent, attr)


@contextmanager
def _naming_the_shard(model: nn.Module):
    """A layer's ValueError (a group size that does not divide its inputs) says, under tensor
    parallelism, that the inputs are this rank's share."""
    try:
        yield
    except ValueError as e:
        world_size = model.parallel.world_size
        if world_size == 1:
            raise
        raise ValueError(f"{e} (each rank's share of the layer's inputs with tensor_parallel_size={world_size}; "
                         "use a smaller one)") from None


@contextmanager
def _like(tensor: torch.Tensor):
    """New tensors on `tensor`'s device, floats in its dtype."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(tensor.dtype)
    try:
        with torch.device(tensor.device):
            yield
    finally:
        torch.set_default_dtype(saved)
