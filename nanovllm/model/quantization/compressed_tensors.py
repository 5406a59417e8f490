"""`compressed-tensors` checkpoints (llmcompressor's output; RedHatAI / neuralmagic models).

config.json's `quantization_config` lists `config_groups`, each a scheme for the modules its
`targets` name (here: "Linear"), minus the `ignore` list (usually `lm_head`). Two schemes run:

- **float-quantized** (FP8 W8A8, FP8-dynamic): `weight` float8_e4m3fn [N, K] and
  `weight_scale` float32, [N, 1] for strategy "channel" or one value for "tensor"
  (then per channel here: q, k and v each bring their own into one fused layer).
  Activations are quantized per token at run time (`input_activations` dynamic, strategy
  "token"); static activation scales are not supported.
- **float-quantized, strategy "block"** (FP8_BLOCK): `weight` e4m3 [N, K] and `weight_scale` per
  block of 128 x 128, as transformers' fine-grained FP8 (fp8_block.py): W8A16Linear with e4m3 codes.
- **pack-quantized** (W4A16, 4-bit integers): `weight_packed` int32 [N, K / 8], code k in
  bits 4 (k % 8) of word k // 8, stored as q + 8 for q in [-8, 7]; `weight_scale` [N, K / group];
  `weight_shape` [2]; asymmetric schemes add `weight_zero_point` [N / 8, K / group], packed
  the same way along N. w = (q - zero) * scale, the layout of W4A16Linear after the +8.
- **pack-quantized** with 2, 3, 5, 6, 7 or 8 bits (W8A16, W6A16, ...): the same tensors, the codes
  packed densely (code k of a row at bits b k .. b k + b - 1 of the row's words, low bits first,
  a code may straddle two words), stored as q + 2^(b-1). They become W8A16Linear's int8 codes q
  with a scale per group (and, asymmetric, the float offset zero * scale).
- **int-quantized** (W8A8 int8, RedHatAI's "quantized.w8a8"): `weight` int8 [N, K] and
  `weight_scale` per channel [N, 1] or per tensor. Its activations are meant to be rounded to
  int8 per token; here they stay in 16 bits (W8A16Linear, weight-only): nearer the unquantized
  model than the format's own forward, which the tests therefore do not use as the oracle.
"""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from nanovllm.model.errors import ModelLoadError
from nanovllm.model.quantization.fp8_block import block_scaled_weight
from nanovllm.model.quantization.layers import Fp8Linear, W4A16Linear, W8A16Linear
from nanovllm.model.quantization.method import QUANTIZED_MODULES, QuantizationMethod, grouped_bytes_per_weight
from nanovllm.ops.quant_linear import FP8_DTYPE, unpack_int4


class CompressedTensors(QuantizationMethod):
    name = "compressed-tensors"

    def __init__(self, fmt: str, weights: dict[str, Any]):
        self.fmt = fmt                         # "float-quantized" | "pack-quantized" | "int-quantized"
        self.weights = weights                 # the scheme's `weights` arguments
        self.symmetric = bool(weights.get("symmetric", True))
        self.num_bits = int(weights.get("num_bits") or 8)
        if fmt != "float-quantized":
            self.group_size = int(weights.get("group_size") or -1)   # -1: one group a row (strategy "channel")

    @property
    def bytes_per_weight(self) -> float:
        if self.block is not None:
            return grouped_bytes_per_weight(1.0, self.block[1], 0)
        if self.fmt == "float-quantized" or self.num_bits == 4:
            return super().bytes_per_weight
        return grouped_bytes_per_weight(1.0, self.group_size, 0 if self.symmetric else 4)

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str) -> "CompressedTensors":
        groups = [g for g in (config.get("config_groups") or {}).values() if "Linear" in (g.get("targets") or [])]
        if len(groups) != 1:
            raise ModelLoadError(f"{source}: nano-vllm runs compressed-tensors checkpoints with one scheme for "
                                 f"every Linear; this one has {len(groups)}")
        _check_ignore(config.get("ignore") or [], source)
        group = groups[0]
        fmt = group.get("format") or config.get("format")
        weights = group.get("weights") or {}
        kind = (weights.get("type"), weights.get("num_bits"))
        activations = group.get("input_activations") or {}
        if fmt == "float-quantized" and kind == ("float", 8) and weights.get("strategy") == "block":
            block = weights.get("block_structure") or []
            if len(block) != 2 or (activations and not activations.get("dynamic")):
                raise ModelLoadError(f"{source}: FP8 blocks of {block!r}, activations {activations or 'none'}, are "
                                     "not supported; nano-vllm runs FP8_BLOCK (two block sizes, dynamic "
                                     "activations)")
            return cls(fmt, weights)
        if fmt == "float-quantized" and kind == ("float", 8) and weights.get("strategy") in ("tensor", "channel"):
            if not (activations.get("dynamic") and activations.get("strategy") == "token"):
                raise ModelLoadError(f"{source}: FP8 with {'static' if activations else 'no'} activation scales is "
                                     "not supported; nano-vllm runs FP8 with dynamic per-token activation scales "
                                     "(the FP8_DYNAMIC scheme)")
            return cls(fmt, weights)
        if (fmt == "pack-quantized" and kind in (("int", b) for b in range(2, 9))
                and weights.get("strategy") in ("group", "channel") and not activations):
            return cls(fmt, weights)
        if (fmt == "int-quantized" and kind == ("int", 8) and weights.get("strategy") in ("tensor", "channel")
                and weights.get("symmetric", True)):
            if activations and not (activations.get("dynamic") and activations.get("strategy") == "token"):
                raise ModelLoadError(f"{source}: int8 with static activation scales is not supported; nano-vllm "
                                     "runs int8 weights with dynamic per-token activations (the W8A8 scheme)")
            return cls(fmt, weights)
        raise ModelLoadError(f"{source}: compressed-tensors format {fmt!r} with {kind[1]}-bit {kind[0]} weights "
                             f"({weights.get('strategy')}) is not supported; nano-vllm runs float-quantized FP8 "
                             "(per-tensor or per-channel), pack-quantized 2- to 8-bit integers (W4A16, W8A16, "
                             "...) and int-quantized symmetric int8 (W8A8)")

    def required(self) -> frozenset[str]:
        if self.fmt != "pack-quantized":
            return frozenset({"weight", "weight_scale"})
        names = {"weight_packed", "weight_scale", "weight_shape"}
        return frozenset(names if self.symmetric else names | {"weight_zero_point"})

    @property
    def block(self) -> tuple[int, int] | None:
        """FP8_BLOCK's (rows, inputs) a scale covers; None for the other schemes."""
        block = self.weights.get("block_structure") if self.weights.get("strategy") == "block" else None
        return None if block is None else (int(block[0]), int(block[1]))

    def make_layer(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        if self.block is not None:
            return W8A16Linear(in_features, out_features, self.block[1], bias, fp8=True)
        if self.fmt == "float-quantized":
            return Fp8Linear(in_features, out_features, bias)
        group_size = in_features if self.group_size == -1 else self.group_size
        if self.num_bits == 4:
            return W4A16Linear(in_features, out_features, group_size, bias)
        return W8A16Linear(in_features, out_features, group_size, bias, offsets=not self.symmetric)

    def convert(self, module: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.block is not None:
            return block_scaled_weight(module, tensors["weight"], tensors["weight_scale"], self.block)
        if self.fmt in ("float-quantized", "int-quantized"):     # [N, K] as stored, a scale per tensor or channel
            weight, scale = tensors["weight"], tensors["weight_scale"].float()
            fp8 = self.fmt == "float-quantized"
            if weight.dtype != (FP8_DTYPE if fp8 else torch.int8):
                raise ModelLoadError(f"{module}.weight is {weight.dtype}; an {'FP8' if fp8 else 'int8'} checkpoint "
                                     f"stores {'float8_e4m3fn' if fp8 else 'int8'}")
            if scale.numel() not in (1, weight.shape[0]):
                raise ModelLoadError(f"{module}.weight_scale has {scale.numel()} values; expected 1 (per tensor) "
                                     f"or {weight.shape[0]} (per channel)")
            per_channel = scale.reshape(-1).expand(weight.shape[0]).contiguous()                   # [N]
            if fp8:
                return {"weight": weight, "weight_scale": per_channel}
            return {"qweight": weight, "scales": per_channel[:, None].contiguous()}                # one group a row
        if self.num_bits != 4:
            return self._convert_dense(module, tensors)
        out_features, in_features = (int(v) for v in tensors["weight_shape"].tolist())
        packed, scales = tensors["weight_packed"], tensors["weight_scale"]
        if packed.dtype != torch.int32 or tuple(packed.shape) != (out_features, in_features // 8):
            raise ModelLoadError(f"{module}.weight_packed is {packed.dtype} {tuple(packed.shape)}; expected int32 "
                                 f"{(out_features, in_features // 8)} for a weight of shape "
                                 f"{(out_features, in_features)}")
        if "weight_zero_point" in tensors:
            # stored as zero + 8 in 4 bits, packed along N: unpack the transposed words -> [G, N] -> [N, G]
            zeros = unpack_int4(tensors["weight_zero_point"].T.contiguous()).T[:out_features]
        else:
            zeros = torch.full(scales.shape, 8, dtype=torch.uint8)
        return {"qweight": packed, "scales": scales, "zeros": zeros.contiguous()}

    def _convert_dense(self, module: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """pack-quantized codes of num_bits other than 4 -> W8A16Linear's buffers."""
        bits = self.num_bits
        out_features, in_features = (int(v) for v in tensors["weight_shape"].tolist())
        packed, scales = tensors["weight_packed"], tensors["weight_scale"].float()
        words = -(-in_features * bits // 32)
        if packed.dtype != torch.int32 or tuple(packed.shape) != (out_features, words):
            raise ModelLoadError(f"{module}.weight_packed is {packed.dtype} {tuple(packed.shape)}; expected int32 "
                                 f"{(out_features, words)} for {bits}-bit codes of a weight of shape "
                                 f"{(out_features, in_features)}")
        offset = 1 << (bits - 1)
        out = {"qweight": (unpack_dense(packed, bits, in_features) - offset).to(torch.int8), "scales": scales}
        if not self.symmetric:      # zero points packed the same way along N: [ceil(N b / 32), G]
            zeros = unpack_dense(tensors["weight_zero_point"].T.contiguous(), bits, out_features).T - offset
            out["offsets"] = (zeros.float() * scales).contiguous()
        return out


def unpack_dense(packed: torch.Tensor, num_bits: int, count: int) -> torch.Tensor:
    """[R, W] int32 words holding `count` codes of `num_bits` a row, densely: code i at bits
    num_bits i .. num_bits (i + 1) - 1 of the row's words read as one little-endian bit string (a
    code may straddle two words) -> [R, count] int32, each code as stored (unsigned)."""
    words = packed.to(torch.int64) & 0xFFFFFFFF                                           # [R, W] unsigned
    starts = torch.arange(count) * num_bits
    index, shift = starts // 32, starts % 32
    low = words[:, index] >> shift                                                        # [R, count]
    high = words[:, (index + 1).clamp(max=words.shape[1] - 1)] << (32 - shift)           # the next word's bits
    straddles = shift + num_bits > 32
    codes = torch.where(straddles, low | high, low) & ((1 << num_bits) - 1)
    return codes.to(torch.int32)


def _check_ignore(ignore: list[str], source: str) -> None:
    """The decoder's linear layers must all be quantized (each fuses with its neighbours); only the
    LM head may be left out, and it must be (it stays in the model's dtype here)."""
    def matches(entry: str, name: str) -> bool:
        return bool(re.fullmatch(entry[3:], name)) if entry.startswith("re:") else entry == name

    probes = [f"model.layers.0.{'mlp' if m in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{m}"
              for m in QUANTIZED_MODULES]
    for entry in ignore:
        if entry.rsplit(".", 1)[-1] in QUANTIZED_MODULES or any(matches(entry, probe) for probe in probes):
            raise ModelLoadError(f"{source}: the checkpoint leaves {entry!r} unquantized; nano-vllm needs every "
                                 "linear layer of the decoder quantized alike")
    if not any(matches(entry, "lm_head") for entry in ignore):
        raise ModelLoadError(f"{source}: the checkpoint quantizes lm_head; nano-vllm keeps the LM head in 16 bits "
                             "and loads compressed-tensors checkpoints that ignore it")
