"""GGUF's quantized blocks kept quantized: each type re-expressed exactly in a GPU layout.

llama.cpp stores a weight row by row (a row per output), each row a run of blocks along K. The
"legacy" types have blocks of 32 weights, the k-quants superblocks of 256 with a scale (and
min) per sub-block; a download names its main type, with some layers in another ("Q4_K_M" is
Q4_K with v and down in Q6_K, "Q5_K_M" Q5_K with Q6_K, "Q3_K_M" Q3_K with Q4_K and Q5_K):

    Q4_0   32: fp16 d, 4-bit q                                      w = d (q - 8)
    Q4_1   32: fp16 d and m, 4-bit q                                w = d q + m
    Q5_0   32: fp16 d, 5-bit q (a word of high bits)                w = d (q - 16)
    Q5_1   32: fp16 d and m, 5-bit q                                w = d q + m
    Q8_0   32: fp16 d, int8 q                                       w = d q
    Q2_K   256: fp16 d and dmin; 16 sub-blocks of 16, each a 4-bit scale sc and min m; 2-bit q
                                                                    w = (d sc) q - (dmin m)
    Q3_K   256: fp16 d; 16 sub-blocks of 16, each a 6-bit scale sc; 3-bit q (a high-bit mask)
                                                                    w = (d (sc - 32)) (q - 4)
    Q4_K   256: fp16 d and dmin; 8 sub-blocks of 32, each a 6-bit scale sc and min m; 4-bit q
                                                                    w = (d sc) q - (dmin m)
    Q5_K   as Q4_K with 5-bit q                                     w = (d sc) q - (dmin m)
    Q6_K   256: fp16 d; 16 sub-blocks of 16, each an int8 scale sc; 6-bit q
                                                                    w = (d sc) (q - 32)
    IQ4_NL 32: fp16 d, 4-bit index i into 16 int8 levels L           w = d L[i]
    IQ4_XS 256: fp16 d; 8 sub-blocks of 32, each a 6-bit scale sc; 4-bit index i
                                                                    w = (d (sc - 32)) L[i]

So each is integer codes (IQ4's: the levels its indices pick) times a float scale per group along
K (16 or 32), some minus a float offset per group. The scales and offsets are exact in float32
(fp16 times an integer of at most 8 bits), so the layouts below dequantize to the very bits the
gguf package gives. A fused layer (q/k/v, gate/up) takes one layout for the GGUF types of its parts:

    only 4-bit types (Q4_0, Q4_1, Q4_K)
                         -> W4A16Linear, groups of 32: 4-bit codes packed as ours; Q4_0 alone
                            with the integer zero point 8, else float offsets (Q4_0's: 8 d)
    any other kept type  -> W8A16Linear, int8 codes, groups of 32 (16 with any Q2_K, Q3_K or
                            Q6_K part), float offsets when a part has them (a Q4_K_M file's q
                            and k in Q4_K beside v in Q6_K)
    any other type       -> the float layer, dequantized tensor by tensor (F16, the IQ1 to IQ3
                            types, ...)

The scales (and offsets) are kept in float32: 0.75 bytes a weight for Q4_K and Q4_1 (GGUF: 0.56,
0.63), 0.66 for Q4_0 (0.56), 1.125 for Q8_0 and Q5_0 (1.06, 0.69), 1.25 for Q5_1, Q5_K and Q6_K
(0.75, 0.69, 0.82), 1.125 for IQ4_NL and IQ4_XS (0.56, 0.53), 1.25 for Q3_K (0.43) and 1.5 for
Q2_K (0.33). IQ4's levels are not a linear code, and the low-bit k-quants take the 8-bit kernels:
more bytes than the file, still below bfloat16's 2. The embeddings, norms and LM head stay in the
model's dtype. Everything goes tensor by tensor from the memory-mapped file:
there is no float copy of the model.
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
from nanovllm.model.quantization.method import _copy_into_layer, _split_name, grouped_bytes_per_weight
from nanovllm.ops.quant_linear import pack_int4

Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"
IQ4_NL, IQ4_XS = "IQ4_NL", "IQ4_XS"
KEPT_TYPES = (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K,   # the GGUF types that load quantized
              IQ4_NL, IQ4_XS)
GROUP_SIZE = {Q4_0: 32, Q4_1: 32, Q5_0: 32, Q5_1: 32, Q8_0: 32,             # weights per scale along K
              Q2_K: 16, Q3_K: 16, Q4_K: 32, Q5_K: 32, Q6_K: 16, IQ4_NL: 32, IQ4_XS: 32}
# IQ4's 16 levels: a 4-bit index into this table of int8 values, times the scale (not a linear code)
IQ4_LEVELS = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)
FOUR_BIT_TYPES = {Q4_0, Q4_1, Q4_K}                                         # those the 4-bit layout holds
OFFSET_TYPES = {Q4_1, Q5_1, Q2_K, Q4_K, Q5_K}                               # w = d q + offset


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


def _halves(column: np.ndarray) -> np.ndarray:
    """[B, 2] bytes of fp16 -> [B, 1] float32."""
    return np.ascontiguousarray(column).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[B, 16] bytes of a 32-weight block -> [B, 32] uint8: byte l holds weight l (low nibble) and l + 16."""
    return ((qs[:, None, :] >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)) & 0x0F).reshape(-1, 32)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """[B, 4] bytes, one little-endian word whose bit l is weight l's fifth bit -> [B, 32] uint8 of 0 or 16."""
    bits = np.ascontiguousarray(qh).view("<u4") >> np.arange(32, dtype=np.uint32)            # [B, 32]
    return ((bits & 1) << 4).astype(np.uint8)


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """[B, 128] bytes of a k-quant superblock's low 4 bits -> [B, 256] uint8: byte l of each run of 32
    holds weight l (low nibble) and l + 32 (high) of its 64 (Q4_K, Q5_K)."""
    shifts = np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return ((qs.reshape(-1, 4, 1, 32) >> shifts) & 0x0F).reshape(-1, 256)


def _k_crumbs(qs: np.ndarray) -> np.ndarray:
    """[B, 64] bytes of a k-quant superblock's low 2 bits -> [B, 256] uint8: within each half of 128
    weights, byte l of its 32 holds weights l, l + 32, l + 64, l + 96, low bits first (Q2_K, Q3_K)."""
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return ((qs.reshape(-1, 2, 1, 32) >> shifts) & 0x03).reshape(-1, 256)


def _k_bit_planes(bits: np.ndarray) -> np.ndarray:
    """[B, 32] bytes -> [B, 256] uint8 of 0 or 1: bit j of byte l is weight 32 j + l's (Q3_K's high-bit
    mask, Q5_K's fifth bits)."""
    return ((bits.reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 0x01).reshape(-1, 256)


def _decode_q4_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, None]:
    """[B, 18]: fp16 d, 16 bytes of 4-bit q. Codes q - 8 (-8..7)."""
    d, qs = np.hsplit(blocks, [2])
    return _nibbles(qs).astype(np.int8) - np.int8(8), _halves(d), None


def _decode_q4_1(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[B, 20]: fp16 d and m, 16 bytes of 4-bit q. Offsets -m."""
    d, m, qs = np.split(blocks, [2, 4], axis=1)
    return _nibbles(qs).astype(np.int8), _halves(d), -_halves(m)


def _decode_q5_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, None]:
    """[B, 22]: fp16 d, a word of fifth bits, 16 bytes of low nibbles. Codes q - 16 (-16..15)."""
    d, qh, qs = np.split(blocks, [2, 6], axis=1)
    return (_nibbles(qs) | _fifth_bits(qh)).astype(np.int8) - np.int8(16), _halves(d), None


def _decode_q5_1(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[B, 24]: fp16 d and m, a word of fifth bits, 16 bytes of low nibbles. Offsets -m."""
    d, m, qh, qs = np.split(blocks, [2, 4, 8], axis=1)
    return (_nibbles(qs) | _fifth_bits(qh)).astype(np.int8), _halves(d), -_halves(m)


def _decode_q8_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, None]:
    """[B, 34]: fp16 d, 32 int8 q."""
    d, q = np.hsplit(blocks, [2])
    return q.view(np.int8).copy(), _halves(d), None   # a copy: the file is read-only


def _decode_q2_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[B, 84]: 16 bytes of (scale, min) nibbles, 64 bytes of 2-bit q, fp16 d, fp16 dmin. Within each
    half of 128 weights, byte l of its 32 holds weights l, l + 32, l + 64, l + 96 (2 bits each, low first)."""
    sc, qs, d, dmin = np.split(blocks, [16, 80, 82], axis=1)
    scales = _halves(d) * (sc & 0x0F).astype(np.float32)                                  # [B, 16]
    offsets = _halves(dmin) * (sc >> 4).astype(np.float32)
    return _k_crumbs(qs).astype(np.int8), scales, offsets


def _decode_q3_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, None]:
    """[B, 110]: 32 bytes of high-bit mask, 64 bytes of 2-bit low q, 12 bytes of sixteen 6-bit scales,
    fp16 d. Low bits as Q2_K's; bit j of mask byte l is weight 32 j + l's high bit, and a clear bit
    subtracts 4. Codes -4..3; scales d (sc - 32)."""
    num_blocks = blocks.shape[0]
    hmask, qs, packed, d = np.split(blocks, [32, 96, 108], axis=1)
    codes = _k_crumbs(qs).astype(np.int8) - (4 * (1 - _k_bit_planes(hmask))).astype(np.int8)           # [B, 256]
    # scale j: its low 4 bits in byte j % 8 (low nibble for j < 8, high after), its high 2 in byte 8 + j % 4
    low_sc = (packed[:, None, :8] >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)) & 0x0F          # [B, 2, 8]
    high_sc = (packed[:, None, 8:] >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)) & 0x03   # [B, 4, 4]
    sc = low_sc.reshape(num_blocks, 16) | (high_sc.reshape(num_blocks, 16) << 4)                         # 0..63
    return codes, _halves(d) * (sc.astype(np.float32) - 32), None


def _decode_q4_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[B, 144]: fp16 d, fp16 dmin, 12 bytes of eight 6-bit (scale, min) pairs, 128 bytes of codes:
    byte l of each run of 32 holds weight l (low nibble) and l + 32 (high) of its 64."""
    d, dmin, packed, qs = np.split(blocks, [2, 4, 16], axis=1)
    scales, offsets = _k_scales(d, dmin, packed)
    return _k_nibbles(qs).astype(np.int8), scales, offsets


def _decode_q5_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[B, 176]: Q4_K's d, dmin and scales, then 32 bytes of fifth bits (bit j of byte l: weight
    32 j + l), then Q4_K's 128 bytes of low nibbles."""
    d, dmin, packed, qh, qs = np.split(blocks, [2, 4, 16, 48], axis=1)
    scales, offsets = _k_scales(d, dmin, packed)
    return (_k_nibbles(qs) | (_k_bit_planes(qh) << 4)).astype(np.int8), scales, offsets


def _k_scales(d: np.ndarray, dmin: np.ndarray, packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's and Q5_K's fp16 d and dmin and 12 bytes of eight 6-bit (scale, min) pairs -> [B, 8]
    scales d sc and offsets dmin m."""
    from gguf.quants import Q4_K as gguf_q4_k

    sc, m = gguf_q4_k.get_scale_min(packed)                                              # [B, 8] each, 0..63
    return _halves(d) * sc.astype(np.float32), _halves(dmin) * m.astype(np.float32)


def _decode_iq4_nl(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, None]:
    """[B, 18]: fp16 d, 16 bytes of 4-bit indices laid out as Q4_0's. Codes IQ4_LEVELS[index]."""
    d, qs = np.hsplit(blocks, [2])
    return IQ4_LEVELS[_nibbles(qs)], _halves(d), None


def _decode_iq4_xs(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, None]:
    """[B, 136]: fp16 d, a uint16 of eight scales' high 2 bits (sub-block j at bits 2 j), 4 bytes of
    their low 4 bits (sub-block j in byte j // 2, low nibble first), then 8 runs of 16 bytes of
    indices, each laid out as IQ4_NL's block. Codes IQ4_LEVELS[index]; scales d (sc - 32) per 32."""
    num_blocks = blocks.shape[0]
    d, high, low, qs = np.split(blocks, [2, 4, 8], axis=1)
    low_sc = (low[:, :, None] >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2)) & 0x0F               # [B, 4, 2]
    high_sc = (np.ascontiguousarray(high).view("<u2") >> (2 * np.arange(8, dtype=np.uint16))) & 0x03      # [B, 8]
    sc = low_sc.reshape(num_blocks, 8) | (high_sc.astype(np.uint8) << 4)                                   # 0..63
    codes = IQ4_LEVELS[_nibbles(qs.reshape(num_blocks * 8, 16))].reshape(num_blocks, 256)
    return codes, _halves(d) * (sc.astype(np.float32) - 32), None


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
    scales = _halves(d) * sc.view(np.int8).astype(np.float32)                           # [B, 16]
    return codes, scales, None


_DECODERS = {Q4_0: _decode_q4_0, Q4_1: _decode_q4_1, Q5_0: _decode_q5_0, Q5_1: _decode_q5_1, Q8_0: _decode_q8_0,
             Q2_K: _decode_q2_k, Q3_K: _decode_q3_k, Q4_K: _decode_q4_k, Q5_K: _decode_q5_k, Q6_K: _decode_q6_k,
             IQ4_NL: _decode_iq4_nl, IQ4_XS: _decode_iq4_xs}


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
        offsets = bool(qtypes & OFFSET_TYPES)
        if qtypes <= FOUR_BIT_TYPES:
            return cls("w4a16", 32, offsets)
        return cls("w8a16", min(GROUP_SIZE[t] for t in qtypes), offsets)

    @property
    def bytes_per_weight(self) -> float:
        """Codes, plus a float32 scale per group and a float32 offset (or, 4-bit, a byte's zero point)."""
        zero_bytes = 4 if self.offsets else (1 if self.kind == "w4a16" else 0)
        return grouped_bytes_per_weight(0.5 if self.kind == "w4a16" else 1.0, self.group_size, zero_bytes)

    def make_layer(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        if self.kind == "w4a16":
            return W4A16Linear(in_features, out_features, self.group_size, bias, offsets=self.offsets)
        return W8A16Linear(in_features, out_features, self.group_size, bias, offsets=self.offsets)

    def buffers(self, weight: GroupedCodes) -> dict[str, torch.Tensor]:
        """One part's GroupedCodes -> the layer's buffers (its rows)."""
        if self.kind == "w4a16":
            if weight.offsets is None:    # Q4_0: codes -8..7 become 0..15 with the zero point 8
                weight = GroupedCodes(weight.codes + 8, weight.scales, 8 * weight.scales if self.offsets else None)
            zeros = weight.offsets if self.offsets else torch.full(weight.scales.shape, 8, dtype=torch.uint8)
            return {"qweight": pack_int4(weight.codes), "scales": weight.scales, "zeros": zeros}
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

