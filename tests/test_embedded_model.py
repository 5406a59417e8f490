"""The embedded model loads the same way however it is named: `LLM()`, its name, or a path to its file
(relative, through a link, or a copy) get the same CPU weight format, and so the same speed."""
from __future__ import annotations

import os
import shutil

import pytest

from nanovllm.config import EngineConfig
from nanovllm.model import embedded
from nanovllm.model.embedded import EMBEDDED_MODEL, is_embedded_model
from nanovllm.model.loader import resolve_model


@pytest.fixture(scope="module")
def embedded_path() -> str:
    return resolve_model(None)


def test_every_spelling_of_the_embedded_file_gets_the_format_of_llm_without_a_model(embedded_path, tmp_path,
                                                                                  monkeypatch):
    link = tmp_path / "smollm2.gguf"
    link.symlink_to(embedded_path)
    monkeypatch.chdir(tmp_path)
    default = EngineConfig(device="cpu").dtype
    assert default == "int4"
    for spelling in (EMBEDDED_MODEL, embedded_path, os.path.relpath(embedded_path), str(link), "smollm2.gguf"):
        assert EngineConfig(model=spelling, device="cpu").dtype == default, spelling


def test_a_copy_is_the_embedded_model_and_a_file_of_the_same_size_is_not(tmp_path, monkeypatch):
    original = tmp_path / "model.gguf"
    original.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    monkeypatch.setattr(embedded, "embedded_gguf_path", lambda: original)
    copy, other = tmp_path / "copy.gguf", tmp_path / "other.gguf"
    shutil.copyfile(original, copy)
    other.write_bytes(b"GGUF" + bytes(range(256))[::-1] * 4)
    assert is_embedded_model(str(copy)) and not is_embedded_model(str(other))
    assert EngineConfig(model=str(copy), device="cpu").dtype == "int4"
    assert EngineConfig(model=str(other), device="cpu").dtype == "float32"


def test_another_model_and_tensor_parallelism_stay_float32(tiny_llama, embedded_path):
    assert EngineConfig(model=str(tiny_llama), device="cpu").dtype == "float32"
    assert EngineConfig(model=embedded_path, device="cpu", tensor_parallel_size=3).dtype == "float32"


def test_llm_of_the_embedded_path_runs_the_packed_model_of_llm(embedded_path):
    from nanovllm import LLM, SamplingParams
    from nanovllm.ops.quant import PackedLinear

    greedy = SamplingParams(temperature=0, max_tokens=4)
    outputs = []
    for model in (None, embedded_path):
        llm = LLM(model, num_kv_blocks=32, max_model_len=128)
        assert isinstance(llm.engine.runner.model.layers[0].mlp.gate_up_proj, PackedLinear)
        outputs.append(llm.generate("The capital of France is", greedy, use_tqdm=False)[0].outputs[0].token_ids)
    assert outputs[0] == outputs[1]
