"""FP8 checkpoints with a scale per block of weights (Qwen3's and DeepSeek's "-FP8" models).

transformers' fine-grained FP8 (`quant_method` "fp8", `weight_block_size` [128, 128]) stores per
HF linear module:

    weight            float8_e4m3fn [N, K]
    weight_scale_inv  float32 [ceil(N / 128), ceil(K / 128)]      w[n, k] = weight[n, k] * scale[n // 128, k // 128]

(compressed-tensors' FP8_BLOCK scheme stores the same as `weight` and `weight_scale`.) Within a row
the scale changes every 128 inputs, so it is W8A16Linear's layout with e4m3 codes: a scale per
group of 128 along K, each block's scale repeated over its 128 rows. That is exact: the kernels
multiply each code by its own scale in float32.

The format's activations are meant to be quantized to e4m3 per token and group of 128 at run time;
here they stay in 16 bits (the W8A16 kernels), as for int8 W8A8 checkpoints: nearer the unquantized
model, and as fast at decode, where the weight bytes rule.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nanovllm.model.errors import ModelLoadError
from nanovllm.model.quantization.layers import W8A16Linear
from nanovllm.model.quantization.method import QUANTIZED_MODULES, QuantizationMethod, grouped_bytes_per_weight
from nanovllm.ops.quant_linear import FP8_DTYPE


def block_scaled_weight(module: str, weight: torch.Tensor, block_scales: torch.Tensor,
                        block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """e4m3 weight [N, K] and its scales [ceil(N / bn), ceil(K / bk)] per block (bn, bk) ->
    W8A16Linear's buffers: the codes as they are, scales [N, K / bk] float32."""
    (num_rows, in_features), (block_rows, block_cols) = weight.shape, block
    if weight.dtype != FP8_DTYPE:
        raise ModelLoadError(f"{module}.weight is {weight.dtype}; an FP8 checkpoint stores float8_e4m3fn")
    expected = (-(-num_rows // block_rows), -(-in_features // block_cols))
    if tuple(block_scales.shape) != expected:
        raise ModelLoadError(f"{module}: {tuple(block_scales.shape)} block scales for a weight of shape "
                             f"{(num_rows, in_features)} in blocks of {block}; expected {expected}")
    scales = block_scales.float().repeat_interleave(block_rows, dim=0)[:num_rows]          # [N, K / bk]
    return {"qweight": weight, "scales": scales.contiguous()}


class Fp8Block(QuantizationMethod):
    """transformers' fine-grained FP8 (`quant_method` "fp8")."""

    name = "fp8 (block)"

    def __init__(self, block: tuple[int, int]):
        self.block = block
        self.group_size = block[1]

    @property
    def bytes_per_weight(self) -> float:
        return grouped_bytes_per_weight(1.0, self.group_size, 0)

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str) -> "Fp8Block":
        block = config.get("weight_block_size")
        if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0
                                                                            for b in block)):
            raise ModelLoadError(f"{source}: FP8 (quant_method 'fp8') without a weight_block_size of two sizes "
                                 f"(got {block!r}) is not supported; nano-vllm runs block-scaled FP8")
        if str(config.get("activation_scheme", "dynamic")) != "dynamic":
            raise ModelLoadError(f"{source}: FP8 with static activation scales is not supported; nano-vllm runs "
                                 "block-scaled FP8 with dynamic activations")
        if str(config.get("fmt", "e4m3")) != "e4m3":
            raise ModelLoadError(f"{source}: FP8 in {config.get('fmt')!r} is not supported; nano-vllm reads e4m3")
        skipped = [m for m in config.get("modules_to_not_convert") or [] if m.rsplit(".", 1)[-1] in QUANTIZED_MODULES]
        if skipped:
            raise ModelLoadError(f"{source}: the checkpoint leaves {skipped[0]!r} unquantized; nano-vllm needs every "
                                 "linear layer of the decoder quantized alike")
        return cls((block[0], block[1]))

    def required(self) -> frozenset[str]:
        return frozenset({"weight", "weight_scale_inv"})

    def make_layer(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        return W8A16Linear(in_features, out_features, self.block[1], bias, fp8=True)

    def convert(self, module: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return block_scaled_weight(module, tensors["weight"], tensors["weight_scale_inv"], self.block)
