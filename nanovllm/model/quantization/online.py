"""Online quantization: a float checkpoint (or dummy weights) quantized once loaded.

fp8 and w4a16 quantize the LM head as well as the decoder's linear layers: decode reads it every
step, and in 16 bits it would be a fifth of Llama-3.2-1B's bytes. Both store it in e4m3 (w4a16
too: 4-bit round-to-nearest moved the tiny test model's logits by 10% of their range, e4m3 by
4%); a decode step of one sequence multiplies it weight-only, its activations unrounded
(ops/quant_linear.py). A head tied to the embedding gets its own e4m3 copy; the embedding stays
16-bit for its lookups.

- **fp8** (vLLM's `quantization="fp8"`): each row (output channel) of a linear weight gets
  the scale amax(|row|) / 448, so its largest weight lands on e4m3's largest value;
  activations are quantized per row at run time. No calibration data is needed.
- **w4a16**: round-to-nearest 4-bit codes in groups of 128 along K (64 or 32 where 128 does
  not divide K), asymmetric like compressed-tensors' W4A16_ASYM: each group's range [min, max]
  (widened to hold 0) maps onto 0..15 with scale (max - min) / 15 and an integer zero. No
  calibration either; GPTQ and AWQ checkpoints lose less quality, this is for measuring the
  format's speed on any model.
- **gguf-q8_0**, **gguf-q4_k**: the layouts GGUF's Q8_0 and Q4_K files load into (gguf.py), by
  round-to-nearest: int8 codes with a scale per 32 (stored in float16, as Q8_0 stores it), and
  4-bit codes with a float scale and offset per 32 (each group's [min, max], widened to hold 0,
  onto 0..15). Not llama.cpp's quantizer (its 6-bit sub-scales): for timing a GGUF's kernels on
  any model, e.g. `nano-vllm bench latency --dummy llama-3.2-1b --quantization gguf-q4_k`.
"""
from __future__ import annotations

import torch
from torch import nn

from nanovllm.model.errors import ModelLoadError
from nanovllm.model.quantization.layers import Fp8Linear, W4A16Linear, W8A16Linear
from nanovllm.model.quantization.method import QuantizationMethod, grouped_bytes_per_weight
from nanovllm.ops.quant_linear import pack_int4, quantize_fp8_per_channel

W4_GROUP_SIZE = 128
# w4a16's LM head in its own 4-bit format rather than e4m3: half the bytes again, at the cost in its
# logits that the module docstring gives.
W4A16_HEAD_IN_4_BITS = False


def _float_weight(module: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    weight = tensors["weight"]
    if not weight.is_floating_point() or weight.dim() != 2:
        raise ModelLoadError(f"{module}.weight is {weight.dtype} of shape {tuple(weight.shape)}; online "
                             "quantization needs a float checkpoint")
    return weight


class OnlineFp8(QuantizationMethod):
    name = "fp8"
    online = True
    quantizes_lm_head = True

    def make_layer(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        return Fp8Linear(in_features, out_features, bias)

    def convert(self, module: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        quantized, scale = quantize_fp8_per_channel(_float_weight(module, tensors))
        return {"weight": quantized, "weight_scale": scale}


class OnlineW4A16(QuantizationMethod):
    name = "w4a16"
    online = True
    group_size = W4_GROUP_SIZE
    quantizes_lm_head = True

    def lm_head_method(self) -> QuantizationMethod:
        return self if W4A16_HEAD_IN_4_BITS else OnlineFp8()     # e4m3 by default (the module docstring)

    def make_layer(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        return W4A16Linear(in_features, out_features, _group_size(in_features), bias)

    def convert(self, module: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weight = _float_weight(module, tensors).float()
        num_rows, in_features = weight.shape
        group_size = _group_size(in_features)
        groups = weight.view(num_rows, in_features // group_size, group_size)                    # [N, G, g]
        low, high = groups.amin(dim=-1).clamp(max=0), groups.amax(dim=-1).clamp(min=0)          # [N, G]
        scales = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)                 # [N, G]
        zeros = torch.round(-low / scales).clamp(0, 15)                                          # [N, G]
        codes = torch.round(groups / scales[..., None] + zeros[..., None]).clamp(0, 15)         # [N, G, g]
        return {"qweight": pack_int4(codes.view(num_rows, in_features)), "scales": scales,
                "zeros": zeros.to(torch.uint8)}


def _group_size(in_features: int) -> int:
    """128, or the largest of 64 and 32 that divides in_features (SmolLM2's 576), else all of K."""
    return next((size for size in (W4_GROUP_SIZE, 64, 32) if in_features % size == 0), in_features)


GGUF_GROUP_SIZE = 32


class OnlineQ8_0(QuantizationMethod):
    name = "gguf-q8_0"
    online = True
    bytes_per_weight = grouped_bytes_per_weight(1.0, GGUF_GROUP_SIZE, 0)     # int8 codes, a float32 scale per 32

    def make_layer(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        return W8A16Linear(in_features, out_features, GGUF_GROUP_SIZE, bias)

    def convert(self, module: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        groups = _gguf_groups(module, tensors)                                                   # [N, G, 32]
        scales = (groups.abs().amax(dim=-1) / 127).half().float().clamp(min=torch.finfo(torch.float32).tiny)
        codes = torch.round(groups / scales[..., None]).clamp(-127, 127)                          # [N, G, 32]
        return {"qweight": codes.flatten(1).to(torch.int8), "scales": scales}


class OnlineQ4_K(QuantizationMethod):
    name = "gguf-q4_k"
    online = True
    bytes_per_weight = grouped_bytes_per_weight(0.5, GGUF_GROUP_SIZE, 4)     # 4-bit codes, a scale and offset per 32

    def make_layer(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        return W4A16Linear(in_features, out_features, GGUF_GROUP_SIZE, bias, offsets=True)

    def convert(self, module: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        groups = _gguf_groups(module, tensors)                                                   # [N, G, 32]
        low, high = groups.amin(dim=-1).clamp(max=0), groups.amax(dim=-1).clamp(min=0)          # [N, G]
        scales = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)                 # [N, G]
        codes = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, 15)         # [N, G, 32]
        return {"qweight": pack_int4(codes.flatten(1)), "scales": scales, "zeros": -low}


def _gguf_groups(module: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """A float weight [N, K] as groups of 32 along K: [N, K / 32, 32] float32."""
    weight = _float_weight(module, tensors).float()
    num_rows, in_features = weight.shape
    if in_features % GGUF_GROUP_SIZE:
        raise ModelLoadError(f"{module}: its input size {in_features} is not a multiple of {GGUF_GROUP_SIZE}, "
                             "the group of GGUF's block formats")
    return weight.view(num_rows, in_features // GGUF_GROUP_SIZE, GGUF_GROUP_SIZE)
