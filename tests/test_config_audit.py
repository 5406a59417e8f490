"""A model config we do not fully honour never runs silently wrong: fields whose values change the math
in ways nano-vllm does not implement are refused by name (HF config.json and GGUF metadata alike),
harmless ones pass, and a sliding window caps max_model_len (up to the window, full causal attention
is the same computation). The configs come from transformers' own config classes."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import transformers

from nanovllm.config import DEFAULT_MAX_MODEL_LEN, EngineConfig
from nanovllm.model.config import ModelConfig, ModelConfigError
from nanovllm.model.gguf import _config_from_metadata

SHAPE = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=32768)


def hf_dict(config_class: str = "LlamaConfig", **fields) -> dict:
    """config.json as transformers writes it for this architecture."""
    return getattr(transformers, config_class)(**SHAPE, **fields).to_dict()


@pytest.mark.parametrize("field, value", [
    ("hidden_act", "gelu"),
    ("hidden_act", "relu"),
    ("mlp_bias", True),
    ("partial_rotary_factor", 0.5),
    ("attn_logit_softcapping", 50.0),
    ("final_logit_softcapping", 30.0),
    ("num_local_experts", 8),
    ("logits_scaling", 16.0),
])
def test_a_field_that_changes_the_math_is_refused_by_name(field, value):
    config = hf_dict()
    config[field] = value
    with pytest.raises(ModelConfigError, match=rf"{field}={value!r} changes the model's math"):
        ModelConfig.from_hf_dict(config)


@pytest.mark.parametrize("field, value", [
    ("attention_dropout", 0.1), ("initializer_range", 0.5), ("use_cache", False), ("pretraining_tp", 2),
    ("hidden_act", "silu"), ("mlp_bias", False),
])
def test_harmless_fields_load(field, value):
    config = hf_dict()
    config[field] = value
    assert ModelConfig.from_hf_dict(config).sliding_window is None


def test_mistrals_sliding_window_caps_max_model_len():
    config = ModelConfig.from_hf_dict(hf_dict("MistralConfig", sliding_window=4096))
    assert config.sliding_window == 4096
    assert EngineConfig(max_model_len=None, device="cpu").fit_model(config).max_model_len == min(4096, DEFAULT_MAX_MODEL_LEN)
    assert EngineConfig(max_model_len=4096, device="cpu").fit_model(config).max_model_len == 4096
    with pytest.raises(ValueError, match=r"max_model_len=4097 exceeds the model's sliding_window \(4096\).*"
                                         r"pass max_model_len=4096 or less"):
        EngineConfig(max_model_len=4097, device="cpu").fit_model(config)
    small = ModelConfig.from_hf_dict(hf_dict("MistralConfig", sliding_window=1024))
    assert EngineConfig(max_model_len=None, device="cpu").fit_model(small).max_model_len == 1024


@pytest.mark.parametrize("config_class, fields, window", [
    ("MistralConfig", dict(sliding_window=None), None),
    ("Qwen2Config", dict(use_sliding_window=False, sliding_window=4096), None),   # present but off
    ("Qwen2Config", dict(use_sliding_window=True, sliding_window=4096, max_window_layers=0), 4096),
    ("Qwen3Config", dict(use_sliding_window=True, sliding_window=2048, max_window_layers=0), 2048),
    ("Qwen3Config", dict(use_sliding_window=False), None),
])
def test_a_sliding_window_counts_only_when_the_model_uses_it(config_class, fields, window):
    assert ModelConfig.from_hf_dict(hf_dict(config_class, **fields)).sliding_window == window


def test_an_engine_over_a_sliding_window_model_refuses_a_longer_context(tiny_llama, tmp_path):
    import json
    import shutil

    from nanovllm.engine.engine import LLMEngine

    path = shutil.copytree(tiny_llama, tmp_path / "mistral")   # Mistral's weights are laid out as Llama's
    config = json.loads((path / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=64)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"sliding_window \(64\)"):
        LLMEngine(EngineConfig(model=str(path), device="cpu", max_model_len=128))
    assert LLMEngine(EngineConfig(model=str(path), device="cpu")).config.max_model_len == 64


class FakeGGUF:
    """The parts of gguf.GGUFReader that the config reader uses: fields by key, tensors by name."""

    def __init__(self, **metadata):
        values = {"general.architecture": "llama", "llama.block_count": 2, "llama.context_length": 8192,
                  "llama.embedding_length": 64, "llama.feed_forward_length": 128, "llama.attention.head_count": 4,
                  "llama.attention.head_count_kv": 2, **metadata}
        self.fields = {key: SimpleNamespace(contents=lambda value=value: value) for key, value in values.items()}
        self.tensors = [SimpleNamespace(name="token_embd.weight", shape=(64, 320))]


def test_gguf_metadata_that_changes_the_math_is_refused_and_its_window_read():
    assert _config_from_metadata("m.gguf", FakeGGUF()).sliding_window is None
    assert _config_from_metadata("m.gguf", FakeGGUF(**{"llama.attention.sliding_window": 4096})).sliding_window == 4096
    for key, value in (("llama.expert_count", 8), ("llama.final_logit_softcapping", 30.0), ("llama.logit_scale", 0.5)):
        with pytest.raises(ModelConfigError, match=rf"{key}={value!r} changes the model's math"):
            _config_from_metadata("m.gguf", FakeGGUF(**{key: value}))


def test_a_qwen_window_left_in_the_file_but_switched_off_is_full_attention():
    config = hf_dict("Qwen2Config")
    config.update(use_sliding_window=False, sliding_window=4096)   # as Qwen2.5's published config.json has it
    assert ModelConfig.from_hf_dict(config).sliding_window is None
