"""Every broken model file raises one ModelLoadError that names the file and says what is wrong.

"One clear error" is checked three ways: the type is ModelLoadError (what the
CLI and server catch), the message names the path and the problem, and the
library exception underneath was not chained (`raise ... from None`), so the
user sees one sentence instead of a traceback from deep inside numpy or Rust.
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from conftest import write_tiny_gguf

from nanovllm.model.config import ModelConfigError
from nanovllm.model.errors import ModelLoadError
from nanovllm.model.loader import load_model, load_model_config
from nanovllm.tokenizer import Tokenizer


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NANO_VLLM_CACHE", str(tmp_path / "cache"))


def load_error(model: Path, *words: str, load=load_model, names: Path | None = None) -> ModelLoadError:
    """Load `model`, expecting a ModelLoadError that names `names` (default: `model`) and has `words`."""
    with pytest.raises(ModelLoadError) as excinfo:
        load(str(model))
    error = excinfo.value
    message = str(error)
    named = str(names or model)
    assert named in message, message
    for word in words:   # looked for outside the path: tmp paths carry the test's name
        assert word in message.replace(named, ""), message
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__), \
        "the library's exception leaks into the traceback"
    return error


def copy_model(tiny_model_factory, tmp_path, name: str = "llama-gqa4") -> Path:
    target = tmp_path / "model"
    shutil.copytree(tiny_model_factory(name), target)
    return target


def edit_config(model_dir: Path, **changes) -> None:
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def truncate(path: Path, keep: float = 0.6) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    return path


def test_missing_path(tmp_path):
    missing = tmp_path / "no-such-model"
    load_error(missing, "does not exist")
    load_error(missing, "does not exist", load=load_model_config)
    load_error(missing, "does not exist", load=Tokenizer.load)


def test_truncated_safetensors(tiny_model_factory, tmp_path):
    model_dir = copy_model(tiny_model_factory, tmp_path)
    truncate(model_dir / "model.safetensors")
    load_error(model_dir, "truncated", names=model_dir / "model.safetensors")


@pytest.mark.parametrize("keep", [0.002, 0.5, 0.999])
def test_truncated_gguf(tiny_model_factory, tmp_path, keep):
    path = truncate(write_tiny_gguf(tiny_model_factory("qwen3"), tmp_path / "m.gguf", "Q8_0"), keep)
    load_error(path, "truncated")


def test_truncated_llama2c_checkpoint(tmp_path):
    path = tmp_path / "model.bin"
    header = struct.pack("<7i", 64, 96, 2, 4, 4, 300, 32)
    path.write_bytes(header + b"\0" * 4000)
    load_error(path, "truncated")
    path.write_bytes(header[:20])
    load_error(path, "too short")


def test_truncated_llama2c_tokenizer(tmp_path):
    path = tmp_path / "tokenizer.bin"
    path.write_bytes(struct.pack("<i", 8) + struct.pack("<fi", 0.0, 5) + b"<u")
    load_error(path, "truncated", load=lambda p: Tokenizer.load(None, tokenizer=p))


def test_unsupported_architecture_in_config_json(tiny_model_factory, tmp_path):
    model_dir = copy_model(tiny_model_factory, tmp_path)
    edit_config(model_dir, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    error = load_error(model_dir, "unsupported architecture", "GPT2LMHeadModel", names=model_dir / "config.json")
    assert isinstance(error, ModelConfigError)


def test_unsupported_gguf_architecture(tmp_path):
    import gguf

    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", __import__("numpy").zeros((4, 8), dtype="float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    load_error(path, "unsupported GGUF architecture", "gpt2")


def test_heads_that_do_not_divide(tiny_model_factory, tmp_path):
    model_dir = copy_model(tiny_model_factory, tmp_path)
    edit_config(model_dir, num_key_value_heads=3)
    load_error(model_dir, "num_attention_heads (4) must be a multiple of num_key_value_heads (3)",
               names=model_dir / "config.json")


def test_tensor_shape_that_does_not_match_the_config(tiny_model_factory, tmp_path):
    model_dir = copy_model(tiny_model_factory, tmp_path)
    edit_config(model_dir, intermediate_size=128)
    load_error(model_dir, "mlp.down_proj", "shape (256, 256)", "config implies (256, 128)")


def test_missing_tensor(tiny_model_factory, tmp_path):
    from safetensors.torch import load_file, save_file

    model_dir = copy_model(tiny_model_factory, tmp_path)
    tensors = load_file(str(model_dir / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(model_dir / "model.safetensors"))
    load_error(model_dir, "missing weights", "layers.1.mlp.down_proj.weight")


def test_directory_without_config_or_weights(tiny_model_factory, tmp_path):
    model_dir = copy_model(tiny_model_factory, tmp_path)
    (model_dir / "model.safetensors").unlink()
    load_error(model_dir, "no *.safetensors")
    (model_dir / "config.json").unlink()
    load_error(model_dir, "no config.json")


def test_index_naming_a_missing_shard(tiny_model_factory, tmp_path):
    model_dir = copy_model(tiny_model_factory, tmp_path)
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}))
    load_error(model_dir, "missing", names=model_dir / "model-00001-of-00002.safetensors")


def test_config_that_is_not_json(tiny_model_factory, tmp_path):
    model_dir = copy_model(tiny_model_factory, tmp_path)
    (model_dir / "config.json").write_text("{ not json")
    load_error(model_dir, "not valid JSON", names=model_dir / "config.json")


def test_llama2c_header_with_inconsistent_heads(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(struct.pack("<7i", 64, 96, 2, 5, 5, 300, 32))
    load_error(path, "not a multiple of n_heads")


def test_file_that_is_no_known_format(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(b"PK\x03\x04 a zip, perhaps a torch pickle")
    load_error(path, "unknown model format")
    mislabeled = tmp_path / "model.gguf"
    mislabeled.write_bytes(b"<html>404</html>")
    load_error(mislabeled, "not a GGUF file")
