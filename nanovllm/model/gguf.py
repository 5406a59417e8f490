"""GGUF: llama.cpp's one-file format, read into our float model.

A GGUF file is a header of typed key/values (`general.architecture`,
`llama.block_count`, `tokenizer.ggml.tokens`, `tokenizer.chat_template`, ...)
followed by tensors. Tensor names are llama.cpp's (`blk.3.attn_q.weight`), and
most tensors are quantized in blocks: Q4_1 stores 32 weights as one float16
scale d, one float16 minimum m and 32 4-bit integers q, meaning d * q + m. The
`gguf` package dequantizes every type to float32 numpy arrays.

Two things differ from a HuggingFace checkpoint besides the names:
- llama.cpp's RoPE for `llama` models rotates interleaved pairs (x[2i],
  x[2i+1]), ours rotates halves (x[i], x[i + D/2]). Its converter therefore
  permuted the rows of W_q and W_k within each head;
  `interleaved_to_rotate_half` puts them back. Qwen2/Qwen3 use llama.cpp's
  "NEOX" (rotate-half) RoPE and are stored unpermuted.
- A tied LM head is simply absent (`output.weight` missing).

Parsing the header (its vocabulary arrays) and dequantizing take seconds, so the
first load writes the float weights (safetensors), the config (json) and the
tokenizer (tokenizer.json, built by transformers) to a cache directory named
by a hash of the file's bytes; later loads memory-map them. Deleting the cache
directory is always safe: the next load writes it again. A load that keeps the
legacy and k-quant blocks quantized (on CUDA by default, model/quantization/gguf.py)
writes no float weights: it reads the file tensor by tensor (`gguf_tensors`).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from nanovllm.config import cache_dir
from nanovllm.model.config import UNSUPPORTED_GGUF_KEYS, ModelConfig, ModelConfigError, refuse_unsupported
from nanovllm.model.errors import ModelLoadError
from nanovllm.model.weight_utils import interleaved_to_rotate_half

GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")   # general.architecture values we run
CACHE_VERSION = 1                                   # bump when what we write to the cache changes

# llama.cpp tensor name (per layer: the part after `blk.N.`) -> HuggingFace name
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


# ---- the cache ---------------------------------------------------------------------------------

def cache_entry(path: str) -> Path:
    """The cache folder of one GGUF file, named by its content.

    Two copies of one file (the same package in two virtual environments) share a folder,
    and a changed file gets a new one. The file is hashed once per path, size and mtime:
    the digest is kept in a small note under `by-path/`, so later loads skip the hash.
    """
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return cache_dir() / f"{resolved.stem}-{_content_digest(str(resolved), stat.st_size, stat.st_mtime_ns)}"


@functools.lru_cache(maxsize=8)
def _content_digest(path: str, size: int, mtime_ns: int) -> str:
    """First 16 hex digits of sha256(CACHE_VERSION, file bytes), remembered per (path, size, mtime)."""
    note_key = hashlib.sha256(f"{path}:{size}:{mtime_ns}".encode()).hexdigest()[:16]
    note = cache_dir() / "by-path" / note_key
    try:
        return note.read_text().strip()
    except OSError:
        pass
    digest = hashlib.sha256(f"{CACHE_VERSION}:".encode())
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    value = digest.hexdigest()[:16]
    _publish(note.parent, note.name, lambda tmp: tmp.write_text(value))
    return value


def _publish(entry: Path, name: str, write) -> Path | None:
    """Write `entry/name` atomically with write(tmp_path); None (and a warning) if the cache is not writable."""
    target = entry / name
    try:
        entry.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=entry, prefix=f".{name}."))
        write(tmp / name)
        os.replace(tmp / name, target)
        shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        warnings.warn(f"cannot write the GGUF cache {target} ({e}); the next load will be slow again; "
                      "set NANO_VLLM_CACHE to a writable folder")
        return None
    return target


# ---- reading the file ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _reader(path: str, size: int, mtime_ns: int):
    """GGUFReader of `path` (parsed once per process; size and mtime are part of the key)."""
    from gguf import GGUFReader

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelLoadError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")
    try:
        return GGUFReader(path)
    except Exception as e:   # the reader fails in numpy when a file ends early
        raise ModelLoadError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); the file is "
                             "truncated or damaged, download it again") from None


def open_gguf(path: str):
    stat = os.stat(path)
    return _reader(str(path), stat.st_size, stat.st_mtime_ns)


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


# ---- config ------------------------------------------------------------------------------------

def gguf_config(path: str) -> ModelConfig:
    """ModelConfig from the GGUF metadata (cached as json beside the dequantized weights)."""
    cached = cache_entry(path) / "config.json"
    if cached.is_file():
        return ModelConfig(**json.loads(cached.read_text()))
    config = _config_from_metadata(path, open_gguf(path))
    _publish(cached.parent, cached.name, lambda tmp: tmp.write_text(json.dumps(dataclasses.asdict(config))))
    return config


def _config_from_metadata(path: str, reader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ModelConfigError(f"{path}: unsupported GGUF architecture {arch!r}; nano-vllm runs GGUF "
                               f"architectures {', '.join(GGUF_ARCHITECTURES)}")
    tensors = {t.name: t for t in reader.tensors}

    def key(name: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{name}", default)

    refuse_unsupported(path, {f"{arch}.{name}": key(name) for name in UNSUPPORTED_GGUF_KEYS},
                       {f"{arch}.{name}": neutral for name, neutral in UNSUPPORTED_GGUF_KEYS.items()})

    try:
        num_heads = int(key("attention.head_count"))
        hidden = int(key("embedding_length"))
        head_dim = int(key("attention.key_length", hidden // num_heads))
        embedding = tensors["token_embd.weight"]
        vocab = int(key("vocab_size", int(embedding.shape[-1])))
        rope_dim = int(key("rope.dimension_count", head_dim))
        scaling = None
        if key("rope.scaling.type", "none") not in ("none", None):
            scaling = {"rope_type": key("rope.scaling.type"), "factor": float(key("rope.scaling.factor", 1.0))}
        if "rope_freqs.weight" in tensors:
            scaling = _llama3_scaling(path, tensors["rope_freqs.weight"], head_dim,
                                      float(key("rope.freq_base", 10000.0)))
        eos = _field(reader, "tokenizer.ggml.eos_token_id")
        config = ModelConfig(
            architecture=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=int(key("feed_forward_length")),
            num_hidden_layers=int(key("block_count")),
            num_attention_heads=num_heads,
            num_key_value_heads=int(key("attention.head_count_kv", num_heads)),
            head_dim=head_dim,
            max_position_embeddings=int(key("context_length", 2048)),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            tie_word_embeddings="output.weight" not in tensors,
            attention_bias="blk.0.attn_q.bias" in tensors,
            qk_norm=arch == "qwen3",
            bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
            eos_token_ids=[] if eos is None else [int(eos)],
            torch_dtype="float32",
            sliding_window=None if key("attention.sliding_window") is None else int(key("attention.sliding_window")),
        )
    except KeyError as e:
        raise ModelConfigError(f"{path}: missing metadata or tensor {e.args[0]!r}; the GGUF is incomplete") from None
    except TypeError:
        raise ModelConfigError(f"{path}: missing required {arch}.* metadata (block_count, embedding_length, "
                               "feed_forward_length, attention.head_count); the GGUF is incomplete") from None
    if rope_dim != head_dim:
        raise ModelConfigError(f"{path}: RoPE covers {rope_dim} of {head_dim} head dimensions; partial rotary "
                               "embeddings are not supported")
    config.validate(str(path))
    return config


def _llama3_scaling(path: str, rope_freqs, head_dim: int, theta: float) -> dict[str, Any]:
    """Llama 3.1+ GGUFs store RoPE scaling as a tensor of per-frequency divisors (`rope_freqs`) instead
    of the four numbers HF configs carry. Every Llama 3.x uses low/high frequency factors 1 and 4 and an
    original context of 8192; only `factor` (the largest divisor) varies. Recover it, and check the
    whole tensor is what those numbers give."""
    from gguf import GGMLQuantizationType, quants

    from nanovllm.ops.rotary import rope_inv_freq

    divisors = quants.dequantize(rope_freqs.data, GGMLQuantizationType(rope_freqs.tensor_type)).reshape(-1)
    scaling = {"rope_type": "llama3", "factor": float(divisors.max()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    implied = (rope_inv_freq(head_dim, theta, None) / rope_inv_freq(head_dim, theta, scaling)).numpy()
    if divisors.shape != implied.shape or not np.allclose(divisors, implied, rtol=1e-4):
        raise ModelConfigError(f"{path}: its rope_freqs tensor is not Llama 3 RoPE scaling (low/high frequency "
                               "factors 1 and 4, original context 8192); load the HuggingFace directory of "
                               "this model instead")
    return scaling


# ---- weights -----------------------------------------------------------------------------------

def gguf_weights(path: str, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(HuggingFace name, float32 tensor) pairs, memory-mapped from the cache or dequantized (then cached)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import save_file

    cached = cache_entry(path) / "model.safetensors"
    if not cached.is_file():
        weights = dict(_dequantized(path, config))
        _publish(cached.parent, cached.name, lambda tmp: save_file(weights, str(tmp)))
        if not cached.is_file():
            yield from weights.items()
            return
        del weights
    try:
        with safe_open(cached, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    except SafetensorError as e:
        raise ModelLoadError(f"{path}: its cached weights {cached} are damaged ({e}); delete that folder "
                             "and load again") from None


def _dequantized(path: str, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    for hf_name, tensor in gguf_tensors(path):
        yield hf_name, rotate_half_rows(hf_name, dequantize_tensor(path, tensor), config)


def gguf_tensors(path: str) -> Iterator[tuple[str, Any]]:
    """(HuggingFace name, the reader's tensor) of every weight in the file, in its order (the
    reader's tensors are memory-mapped: nothing is read until a tensor's data is)."""
    for tensor in open_gguf(path).tensors:
        if tensor.name == "rope_freqs.weight":   # already in config.rope_scaling
            continue
        hf_name = _hf_name(tensor.name)
        if hf_name is None:
            raise ModelLoadError(f"{path}: unexpected tensor {tensor.name!r} for a Llama-family model")
        yield hf_name, tensor


def tensor_shape(tensor) -> tuple[int, ...]:
    """The torch shape of a reader's tensor: [out_features, in_features] for a weight (GGUF lists
    dims fastest-first)."""
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))


def dequantize_tensor(path: str, tensor) -> torch.Tensor:
    """One reader's tensor dequantized by the gguf package -> float32, in its torch shape."""
    from gguf import GGMLQuantizationType, quants

    try:
        array = quants.dequantize(tensor.data, GGMLQuantizationType(tensor.tensor_type))
        array = np.ascontiguousarray(array, dtype=np.float32).reshape(tensor_shape(tensor))
        if not array.flags.writeable:   # F32 tensors come back as views of the read-only file
            array = array.copy()
    except NotImplementedError:
        raise ModelLoadError(f"{path}: tensor {tensor.name!r} has quantization "
                             f"{GGMLQuantizationType(tensor.tensor_type).name}, which the gguf package "
                             "cannot dequantize") from None
    except ValueError as e:
        raise ModelLoadError(f"{path}: tensor {tensor.name!r} cannot be read ({e}); the file is truncated "
                             "or damaged") from None
    return torch.from_numpy(array)


def rotate_half_rows(hf_name: str, weight: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """A `llama` GGUF's q and k rows (weights, biases, or any tensor with a row per output) put back
    in rotate-half order; every other tensor as it is."""
    if config.architecture == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return interleaved_to_rotate_half(weight, config.num_attention_heads)
    if config.architecture == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return interleaved_to_rotate_half(weight, config.num_key_value_heads)
    return weight


def _hf_name(gguf_name: str) -> str | None:
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        return None
    layer, part, suffix = match.groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{suffix}"


# ---- tokenizer ---------------------------------------------------------------------------------

def gguf_tokenizer_dir(path: str) -> Path:
    """A folder with tokenizer.json etc. built from the GGUF metadata by transformers (cached)."""
    target = cache_entry(path) / "tokenizer"
    if (target / "tokenizer.json").is_file():
        return target
    from transformers import AutoTokenizer

    gguf_path = Path(path).resolve()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as e:   # transformers raises many kinds
        raise ModelLoadError(f"{path}: no tokenizer can be built from its metadata ({type(e).__name__}: {e})"
                             ) from None
    if not tokenizer.chat_template:
        tokenizer.chat_template = _field(open_gguf(path), "tokenizer.chat_template")
    saved = _publish(target.parent, target.name, lambda tmp: tokenizer.save_pretrained(tmp))
    if saved is not None:
        return saved
    scratch = Path(tempfile.mkdtemp(prefix="nano-vllm-tokenizer-"))
    tokenizer.save_pretrained(scratch)
    return scratch
