"""Online quantization: a float checkpoint (or dummy weights) quantized once loaded.

fp8 quantizes the LM head as well as the decoder's linear layers: decode reads it every step,
and in 16 bits it would be a fifth of Llama-3.2-1B's bytes. A head tied to the embedding gets
its own e4m3 copy; the embedding stays 16-bit for its lookups. w4a16 keeps the head in 16 bits
(4-bit round-to-nearest moved the tiny test model's logits by 10% of their range, e4m3 by 4%).

- **fp8** (vLLM's `quantization="fp8"`): each row (output channel) of a linear weight gets
  the scale amax(|row|) / 448, so its largest weight lands on e4m3's largest value;
  activations are quantized per row at run time. No calibration data is needed.
- **w4a16**: round-to-nearest 4-bit codes in groups of 128 along K (64 or 32 where 128 does
  not divide K), asymmetric like compressed-tensors' W4A16_ASYM: each group's range [min, max]
  (widened to hold 0) maps onto 0..15 with scale (max - min) / 15 and an integer zero. No
  calibration either; GPTQ and AWQ checkpoints lose less quality, this is for measuring the
  format's speed on any model.
"""
from __future__ import annotations

import torch
from torch import nn

from nanovllm.model.errors import ModelLoadError
from nanovllm.model.quantization.layers import Fp8Linear, W4A16Linear
from nanovllm.model.quantization.method import QuantizationMethod
from nanovllm.ops.quant_linear import pack_int4, quantize_fp8_per_channel

W4_GROUP_SIZE = 128


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
