"""Dummy weights: a real model's exact shape filled with random numbers.

Speed depends on shapes, not on what the weights say, so a benchmark of
Llama-3.1-8B needs no checkpoint: build the published shape and fill it with
small random values (normal, std 0.02; norms ones) directly on the device.
The output is gibberish; the FLOPs and bytes moved are those of the real model.
"""
from __future__ import annotations

from pathlib import Path

import torch

from nanovllm.model.config import ModelConfig
from nanovllm.model.errors import ModelLoadError
from nanovllm.model.weight_utils import read_json

# The published config.json fields of each model, as shipped by its authors.
BUILTIN_CONFIGS: dict[str, dict] = {
    "qwen3-0.6b": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=1024,
        intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
        head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
        rope_scaling=None, tie_word_embeddings=True, attention_bias=False, bos_token_id=151643,
        eos_token_id=151645, torch_dtype="bfloat16"),
    "llama-3.2-1b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=2048,
        intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        tie_word_embeddings=True, attention_bias=False, bos_token_id=128000, eos_token_id=128001,
        torch_dtype="bfloat16"),
    "llama-3.1-8b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        tie_word_embeddings=False, attention_bias=False, bos_token_id=128000, eos_token_id=128001,
        torch_dtype="bfloat16"),
}


def dummy_config(model: str | None) -> ModelConfig:
    """A built-in name (BUILTIN_CONFIGS) or a config.json path / a directory holding one."""
    if model is None:
        raise ModelLoadError(f"load_format='dummy' needs a model: a built-in name ({', '.join(BUILTIN_CONFIGS)}) "
                             "or a config.json")
    if model.lower() in BUILTIN_CONFIGS:
        return ModelConfig.from_hf_dict(BUILTIN_CONFIGS[model.lower()], source=f"built-in config {model!r}")
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ModelLoadError(
            f"dummy model {model!r} is neither a built-in name ({', '.join(BUILTIN_CONFIGS)}) nor an "
            "existing config.json or directory holding one")
    return ModelConfig.from_hf_dict(read_json(path), source=str(path))


@torch.no_grad()
def init_dummy_weights(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Fill every parameter in place on its own device: norms with ones, the rest ~ N(0, std)."""
    generator = None
    for name, param in model.named_parameters():
        if generator is None:
            generator = torch.Generator(device=param.device).manual_seed(seed)
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, std, generator=generator)
