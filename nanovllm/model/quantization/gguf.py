"""GGUF's Q8_0, Q6_K and Q4_K blocks kept quantized: each re-expressed exactly in a GPU layout.

llama.cpp stores a weight row by row (a row per output), each row a run of blocks along K. Three
block types cover most downloads (a "Q4_K_M" file is Q4_K with some Q6_K layers, "Q8_0" is what it
says):

    Q8_0   32 weights: fp16 d, int8 q                               w = d q
    Q6_K   256 weights: fp16 d; 16 sub-blocks of 16, each an int8 scale sc; 6-bit q
                                                                    w = (d sc) (q - 32)
    Q4_K   256 weights: fp16 d and dmin; 8 sub-blocks of 32, each a 6-bit scale sc and min m; 4-bit q
                                                                    w = (d sc) q - (dmin m)

So each is integer codes times a float scale per group along K (Q8_0: 32, Q6_K: 16, Q4_K: 32), and
Q4_K minus a float offset per group. d sc and dmin m are exact in float32 (11 + 8 significant bits
at most), so the layouts below dequantize to the very bits the gguf package gives. A fused layer
(q/k/v, gate/up) takes one layout for the GGUF types of its parts:

    all Q4_K             -> W4A16Linear, groups of 32, float offsets: 4-bit codes packed as ours
    Q8_0, Q6_K (+ Q4_K)  -> W8A16Linear, groups of 32 (16 with any Q6_K), int8 codes, offsets if any
                            part is Q4_K (a Q4_K_M file's q and k in Q4_K beside v in Q6_K)
    any other type       -> the float layer, dequantized tensor by tensor (F16, Q4_0, Q5_K, ...)

The scales (and offsets) are kept in float32: 0.75 bytes a weight for Q4_K (GGUF: 0.56), 1.125
for Q8_0 (1.06), 1.25 for Q6_K (0.82). The embeddings, norms and LM head stay in the model's dtype.
Everything goes tensor by tensor from the memory-mapped file: there is no float copy of the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from nanovllm.model.config import ModelConfig
from nanovllm.model.errors import ModelLoadError
from nanovllm.model.quantization.layers import W4A16Linear, W8A16Linear
from nanovllm.model.quantization.method import _copy_into_layer, _split_name
from nanovllm.ops.quant_linear import pack_int4

Q8_0, Q4_K, Q6_K = "Q8_0", "Q4_K", "Q6_K"
KEPT_TYPES = (Q8_0, Q4_K, Q6_K)              # the GGUF types that load quantized
GROUP_SIZE = {Q8_0: 32, Q6_K: 16, Q4_K: 32}   # weights per scale along K


@dataclass
class GroupedCodes:
    """A weight as integer codes with a float scale (and offset) per group along K:
    w[n, k] = codes[n, k] * scales[n, g] - offsets[n, g], g = k // group_size."""
    codes: torch.Tensor               # [N, K] int8 (Q4_K: 0..15)
    scales: torch.Tensor              # [N, K / group_size] float32
    offsets: torch.Tensor | None      # [N, K / group_size] float32, or None for zero

    @property
    def group_size(self) -> int:
        return self.codes.shape[1] // self.scales.shape[1]

    def regrouped(self, group_size: int) -> "GroupedCodes":
        """The same weight with groups of `group_size` (which divides the present one): each
        scale repeated, an absent offset made zeros."""
        repeat = self.group_size // group_size
        scales = self.scales.repeat_interleave(repeat, dim=1)
        offsets = torch.zeros_like(scales) if self.offsets is None else self.offsets.repeat_interleave(repeat, dim=1)
        return GroupedCodes(self.codes, scales, offsets)

    def dequantize(self) -> torch.Tensor:
        """-> w [N, K] float32, computed as the gguf package computes it."""
        scale = self.scales.repeat_interleave(self.group_size, dim=1)                       # [N, K]
        weight = self.codes.float() * scale
        return weight if self.offsets is None else weight - self.offsets.repeat_interleave(self.group_size, dim=1)


# ---- the block formats ---------------------------------------------------------------------------

def decode_blocks(data: np.ndarray, qtype: str, shape: tuple[int, int]) -> GroupedCodes:
    """A GGUF tensor's bytes (its reader's `data`, any shape) of type `qtype` in KEPT_TYPES and
    torch shape [N, K] -> its GroupedCodes."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    num_rows, in_features = shape
    blocks = np.ascontiguousarray(data).view(np.uint8).reshape(-1, type_size)               # [B, bytes]
    if blocks.shape[0] * block_size != num_rows * in_features:
        raise ValueError(f"{blocks.shape[0]} blocks of {block_size} for a weight of shape {shape}")
    codes, scales, offsets = _DECODERS[qtype](blocks)                  # [B, block], [B, block / group] x2
    return GroupedCodes(torch.from_numpy(codes).reshape(num_rows, in_features),
                        torch.from_numpy(scales).reshape(num_rows, -1),
                        None if offsets is None else torch.from_numpy(offsets).reshape(num_rows, -1))


def _decode_q8_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, None]:
    """[B, 34]: fp16 d, 32 int8 q."""
    d, q = np.hsplit(blocks, [2])
    return q.view(np.int8).copy(), d.view(np.float16).astype(np.float32), None   # a copy: the file is read-only


def _decode_q6_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, None]:
    """[B, 210]: ql (the low 4 bits, 128 bytes), qh (the high 2 bits, 64 bytes), 16 int8 scales, fp16 d.
    Within each half of 128 weights, ql byte l holds weights l (low nibble) and l + 64 (high), byte
    l + 32 weights l + 32 and l + 96; qh byte l holds the high bits of l, l + 32, l + 64, l + 96."""
    num_blocks = blocks.shape[0]
    ql, qh, sc, d = np.split(blocks, [128, 192, 208], axis=1)
    low = (ql.reshape(num_blocks, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    high = (qh.reshape(num_blocks, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 0x03
    q = low.reshape(num_blocks, 2, 4, 32) | (high << 4)                                 # [B, half, quarter, 32]
    codes = q.reshape(num_blocks, 256).astype(np.int8) - np.int8(32)                    # -32..31
    scales = d.view(np.float16).astype(np.float32) * sc.view(np.int8).astype(np.float32)   # [B, 16]
    return codes, scales, None


def _decode_q4_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[B, 144]: fp16 d, fp16 dmin, 12 bytes of eight 6-bit (scale, min) pairs, 128 bytes of codes:
    byte l of each run of 32 holds weight l (low nibble) and l + 32 (high) of its 64."""
    from gguf.quants import Q4_K as gguf_q4_k

    num_blocks = blocks.shape[0]
    d, dmin, packed_scales, qs = np.split(blocks, [2, 4, 16], axis=1)
    sc, m = gguf_q4_k.get_scale_min(packed_scales)                                      # [B, 8] each, 0..63
    codes = (qs.reshape(num_blocks, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    scales = d.view(np.float16).astype(np.float32) * sc.astype(np.float32)             # [B, 8]
    offsets = dmin.view(np.float16).astype(np.float32) * m.astype(np.float32)          # [B, 8]
    return codes.reshape(num_blocks, 256).astype(np.int8), scales, offsets


_DECODERS = {Q8_0: _decode_q8_0, Q6_K: _decode_q6_k, Q4_K: _decode_q4_k}


# ---- layouts -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """How one fused linear layer holds its GGUF parts."""
    kind: str              # "w4a16" | "w8a16"
    group_size: int
    offsets: bool

    @classmethod
    def of(cls, qtypes: set[str]) -> "Layout | None":
        """The layout for a layer whose parts have these GGUF types; None: keep it float."""
        if not qtypes or not qtypes <= set(KEPT_TYPES):
            return None
        if qtypes == {Q4_K}:
            return cls("w4a16", GROUP_SIZE[Q4_K], offsets=True)
        return cls("w8a16", min(GROUP_SIZE[t] for t in qtypes), offsets=Q4_K in qtypes)

    @property
    def bytes_per_weight(self) -> float:
        code_bytes = 0.5 if self.kind == "w4a16" else 1.0
        return code_bytes + 4 * (1 + self.offsets) / self.group_size

    def make_layer(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        if self.kind == "w4a16":
            return W4A16Linear(in_features, out_features, self.group_size, bias, offsets=True)
        return W8A16Linear(in_features, out_features, self.group_size, bias, offsets=self.offsets)

    def buffers(self, weight: GroupedCodes) -> dict[str, torch.Tensor]:
        """One part's GroupedCodes -> the layer's buffers (its rows)."""
        if self.kind == "w4a16":
            return {"qweight": pack_int4(weight.codes), "scales": weight.scales, "zeros": weight.offsets}
        if weight.group_size != self.group_size or (self.offsets and weight.offsets is None):
            weight = weight.regrouped(self.group_size)
        buffers = {"qweight": weight.codes, "scales": weight.scales}
        if self.offsets:
            buffers["offsets"] = weight.offsets
        return buffers


# ---- loading -------------------------------------------------------------------------------------

def qtype_name(tensor: Any) -> str:
    from gguf import GGMLQuantizationType
    return GGMLQuantizationType(tensor.tensor_type).name


_FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
          "up_proj": "gate_up_proj"}


def _fused_layer(hf_name: str) -> str | None:
    """'model.layers.3.self_attn.k_proj.weight' -> 'layers.3.self_attn.qkv_proj' (the layer of our
    model it fuses into); None for anything but a weight of a decoder's linear module."""
    split = _split_name(hf_name)
    if split is None or split[1] != "weight":
        return None
    parent, _, module = split[0].removeprefix("model.").rpartition(".")
    return f"{parent}.{_FUSED.get(module, module)}"


def gguf_layouts(path: str) -> dict[str, tuple[Layout | None, int]]:
    """Each fused linear layer of a GGUF ("layers.3.self_attn.qkv_proj") -> (its Layout, None to
    stay float; its number of weights)."""
    from nanovllm.model.gguf import gguf_tensors, tensor_shape

    qtypes: dict[str, set[str]] = {}
    sizes: dict[str, int] = {}
    for hf_name, tensor in gguf_tensors(path):
        layer = _fused_layer(hf_name)
        if layer is not None:
            qtypes.setdefault(layer, set()).add(qtype_name(tensor))
            sizes[layer] = sizes.get(layer, 0) + int(np.prod(tensor_shape(tensor)))
    return {layer: (Layout.of(types), sizes[layer]) for layer, types in qtypes.items()}


def gguf_bytes_per_weight(path: str) -> float:
    """What one weight of the decoder's linear layers costs as loaded (float layers at 2 bytes, bfloat16)."""
    layouts = gguf_layouts(path).values()
    stored = sum(size * (2.0 if layout is None else layout.bytes_per_weight) for layout, size in layouts)
    return stored / max(1, sum(size for _, size in layouts))


def keeps_blocks(path: str) -> bool:
    """Whether any linear layer of this GGUF loads quantized."""
    return any(layout is not None for layout, _ in gguf_layouts(path).values())


def load_gguf_quantized(model: nn.Module, path: str, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Give `model` (built, weights empty) quantized layers where the GGUF's types allow; -> the
    (HuggingFace name, float32 tensor) pairs that `load_weights` fills, every other tensor being
    decoded into those layers on the way, one at a time."""
    from nanovllm.model.quantization import _like

    layouts = {layer: layout for layer, (layout, _) in gguf_layouts(path).items() if layout is not None}
    for layer_name, layout in layouts.items():
        parent_name, _, attr = layer_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, attr)
        with _like(linear.weight):
            setattr(parent, attr, layout.make_layer(linear.in_features, linear.out_features, linear.bias is not None))
    return _gguf_weights(model, path, config, layouts)


def _gguf_weights(model: nn.Module, path: str, config: ModelConfig,
                  layouts: dict[str, Layout]) -> Iterator[tuple[str, torch.Tensor]]:
    from nanovllm.model.gguf import dequantize_tensor, gguf_tensors, rotate_half_rows, tensor_shape

    rows_left = {name: model.get_submodule(name).out_features for name in layouts}
    for hf_name, tensor in gguf_tensors(path):
        layer = _fused_layer(hf_name)
        if layer not in layouts:
            yield hf_name, rotate_half_rows(hf_name, dequantize_tensor(path, tensor), config)
            continue
        try:
            weight = decode_blocks(tensor.data, qtype_name(tensor), tensor_shape(tensor))
        except ValueError as e:
            raise ModelLoadError(f"{path}: tensor {tensor.name!r} cannot be read ({e}); the file is truncated "
                                 "or damaged") from None
        buffers = {name: rotate_half_rows(hf_name, value, config)
                   for name, value in layouts[layer].buffers(weight).items()}
        _copy_into_layer(model, hf_name.removesuffix(".weight"), buffers, rows_left, {})
    unfilled = [name for name, left in rows_left.items() if left > 0]
    if unfilled:
        raise ModelLoadError(f"{path}: missing weights of {', '.join(unfilled[:4])}")

