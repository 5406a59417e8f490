"""GPTQ and AWQ checkpoints: 4-bit (GPTQ also 8-bit) codes in groups, each with its own packing.

Both store, per HF linear module with weight [N, K] (N outputs, K inputs) and G = K / group_size:

    GPTQ (AutoGPTQ / GPTQModel, "gptq" checkpoint format):
        qweight int32 [K / 8, N]   packed along K: code of input k in bits 4 (k % 8) of row k // 8
        qzeros  int32 [G, N / 8]   packed along N: zero of output n in bits 4 (n % 8) of column n // 8,
                                   stored minus one (the format's historical offset; "gptq_v2" stores
                                   the zero itself)
        scales  fp16  [G, N]
        g_idx   int32 [K]          the group of each input; with desc_act ("act order") inputs were
                                   quantized in order of decreasing activation, so g_idx is a shuffled
                                   k // group_size. We sort the inputs by group once (input_perm) so
                                   that groups are contiguous, and gather x the same way at run time.
    AWQ (AutoAWQ, version "gemm"):
        qweight int32 [K, N / 8]   packed along N, eight outputs per word in the order
                                   0, 2, 4, 6, 1, 3, 5, 7 (nibble j holds output 8 c + order[j])
        qzeros  int32 [G, N / 8]   the same packing, zeros as they are
        scales  fp16  [G, N]

w[n, k] = (code - zero) * scale for both: W4A16Linear's layout once transposed and repacked.

8-bit GPTQ (Qwen's "GPTQ-Int8" models) packs four codes a word the same ways (input k in bits
8 (k % 4) of row k // 4; zeros four outputs a word). It becomes W8A16Linear: int8 codes
code - 128 and the float offset (zero - 128) * scale, exact in float32 (a float16 scale times an
integer under 256), so q s - offset is (code - zero) * scale to the bit.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nanovllm.model.errors import ModelLoadError
from nanovllm.model.quantization.layers import W4A16Linear, W8A16Linear
from nanovllm.model.quantization.method import QuantizationMethod, grouped_bytes_per_weight
from nanovllm.ops.quant_linear import PACK_FACTOR, pack_int4, unpack_int4

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)      # output 8 c + AWQ_ORDER[j] sits in nibble j of word c


class _GptqAwq(QuantizationMethod):
    """What GPTQ and AWQ share: codes in groups along K (4-bit; GPTQ also 8-bit), built into
    W4A16Linear or W8A16Linear."""

    bits = 4

    def __init__(self, group_size: int):
        self.group_size = group_size       # -1: one group spans all of K

    @property
    def bytes_per_weight(self) -> float:
        if self.bits == 4:
            return super().bytes_per_weight
        return grouped_bytes_per_weight(1.0, self.group_size, 4)     # int8 codes, a scale and an offset

    def make_layer(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        group_size = in_features if self.group_size == -1 else self.group_size
        act_order = getattr(self, "desc_act", False)
        if self.bits == 8:
            return W8A16Linear(in_features, out_features, group_size, bias, offsets=True, act_order=act_order)
        return W4A16Linear(in_features, out_features, group_size, bias, act_order=act_order)

    @staticmethod
    def _check(module: str, name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
        if tensor.dtype != torch.int32 or tuple(tensor.shape) != shape:
            raise ModelLoadError(f"{module}.{name} is {tensor.dtype} {tuple(tensor.shape)}; expected int32 {shape}")


def _bits_and_group(config: dict[str, Any], method: str, source: str, allowed: tuple[int, ...]) -> tuple[int, int]:
    bits = config.get("bits", config.get("w_bit"))
    if bits not in allowed:
        raise ModelLoadError(f"{source}: {method} with {bits}-bit weights is not supported; nano-vllm runs "
                             f"{' and '.join(str(b) for b in allowed)}-bit {method}")
    return bits, int(config.get("group_size", config.get("q_group_size", 128)))


class Gptq(_GptqAwq):
    name = "gptq"

    def __init__(self, group_size: int, desc_act: bool, zero_offset: int, bits: int = 4):
        super().__init__(group_size)
        self.bits = bits
        self.desc_act = desc_act
        self.zero_offset = zero_offset     # 1 for the "gptq" format, whose zeros are stored minus one
        self.ignored = frozenset() if desc_act else frozenset({"g_idx"})

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str) -> "Gptq":
        bits, group_size = _bits_and_group(config, "GPTQ", source, (4, 8))
        fmt = config.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise ModelLoadError(f"{source}: GPTQ checkpoint_format {fmt!r} is not supported; nano-vllm reads "
                                 "'gptq' and 'gptq_v2'")
        return cls(group_size, bool(config.get("desc_act", False)), 1 if fmt == "gptq" else 0, bits)

    def required(self) -> frozenset[str]:
        names = {"qweight", "qzeros", "scales"}
        return frozenset(names | {"g_idx"} if self.desc_act else names)

    def convert(self, module: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        scales = tensors["scales"]
        num_groups, out_features = scales.shape
        per_word = 32 // self.bits
        in_features = tensors["qweight"].shape[0] * per_word
        self._check(module, "qweight", tensors["qweight"], (in_features // per_word, out_features))
        self._check(module, "qzeros", tensors["qzeros"], (num_groups, out_features // per_word))
        unpack = _bytes if self.bits == 8 else unpack_int4
        codes = unpack(tensors["qweight"].T.contiguous())                                # [N, K]
        zeros = (unpack(tensors["qzeros"]).to(torch.int16) + self.zero_offset).clamp(0, (1 << self.bits) - 1)  # [G, N]
        out = {}
        if self.desc_act:
            g_idx = tensors["g_idx"].to(torch.int64)                                     # [K]
            perm = torch.argsort(g_idx, stable=True)                                     # inputs by group
            group_size = in_features // num_groups
            if not torch.equal(g_idx[perm], torch.arange(in_features) // group_size):
                raise ModelLoadError(f"{module}.g_idx does not put {group_size} inputs in each group; the "
                                     "checkpoint is damaged")
            codes, out["input_perm"] = codes[:, perm], perm
        scales = scales.T.float().contiguous()                                           # [N, G]
        if self.bits == 8:
            out["qweight"] = (codes.to(torch.int16) - 128).to(torch.int8)
            out["scales"], out["offsets"] = scales, ((zeros.T - 128).float() * scales).contiguous()
        else:
            out["qweight"], out["scales"] = pack_int4(codes), scales
            out["zeros"] = zeros.to(torch.uint8).T.contiguous()
        return out


class Awq(_GptqAwq):
    name = "awq"

    def __init__(self, group_size: int, zero_point: bool):
        super().__init__(group_size)
        self.zero_point = zero_point

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str) -> "Awq":
        _, group_size = _bits_and_group(config, "AWQ", source, (4,))
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            raise ModelLoadError(f"{source}: AWQ version {version!r} is not supported; nano-vllm reads the 'gemm' "
                                 "packing")
        return cls(group_size, bool(config.get("zero_point", True)))

    def required(self) -> frozenset[str]:
        return frozenset({"qweight", "qzeros", "scales"})

    def convert(self, module: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        scales = tensors["scales"]
        num_groups, out_features = scales.shape
        in_features = tensors["qweight"].shape[0]
        self._check(module, "qweight", tensors["qweight"], (in_features, out_features // PACK_FACTOR))
        self._check(module, "qzeros", tensors["qzeros"], (num_groups, out_features // PACK_FACTOR))
        codes = _awq_unpack(tensors["qweight"])                                          # [K, N]
        zeros = _awq_unpack(tensors["qzeros"])                                           # [G, N]
        return {"qweight": pack_int4(codes.T.contiguous()), "scales": scales.T.contiguous(),
                "zeros": zeros.T.contiguous()}


def _bytes(packed: torch.Tensor) -> torch.Tensor:
    """[R, C] int32, four 8-bit codes a word, code j in bits 8 j -> [R, 4 C] uint8 (little-endian words)."""
    return packed.contiguous().view(torch.uint8).view(packed.shape[0], -1)


def _awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    """[R, N / 8] int32 in AWQ's order -> codes [R, N] uint8 by output."""
    nibbles = unpack_int4(packed).view(packed.shape[0], -1, PACK_FACTOR)                # [R, N / 8, 8] by nibble
    order = torch.tensor(AWQ_ORDER)
    by_output = torch.empty_like(nibbles)
    by_output[..., order] = nibbles                                                     # output order[j] <- nibble j
    return by_output.view(packed.shape[0], -1)
