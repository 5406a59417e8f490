"""Post-load conversion of a model to a CPU weight format (see ops/quant.py).

    float32    as loaded (the reference)
    int8       decoder-layer weights int8 per output channel
    int4       decoder-layer weights int4 in groups of 32: GGUF Q4_1's layout, so the
               embedded Q4_1 model keeps its own weights

Only the matmul weights change: q/k/v, o, gate/up, down and the LM head (95% of
the bytes a decode step reads). Each becomes a PackedLinear: int4 multiplies every
step with its packed weights (the same rounding for a row whatever the batch, so
greedy output does not depend on the load); int8 keeps a bfloat16 copy for prefill
and large batches. The LM head is
packed int4 with its top candidates' logits recomputed in float32 from the
float32 weight (RefinedLMHead); a tied head shares that weight with the
embedding. Activations, norms, attention and the KV cache stay float32: with
bfloat16 activations the top-1 token already disagrees with float32 at 5% of
positions, outside the quality guard (tests/test_cpu_formats.py).

Converting takes seconds, so the converted model of a model *file* is cached
(`torch.save`, one file beside the GGUF cache) and memory-mapped on the next
load. The cache name carries torch's version: the packed int4 layout is torch's.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from nanovllm.model.config import ModelConfig
from nanovllm.model.llama import LlamaForCausalLM
from nanovllm.ops.quant import INT4_GROUP_SIZE, INT8_K_MULTIPLE, PackedLinear, RefinedLMHead

QUANTIZED_FORMATS = ("int8", "int4")

_LAYER_LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
CACHE_VERSION = 2     # bump when what is written to the cache changes


def packed_format(model: nn.Module) -> str | None:
    """The CPU weight format of the model's linear layers ("int8" | "int4"), None when they are not packed."""
    return next((module.fmt for module in model.modules() if isinstance(module, PackedLinear)), None)


def quantize_model(model: LlamaForCausalLM, fmt: str) -> LlamaForCausalLM:
    """Replace the model's linear layers by PackedLinear in `fmt` ("int8" | "int4") in place, the
    LM head by a RefinedLMHead; everything else stays float32. Returns the model."""
    if fmt not in QUANTIZED_FORMATS:
        raise ValueError(f"quantized format must be one of {', '.join(QUANTIZED_FORMATS)}, got {fmt!r}")
    for layer in model.layers:
        for name in _LAYER_LINEARS:
            parent_name, attr = name.split(".")
            parent = getattr(layer, parent_name)
            linear = getattr(parent, attr)
            layer_fmt = _layer_format(fmt, linear.weight)
            if layer_fmt is not None:
                setattr(parent, attr, _packed(linear, layer_fmt))
    head_fmt = _layer_format("int4", model.lm_head.weight)
    if head_fmt is not None:
        tied = model.lm_head.weight is model.embed_tokens.weight
        model.lm_head = RefinedLMHead(_packed(model.lm_head, head_fmt),
                                      model.embed_tokens.weight if tied else model.lm_head.weight.data)
    model._fused = None       # the next CPU step decides on the fused forward (llama_numba.py) again
    return model


def _layer_format(fmt: str, weight: torch.Tensor) -> str | None:
    """The format a weight [N, K] can take: int4 needs N % 16 == 0 and K % 32 == 0, else int8;
    int8 needs K % 16 == 0, else None (the layer stays float32)."""
    num_rows, in_features = weight.shape
    if fmt == "int4" and not num_rows % 16 and not in_features % INT4_GROUP_SIZE:
        return "int4"
    return "int8" if not in_features % INT8_K_MULTIPLE else None


def _packed(linear: nn.Linear, fmt: str) -> PackedLinear:
    bias = None if linear.bias is None else linear.bias.data.to(torch.bfloat16)
    return PackedLinear.from_weight(linear.weight.data, fmt, bias=bias)


# ---- the cache of converted weights ----------------------------------------------------------

def cached_path(model_path: str, fmt: str) -> Path | None:
    """Where the converted weights of a model *file* live; None for directories (their files can
    change without the folder noticing), whose conversion simply runs again."""
    from nanovllm.model.gguf import cache_entry

    if not Path(model_path).is_file():
        return None
    return cache_entry(model_path) / f"{fmt}-v{CACHE_VERSION}-torch{torch.__version__}.pt"


def load_quantized(path: Path, config: ModelConfig) -> LlamaForCausalLM | None:
    """The converted model cached at `path`, memory-mapped; None when there is none or it is unreadable."""
    from nanovllm.model.loader import _build
    from nanovllm.model.parallel import ParallelState

    if not path.is_file():
        return None
    try:
        state = torch.load(path, mmap=True, weights_only=True)   # name -> tensor
    except (OSError, RuntimeError, EOFError):
        return None
    model = _build(config, "cpu", torch.float32, ParallelState())   # empty float weights, replaced below
    try:
        for i, layer in enumerate(model.layers):
            for name in _LAYER_LINEARS:
                parent_name, attr = name.split(".")
                if f"layers.{i}.{name}.packed" in state:   # else it stayed an nn.Linear
                    setattr(getattr(layer, parent_name), attr, _packed_from_state(state, f"layers.{i}.{name}"))
        if "lm_head.coarse.packed" in state:
            model.lm_head = RefinedLMHead(_packed_from_state(state, "lm_head.coarse"), state["lm_head.weight"])
        model.load_state_dict(state, strict=True, assign=True)
    except (KeyError, RuntimeError):    # written for another shape of the model code: convert again
        return None
    return model.eval().requires_grad_(False)


def _packed_from_state(state: dict[str, torch.Tensor], prefix: str) -> PackedLinear:
    return PackedLinear(state[f"{prefix}.packed"], state[f"{prefix}.scales"], state.get(f"{prefix}.dense"),
                        state.get(f"{prefix}.bias"))


def save_quantized(model: LlamaForCausalLM, path: Path) -> None:
    """Write the converted model to `path` atomically; a cache that cannot be written is skipped
    (the next load converts again)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)


def load_quantized_model(model: str | None, fmt: str,
                         load_format: str = "auto") -> tuple[LlamaForCausalLM, ModelConfig]:
    """`load_model` on the CPU, then `quantize_model(fmt)`, through the cache of converted weights."""
    from nanovllm.model.loader import load_model, load_model_config, resolve_model

    config = load_model_config(model, load_format)
    path = None if load_format == "dummy" else cached_path(resolve_model(model), fmt)
    if path is not None:
        cached = load_quantized(path, config)
        if cached is not None:
            return cached, config
    llm, config = load_model(model, device="cpu", dtype=torch.float32, load_format=load_format)
    quantize_model(llm, fmt)
    if path is not None:
        save_quantized(llm, path)
    return llm, config
