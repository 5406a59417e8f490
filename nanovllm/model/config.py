"""ModelConfig: the shape of a Llama-family decoder, whatever file it came from.

A HuggingFace `config.json`, the metadata of a GGUF file and the 7-int header
of a llama2.c checkpoint all describe the same few numbers: how wide the
residual stream is, how many layers, how many query and key/value heads, how
the rotary embedding is scaled. The loader turns each into this one dataclass,
and `validate()` checks that the numbers fit together before any weight is read.

A config field we do not honour must never change the math silently, so every
field the loaders meet is in one of three sets:

- read: the fields of `ModelConfig` below (HF names; GGUF's `{arch}.*` keys
  map onto the same numbers).
- harmless: fields about training or bookkeeping that change nothing at
  inference (`attention_dropout`, `initializer_range`, `use_cache`,
  `pretraining_tp`: a sliced matmul that sums to the same product, ...).
- refused (`UNSUPPORTED_HF_FIELDS`, `UNSUPPORTED_GGUF_KEYS`): a value other
  than the neutral one means math we do not implement (another activation,
  MLP biases, partial rotary embeddings, logit soft-capping, mixture of
  experts), and loading stops with a sentence naming the field.

Sliding-window attention (Mistral's `sliding_window`, Qwen's with
`use_sliding_window`) is read but not implemented: up to the window, full
causal attention is exactly the same thing, so `sliding_window` becomes a cap
on `max_model_len` (`EngineConfig.fit_model`) instead of a refusal.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nanovllm.model.errors import ModelLoadError

# HF `architectures` / `model_type` values we know how to run, mapped to our family name.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
SUPPORTED_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}


class ModelConfigError(ModelLoadError):
    """A model description that cannot be run (unsupported or inconsistent)."""


# HF config fields whose every value but the neutral ones changes the math in a way we do not implement.
UNSUPPORTED_HF_FIELDS: dict[str, tuple[Any, ...]] = {
    "hidden_act": (None, "silu", "swish"),    # the MLP's gate is SiLU
    "hidden_activation": (None, "silu", "swish"),
    "mlp_bias": (None, False),                # gate/up/down projections without bias
    "partial_rotary_factor": (None, 1, 1.0),  # RoPE over the whole head
    "attn_logit_softcapping": (None,),
    "final_logit_softcapping": (None,),
    "num_local_experts": (None, 0, 1),        # mixture of experts
    "num_experts": (None, 0, 1),
    "logits_scaling": (None, 1, 1.0),
    "embedding_multiplier": (None, 1, 1.0),
    "residual_multiplier": (None, 1, 1.0),
    "attention_multiplier": (None,),
}
# GGUF `{arch}.*` metadata keys likewise (None: the key absent).
UNSUPPORTED_GGUF_KEYS: dict[str, tuple[Any, ...]] = {
    "expert_count": (None, 0, 1),
    "attn_logit_softcapping": (None,),
    "final_logit_softcapping": (None,),
    "logit_scale": (None, 1, 1.0),
}


@dataclass
class ModelConfig:
    architecture: str                 # "llama" | "mistral" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None   # {"rope_type": "llama3"|"linear", ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False      # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool = False             # RMSNorm over each head of q and k (Qwen3)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str = "float32"      # the dtype the weights were published in
    sliding_window: int | None = None  # each token attends to the last this many (Mistral); None: all
    quantization_config: dict[str, Any] | None = None   # config.json's, for a quantized checkpoint

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Build from a HuggingFace config dict (transformers 4.x or 5.x keys)."""
        architecture = _architecture_of(d, source)
        refuse_unsupported(source, {name: d.get(name) for name in UNSUPPORTED_HF_FIELDS}, UNSUPPORTED_HF_FIELDS)
        try:
            num_heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            # transformers 5 folds rope_theta and rope_scaling into `rope_parameters`.
            rope = d.get("rope_parameters") or {}
            scaling = d.get("rope_scaling") or None
            if scaling is None and rope.get("rope_type", "default") != "default":
                scaling = dict(rope)
            if scaling is not None:
                scaling = dict(scaling)
                scaling.setdefault("rope_type", scaling.get("type", "default"))
                if scaling["rope_type"] == "default":
                    scaling = None
            rope_theta = float(d.get("rope_theta", rope.get("rope_theta", 10000.0)))
            eos = d.get("eos_token_id")
            eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
            config = cls(
                architecture=architecture,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=num_heads,
                num_key_value_heads=int(d.get("num_key_value_heads") or num_heads),
                head_dim=int(d.get("head_dim") or hidden // num_heads),
                max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=scaling,
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=bool(d.get("attention_bias", architecture == "qwen2")),
                qk_norm=architecture == "qwen3",
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=eos_ids,
                torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "float32"),
                sliding_window=_hf_sliding_window(d, source),
                quantization_config=d.get("quantization_config"),
            )
        except KeyError as e:
            raise ModelConfigError(f"{source}: missing required field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ModelConfigError(f"{source}: a field has the wrong type ({e})") from None
        config.validate(source)
        return config

    def validate(self, source: str = "model config") -> None:
        """Raise ModelConfigError naming `source` if the shapes cannot fit together."""
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ModelConfigError(f"{source}: {name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelConfigError(
                f"{source}: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention")
        if self.head_dim % 2:
            raise ModelConfigError(f"{source}: head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ModelConfigError(f"{source}: sliding_window must be positive, got {self.sliding_window}")
        if self.rope_scaling is not None and self.rope_scaling["rope_type"] not in ("llama3", "linear"):
            raise ModelConfigError(
                f"{source}: rope_scaling type {self.rope_scaling['rope_type']!r} is not supported "
                "(supported: llama3, linear)")


def refuse_unsupported(source: str, values: dict[str, Any], neutral: dict[str, tuple[Any, ...]]) -> None:
    """Raise ModelConfigError for the first field whose value is not one of its neutral ones."""
    for name, value in values.items():
        if value not in neutral[name]:
            raise ModelConfigError(f"{source}: {name}={value!r} changes the model's math in a way nano-vllm does "
                                   f"not implement (it runs {name} in {list(neutral[name])} only); this model "
                                   "cannot be served correctly")


def _hf_sliding_window(d: dict[str, Any], source: str) -> int | None:
    """The attention window, or None for full attention. Qwen configs carry a `sliding_window` that
    counts only with `use_sliding_window` (and `layer_types` may name sliding layers instead)."""
    window = d.get("sliding_window")
    if "use_sliding_window" in d and not d["use_sliding_window"]:
        window = None
    layer_types = d.get("layer_types") or []
    if any(kind != "full_attention" for kind in layer_types):
        if not d.get("sliding_window"):
            raise ModelConfigError(f"{source}: layer_types {sorted(set(layer_types))} are not all full attention "
                                   "and no sliding_window is given; nano-vllm cannot run this model")
        window = d["sliding_window"]
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int):
        raise ModelConfigError(f"{source}: sliding_window must be an integer, got {window!r}")
    return window


def _architecture_of(d: dict[str, Any], source: str) -> str:
    for name in d.get("architectures") or []:
        if name in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[name]
    model_type = d.get("model_type")
    if model_type in SUPPORTED_MODEL_TYPES:
        return SUPPORTED_MODEL_TYPES[model_type]
    named = d.get("architectures") or model_type
    raise ModelConfigError(
        f"{source}: unsupported architecture {named!r}; nano-vllm runs "
        f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}")
