"""What every quantization method provides, and the routing of checkpoint tensors into quantized layers."""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch
from torch import nn

from nanovllm.model.errors import ModelLoadError

# The HuggingFace linear modules of a decoder layer, each quantized by every method here.
QUANTIZED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def grouped_bytes_per_weight(code_bytes: float, group_size: int, zero_bytes: int) -> float:
    """What one weight of a grouped layout costs: its code (0.5 bytes in W4A16Linear, 1 in
    W8A16Linear), plus its share of a float32 scale and a zero (zero_bytes: a uint8 zero point 1, a
    float32 offset 4, none 0) per group; group_size <= 0 (one group a row): the code alone."""
    return code_bytes + (4 + zero_bytes) / group_size if group_size > 0 else code_bytes


class QuantizationMethod:
    """One way a checkpoint stores its linear weights. Subclasses set `name` and define the three
    methods below; `required` and `ignored` are suffixes of a HF module's tensors
    (`model.layers.0.self_attn.q_proj` + `.qweight`)."""

    name: str = ""
    online: bool = False                     # True: converts a loaded float model (quantize_loaded_model)
    quantizes_lm_head: bool = False          # the LM head too (a fifth of Llama-3.2-1B's bytes in bfloat16)
    ignored: frozenset[str] = frozenset()    # tensors the method reads past (e.g. GPTQ's trivial g_idx)

    @property
    def bytes_per_weight(self) -> float:
        """What one weight of a quantized layer costs in memory, its share of scales and zeros
        included; the per-row float32 scales of FP8 (4 bytes a row) are left out."""
        group_size = getattr(self, "group_size", None)
        if group_size is None:
            return 1.0                                   # e4m3
        return grouped_bytes_per_weight(0.5, group_size, 1)   # 4-bit codes, a float32 scale and a uint8 zero a group

    def lm_head_method(self) -> QuantizationMethod | None:
        """The method that quantizes the LM head (an online method's quantize_loaded_model), or None
        to keep it in the model's dtype: this one, unless a subclass stores the head another way."""
        return self if self.quantizes_lm_head else None

    def required(self) -> frozenset[str]:
        """The tensors one quantized HF module must have in the checkpoint."""
        raise NotImplementedError

    def make_layer(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        """The layer that replaces a (fused) nn.Linear of this shape."""
        raise NotImplementedError

    def convert(self, module: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One HF module's checkpoint tensors (by suffix) -> the layer's buffers, their dim 0 this
        module's output channels (input_perm: [K]). ModelLoadError for tensors that do not fit."""
        raise NotImplementedError


def _split_name(name: str) -> tuple[str, str] | None:
    """'model.layers.3.mlp.up_proj.qweight' -> ('model.layers.3.mlp.up_proj', 'qweight') for the
    linear modules of a decoder layer; None for every other tensor."""
    parts = name.split(".")
    if len(parts) < 3 or parts[-2] not in QUANTIZED_MODULES or "layers" not in parts:
        return None
    return ".".join(parts[:-1]), parts[-1]


def _read(tensor: Any) -> torch.Tensor:
    """A tensor, or a lazy safetensors slice read whole."""
    return tensor if isinstance(tensor, torch.Tensor) else tensor[:]


def quantized_weights(model: nn.Module, method: QuantizationMethod,
                      weights: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    """Pass `weights` on to `load_weights`, less the tensors of quantized modules: those are
    converted by `method` and copied into the model's quantized layers (as soon as a module's
    tensors are all read). When the input ends, every quantized layer must have been filled."""
    required, ignored = method.required(), method.ignored
    pending: dict[str, dict[str, torch.Tensor]] = {}
    rows_left = {name: module.out_features for name, module in model.named_modules()
                 if name.endswith(("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))}
    perms: dict[str, torch.Tensor] = {}
    for name, tensor in weights:
        split = _split_name(name)
        if split is None or split[1] not in required | ignored:
            yield name, tensor
            continue
        module, suffix = split
        if suffix in ignored:
            continue
        tensors = pending.setdefault(module, {})
        tensors[suffix] = _read(tensor)
        if required <= tensors.keys():
            _copy_into_layer(model, module, method.convert(module, pending.pop(module)), rows_left, perms)
    if pending:
        module, tensors = next(iter(pending.items()))
        missing = ", ".join(sorted(required - tensors.keys()))
        raise ModelLoadError(f"{module} lacks the tensor(s) {missing} of a {method.name} checkpoint")
    unfilled = [name for name, left in rows_left.items() if left > 0]
    if unfilled:
        shown = ", ".join(unfilled[:4]) + (f" and {len(unfilled) - 4} more" if len(unfilled) > 4 else "")
        raise ModelLoadError(f"missing quantized weights of {shown} ({method.name} checkpoint)")


def _copy_into_layer(model: nn.Module, module: str, buffers: dict[str, torch.Tensor],
                     rows_left: dict[str, int], perms: dict[str, torch.Tensor]) -> None:
    """Copy one HF module's converted buffers (all its rows and inputs) into this rank's part of the
    fused layer it belongs to."""
    slot = model._param_slot(f"{module}.weight")          # where this module's rows sit in the fused layer
    layer_name = slot.name.removesuffix(".weight")
    layer = model.get_submodule(layer_name)
    start, end = slot.rows if slot.rows is not None else (0, layer.out_features)
    for buffer_name, value in buffers.items():
        target = getattr(layer, buffer_name)
        if target is None:
            raise ModelLoadError(f"{module}: the checkpoint has {buffer_name!r}, which this model's layer "
                                 "does not take")
        if buffer_name == "input_perm":   # one input order for the whole fused layer
            if layer_name in perms and not torch.equal(perms[layer_name], value):
                raise ModelLoadError(f"{module}: its act-order (g_idx) differs from the other modules fused into "
                                     f"{layer_name}; nano-vllm needs them equal, as GPTQ makes them")
            perms[layer_name] = value
            target.copy_(value)
            continue
        value = _this_ranks_part(value, slot)
        target = target[start:end]
        if tuple(value.shape) != tuple(target.shape):
            raise ModelLoadError(f"{module}.{buffer_name}: converted to shape {tuple(value.shape)}, the config "
                                 f"implies {tuple(target.shape)}")
        target.copy_(value)
    rows_left[layer_name] -= end - start


def _this_ranks_part(value: torch.Tensor, slot: Any) -> torch.Tensor:
    """This tensor-parallel rank's part of one converted buffer (slot: `LlamaForCausalLM._param_slot`).
    Column-parallel modules (q/k/v, gate/up) split their output channels, every buffer's dim 0.
    Row-parallel ones (o, down) split K: a 2-D buffer's dim 1 runs along K, a column for every
    K / columns inputs (1 for codes and e4m3 weights, 8 for packed words, the group size for
    scales, zeros and offsets); the layer built for the rank's share of K has already refused a
    share that is not whole groups, except one group a row (per-channel scales [N, 1]), which
    every rank takes. A 1-D buffer (a scale per output channel) serves every rank whole too.
    With one rank: the buffer itself."""
    first, last = slot.part
    if slot.split_dim == 0:
        return value[first:last]
    if slot.split_dim != 1 or value.dim() != 2:
        return value
    inputs_per_column = slot.full_size // value.shape[1]
    return value[:, first // inputs_per_column:-(-last // inputs_per_column)]
