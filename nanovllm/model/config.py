"""ModelConfig: the shape of a Llama-family decoder, whatever file it came from.

A HuggingFace `config.json`, the metadata of a GGUF file and the 7-int header
of a llama2.c checkpoint all describe the same few numbers: how wide the
residual stream is, how many layers, how many query and key/value heads, how
the rotary embedding is scaled. The loader turns each into this one dataclass,
and `validate()` checks that the numbers fit together before any weight is read.
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
    quantization_config: dict[str, Any] | None = None   # config.json's, for a quantized checkpoint

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Build from a HuggingFace config dict (transformers 4.x or 5.x keys)."""
        architecture = _architecture_of(d, source)
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
        if self.rope_scaling is not None and self.rope_scaling["rope_type"] not in ("llama3", "linear"):
            raise ModelConfigError(
                f"{source}: rope_scaling type {self.rope_scaling['rope_type']!r} is not supported "
                "(supported: llama3, linear)")


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
