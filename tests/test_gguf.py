"""GGUF files load into the same model transformers builds, quantized or not, and the float cache is used.

Tiny models are converted to GGUF here the way llama.cpp does it (q/k rows
permuted for `llama`, not for qwen2/qwen3); the embedded SmolLM2 GGUF is
compared with transformers loading the very same file.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch
from conftest import PagedSequence, assert_logits_close, write_tiny_gguf

import nanovllm.model.gguf as gguf_module
from nanovllm.model.config import ModelConfigError
from nanovllm.model.loader import load_model, load_model_config, resolve_model
from nanovllm.tokenizer import IncrementalDetokenizer, Tokenizer

GGUF_MODELS = ["llama-gqa4", "llama-mha-hd80", "llama3-8k", "qwen2", "qwen3"]
# Llama 3 RoPE scaling in GGUF is a tensor of divisors, recognised for Llama 3's own constants only.
LLAMA3_8K_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192}
# Largest error a dequantized weight may have, as a fraction of its row's largest magnitude.
QUANT_TOLERANCE = {"F16": 1e-3, "BF16": 8e-3, "Q8_0": 1 / 127, "Q4_0": 1 / 8, "Q4_1": 1 / 8}


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """Tiny GGUFs written by a test cache their weights in the test's own folder."""
    monkeypatch.setenv("NANO_VLLM_CACHE", str(tmp_path / "cache"))


def hf_model(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def fused_reference(theirs, config) -> dict[str, torch.Tensor]:
    """transformers' parameters under our (fused q/k/v and gate/up) names."""
    state = {name.removeprefix("model."): t for name, t in theirs.state_dict().items()}
    out = {}
    for name, tensor in state.items():
        if ".q_proj." in name:
            parts = [state[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            out[name.replace("q_proj", "qkv_proj")] = torch.cat(parts)
        elif ".gate_proj." in name:
            out[name.replace("gate_proj", "gate_up_proj")] = torch.cat([tensor, state[name.replace("gate", "up")]])
        elif not any(p in name for p in (".k_proj.", ".v_proj.", ".up_proj.")):
            out[name] = tensor
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def tiny_hf_dir(tiny_model_factory, name: str):
    if name == "llama3-8k":
        return tiny_model_factory("llama3-scaled", rope_scaling=dict(LLAMA3_8K_SCALING))   # transformers edits it
    return tiny_model_factory(name)


@pytest.mark.parametrize("name", GGUF_MODELS)
def test_float32_gguf_logits_match_transformers(name, tiny_model_factory, tmp_path, private_cache):
    hf_dir = tiny_hf_dir(tiny_model_factory, name)
    ours, config = load_model(str(write_tiny_gguf(hf_dir, tmp_path / f"{name}.gguf")))
    tokens = torch.randint(0, config.vocab_size, (29,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        expected = hf_model(hf_dir)(torch.tensor([tokens])).logits[0]
    assert_logits_close(PagedSequence(ours).step(tokens), expected)


def test_gguf_metadata_gives_the_transformers_config(tiny_model_factory, tmp_path, private_cache):
    hf_dir = tiny_model_factory("qwen2")
    from_gguf = load_model_config(str(write_tiny_gguf(hf_dir, tmp_path / "qwen2.gguf")))
    from_hf = load_model_config(str(hf_dir))
    for field in ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "rope_theta",
                  "tie_word_embeddings", "attention_bias", "qk_norm", "bos_token_id", "eos_token_ids"):
        assert getattr(from_gguf, field) == getattr(from_hf, field), field
    assert from_gguf.rms_norm_eps == pytest.approx(from_hf.rms_norm_eps)


def test_llama3_rope_freqs_tensor_becomes_llama3_scaling(tiny_model_factory, tmp_path, private_cache):
    hf_dir = tiny_hf_dir(tiny_model_factory, "llama3-8k")
    config = load_model_config(str(write_tiny_gguf(hf_dir, tmp_path / "llama3.gguf")))
    assert config.rope_scaling == LLAMA3_8K_SCALING
    hf_scaling = load_model_config(str(hf_dir)).rope_scaling
    assert {key: hf_scaling[key] for key in LLAMA3_8K_SCALING} == LLAMA3_8K_SCALING


def test_rope_freqs_of_other_constants_are_rejected(tiny_model_factory, tmp_path, private_cache):
    path = write_tiny_gguf(tiny_model_factory("llama3-scaled"), tmp_path / "ctx64.gguf")   # original context 64
    with pytest.raises(ModelConfigError, match="not Llama 3 RoPE scaling"):
        load_model_config(str(path))


@pytest.mark.parametrize("qtype", sorted(QUANT_TOLERANCE))
def test_quantized_gguf_weights_are_within_one_quantization_step(qtype, tiny_model_factory, tmp_path, private_cache):
    hf_dir = tiny_model_factory("llama-gqa4")
    ours, config = load_model(str(write_tiny_gguf(hf_dir, tmp_path / f"{qtype}.gguf", qtype)))
    expected = fused_reference(hf_model(hf_dir), config)
    params = dict(ours.named_parameters())
    assert set(params) == set(expected)
    for name, reference in expected.items():
        row_scale = reference.abs().amax(dim=-1, keepdim=True)
        error = (params[name] - reference).abs()
        assert (error <= QUANT_TOLERANCE[qtype] * row_scale + 1e-7).all(), name
        if reference.ndim == 2:   # quantized, so not exactly equal: the loader did dequantize
            assert error.max() > 0, name


def test_second_load_reads_the_cache_not_the_gguf(tiny_model_factory, tmp_path, monkeypatch, private_cache):
    path = str(write_tiny_gguf(tiny_model_factory("qwen3"), tmp_path / "qwen3.gguf", "Q8_0"))
    first, _ = load_model(path)

    def no_parsing(_path):
        raise AssertionError("the GGUF was parsed again")
    monkeypatch.setattr(gguf_module, "open_gguf", no_parsing)
    second, _ = load_model(path)
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters()):
        assert torch.equal(a, b), name
    assert (gguf_module.cache_entry(path) / "model.safetensors").is_file()


def test_a_modified_gguf_gets_a_new_cache_entry(tiny_model_factory, tmp_path, private_cache):
    path = write_tiny_gguf(tiny_model_factory("qwen3"), tmp_path / "qwen3.gguf")
    before = gguf_module.cache_entry(str(path))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF                      # one byte of the last tensor
    stat = path.stat()
    path.write_bytes(bytes(data))
    # The kernel's file clock ticks coarsely; a real edit comes later than this test's rewrite.
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert gguf_module.cache_entry(str(path)) != before
    assert before.parent == gguf_module.cache_dir()


def test_copies_of_one_gguf_share_a_cache_entry(tiny_model_factory, tmp_path, private_cache):
    """A fresh virtual environment holds a new copy of the embedded GGUF: it must not add a new
    entry (about 1 GB for SmolLM2) to the cache each time. A touched file keeps its entry too."""
    path = write_tiny_gguf(tiny_model_factory("qwen3"), tmp_path / "qwen3.gguf")
    entry = gguf_module.cache_entry(str(path))
    (tmp_path / "venv2").mkdir()
    copy = shutil.copy(path, tmp_path / "venv2" / "qwen3.gguf")
    assert gguf_module.cache_entry(str(copy)) == entry
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert gguf_module.cache_entry(str(path)) == entry


def test_the_file_is_hashed_once_per_path_size_and_mtime(tiny_model_factory, tmp_path, private_cache):
    path = write_tiny_gguf(tiny_model_factory("qwen3"), tmp_path / "qwen3.gguf")
    entry = gguf_module.cache_entry(str(path))
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF                      # same size, and the mtime is put back below
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    gguf_module._content_digest.cache_clear()          # a new process: only the note on disk is left
    assert gguf_module.cache_entry(str(path)) == entry, "the file was hashed again"
    assert len(list((gguf_module.cache_dir() / "by-path").iterdir())) == 1


# ---- the embedded SmolLM2-135M-Instruct GGUF against transformers on the same file -------------------

SMOLLM2_PROMPTS = ["The capital of France is", "def fibonacci(n):"]
NUM_STEPS = 24


@pytest.fixture(scope="module")
def smollm2():
    """(ours, transformers', our tokenizer), both models float32 from the embedded GGUF."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    path = Path(resolve_model(None))
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    theirs.generation_config.eos_token_id = None   # all NUM_STEPS steps, past <|im_end|> if need be
    ours, _ = load_model(str(path))
    return ours, theirs, Tokenizer.load(str(path))


def smollm2_prompts(tokenizer: Tokenizer) -> list[list[int]]:
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Name a color."}])
    return [tokenizer.encode(p) for p in SMOLLM2_PROMPTS] + [chat]


@pytest.mark.slow
def test_smollm2_gguf_follows_transformers_greedy_continuation(smollm2):
    ours, theirs, tokenizer = smollm2
    for prompt in smollm2_prompts(tokenizer):
        with torch.no_grad():
            generated = theirs.generate(torch.tensor([prompt]), max_new_tokens=NUM_STEPS, do_sample=False,
                                        pad_token_id=0)[0].tolist()
            expected = theirs(torch.tensor([generated])).logits[0]          # teacher-forced, every position
        continuation = generated[len(prompt):]
        # While our greedy choice equals theirs, free-running and teacher-forced decoding coincide:
        # one pass checks the logits at every position and the greedy tokens.
        sequence = PagedSequence(ours, block_size=16)
        logits = sequence.step(prompt)
        assert_logits_close(logits, expected[:len(prompt)])
        for i, token in enumerate(continuation):
            assert int(logits[-1].argmax()) == token, f"greedy token {i} differs"
            if i + 1 < len(continuation):
                logits = sequence.step([token])
                assert_logits_close(logits[0], expected[len(prompt) + i])


def test_smollm2_tokenizer_adds_no_bos_and_stops_on_im_end():
    tokenizer = Tokenizer.load(None)
    ids = tokenizer.encode("Hello world")
    assert tokenizer.decode(ids) == "Hello world"
    assert tokenizer.bos_token_id not in ids
    assert tokenizer.decode(tokenizer.eos_token_ids, skip_special_tokens=False) == "<|im_end|>"
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    text = tokenizer.decode(chat, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\nHi<|im_end|>\n"
                                                                     "<|im_start|>assistant\n")
    detokenizer = IncrementalDetokenizer(tokenizer, chat)
    text = "Grüße, 東京! 🎉"
    pieces = [detokenizer.add_tokens([t]) for t in tokenizer.encode(text)]
    assert "".join(pieces) == detokenizer.text == text
    assert all("\ufffd" not in piece for piece in pieces)
