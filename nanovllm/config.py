"""EngineConfig: every knob of the engine in one dataclass, checked when it is made.

The numbers that shape serving are few:

- `block_size`: token slots per KV-cache block; the unit the block manager hands out.
- `max_num_batched_tokens`: the token budget of one step. Prefill chunks and
  decodes (a decode is a chunk of one token) share it, so one long prompt
  cannot stall everyone else's decoding: it is cut into chunks.
- `max_num_seqs`: how many sequences may be running (hold KV blocks) at once.
- `max_model_len`: the longest sequence (prompt + output) the engine accepts.
- the KV pool: `num_kv_blocks` blocks exactly, or as many as fit in
  `kv_cache_memory` bytes (CPU) / `gpu_memory_utilization` of the card (CUDA).
- `kv_cache_dtype`: what the KV cache stores. "auto" is the model's dtype (float16
  for the CPU's int4 and int8 weights, whose activations are float32); "fp8"
  stores K and V as float8 e4m3 with a scale per layer (1.0, as vLLM uses when the
  checkpoint brings none), one byte an element: twice the tokens of bfloat16 in
  the same memory, at the cost of 3 mantissa bits. On the CPU, "float16" halves a
  float32 cache (llama.cpp's default cache type); "float32" asks for float32.
- `kv_policy`: "paged" hands out blocks as sequences grow; "naive" reserves
  `max_model_len` slots per sequence up front, as servers did before paging,
  so the visualizer can show the memory it wastes.
- `tensor_parallel_size`: how many processes (one per GPU) split each layer's
  weights and the KV cache; the engine starts the others itself, or they come
  from `torchrun` (see docs/reference/tensor-parallel.md).

Defaults that depend on the device ("auto" values and the `None` sizes) are
resolved in `__post_init__`; `max_model_len` is resolved against the model by
`fit_model` once the model's config is known.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nanovllm.model.config import ModelConfig
from nanovllm.model.embedded import is_embedded_model


def cache_dir() -> Path:
    """Where nano-vllm keeps what it makes once and reuses (dequantized GGUF weights, compiled CPU
    kernels): $NANO_VLLM_CACHE, else ~/.cache/nano-vllm."""
    return Path(os.environ.get("NANO_VLLM_CACHE") or Path.home() / ".cache" / "nano-vllm")


# Weight formats a float checkpoint can be quantized into as it loads (nanovllm/model/quantization/).
ONLINE_METHODS = ("fp8", "w4a16", "gguf-q8_0", "gguf-q4_k")
# For a GGUF file: "gguf" keeps its quantized blocks (Q4_0 ... Q8_0, Q2_K ... Q6_K, IQ4) quantized
# (the default on CUDA), "none" dequantizes them to the model's dtype (the default on the CPU).
GGUF_CHOICES = ("gguf", "none")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# CPU weight-only formats (nanovllm/ops/quant.py) -> the dtype of activations and the KV cache.
QUANTIZED_DTYPES = {"int8": torch.float32, "int4": torch.float32}
# dtype="auto" on the CPU for the embedded SmolLM2-135M, chosen by measurement (docs/reference/cpu-fast-path.md,
# 2-core Xeon with AVX-512/AMX, loaded): int4 decodes 2.2x float32's tokens/s at batch 1 and is the one
# reduced format inside the quality guard (top-1 agreement with float32 98.8% through its packed kernel, which
# it uses for every step so that greedy output does not depend on the batch, docs/reference/cpu-kernels.md;
# int8 per channel 96.1%, bfloat16 activations 95.3%). Other models stay float32 until
# measured: their exact greedy agreement with transformers is what their tests check.
CPU_AUTO_DTYPE_EMBEDDED = "int4"
DEVICES = ("auto", "cpu", "cuda")
KV_POLICIES = ("paged", "naive")
# How tensor-parallel ranks sum their partial outputs. "auto" is torch.distributed's all_reduce until the
# peer kernel has been measured against NCCL on GPUs (docs/reference/tensor-parallel.md).
ALL_REDUCES = ("auto", "peer")
# kv_cache_dtype -> what the cache stores (None: the model's dtype). vLLM's spellings, and two float
# caches for the CPU, whose activations are float32 (the numba attention reads float32 and float16).
KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
                   "float16": torch.float16, "float32": torch.float32}
CPU_KV_CACHE_DTYPES = ("float16", "float32")
# kv_cache_dtype="auto" with the CPU's int formats: float16, as llama.cpp's cache. A batch-16 decode step
# reads the cache once per layer, and float32 made it a third of the step's bytes; float16 halves them
# within the quality guard (top-1 agreement with float32 99.61% either way, log-likelihood 0.17% from
# float32's; docs/reference/cpu-kernels.md). Float models keep their dtype: their tests hold them to
# transformers within 1e-6.
QUANTIZED_KV_CACHE_DTYPE = torch.float16
DEFAULT_MAX_MODEL_LEN = 4096

# Device-dependent defaults: (cpu, cuda).
_DEFAULT_MAX_NUM_SEQS = (64, 256)
_DEFAULT_MAX_NUM_BATCHED_TOKENS = (2048, 8192)


class EngineArgumentError(TypeError, ValueError):
    """An engine argument that does not exist. Both a TypeError (Python's usual
    error for an unknown keyword) and a ValueError (the engine's error for bad input)."""


@dataclass
class EngineConfig:
    model: str | None = None              # HF directory, .gguf, llama2.c .bin; None = the embedded default
    tokenizer: str | None = None          # None: the model's own tokenizer
    load_format: str = "auto"             # "auto" | "safetensors" | "gguf" | "llama2c" | "dummy"
    dtype: str = "auto"                   # "auto" (cpu: int4 for the embedded model, else float32; cuda: bfloat16) | "float32" | "bfloat16" | "float16" | "int8" | "int4" (cpu)
    device: str = "auto"                  # "auto" (cuda if available) | "cpu" | "cuda"
    block_size: int = 16
    max_num_seqs: int | None = None       # None: 64 on cpu, 256 on cuda
    max_num_batched_tokens: int | None = None   # None: 2048 on cpu, 8192 on cuda
    max_model_len: int | None = None      # None: min(the model's max_position_embeddings, 4096)
    num_kv_blocks: int | None = None      # an exact KV pool size, overriding the memory-based sizing
    kv_cache_memory: int | None = None    # bytes for the KV pool; None: up to 1 GiB on cpu, see gpu_memory_utilization on cuda
    gpu_memory_utilization: float = 0.9   # the fraction of the card the engine may fill (weights + KV + activations)
    enable_prefix_caching: bool = True
    kv_policy: str = "paged"              # "paged" | "naive"
    kv_cache_dtype: str = "auto"          # "auto" (the model's dtype; float16 for int4/int8) | "fp8" (float8
                                          # e4m3, a scale per layer) | "float16" | "float32" (cpu)
    enforce_eager: bool = False           # cuda: never capture CUDA graphs
    seed: int = 0                         # seeds the per-request seeds of requests that give none
    tensor_parallel_size: int = 1         # ranks that split the model (gloo on cpu, NCCL on cuda)
    all_reduce: str = "auto"              # "auto" (torch.distributed: NCCL on cuda, gloo on cpu) | "peer" (cuda:
                                          # one Triton kernel reads the other GPUs' memory, ops/all_reduce_triton.py)
    async_scheduling: bool | None = None  # schedule step n+1 while the GPU runs step n; None: on for one CUDA GPU
    quantization: str | None = None       # "fp8" | "w4a16" | "gguf-q8_0" | "gguf-q4_k": quantize a float
                                          # checkpoint's linear layers at load; "gguf" | "none": keep a GGUF's
                                          # blocks quantized (None: on cuda) or not
    skip_tokenizer_init: bool = False     # no tokenizer: prompts are token ids, outputs token ids with text ""
    batch_invariant: bool = False         # a request's tokens and logprobs do not depend on its batch (cuda: fixed-
                                          # tile kernels, at a cost; cpu: int4 and float32 are so already)

    def __new__(cls, *args: Any, **kwargs: Any) -> "EngineConfig":
        # Python's own TypeError for an unknown keyword does not list the valid ones; say them.
        unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            valid = ", ".join(f.name for f in dataclasses.fields(cls))
            raise EngineArgumentError(f"unknown engine argument {', '.join(map(repr, unknown))}; "
                                      f"valid engine arguments are: {valid}")
        return super().__new__(cls)

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch sees no CUDA GPU; use device='cpu' (or 'auto')")
        if self.dtype != "auto" and self.dtype not in DTYPES and self.dtype not in QUANTIZED_DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {', '.join([*DTYPES, *QUANTIZED_DTYPES])}, "
                             f"got {self.dtype!r}")
        if self.dtype in QUANTIZED_DTYPES and (self.device != "cpu" or self.tensor_parallel_size != 1):
            raise ValueError(f"dtype={self.dtype!r} is a CPU format for one process; use it with device='cpu' "
                             "and tensor_parallel_size=1, or pick 'bfloat16'")
        if self.dtype == "auto":
            embedded = (self.tensor_parallel_size == 1 and self.quantization in (None, "none")
                        and is_embedded_model(self.model))
            cpu_auto = CPU_AUTO_DTYPE_EMBEDDED if embedded else "float32"
            self.dtype = "bfloat16" if self.device == "cuda" else cpu_auto
        on_cuda = self.device == "cuda"
        if self.max_num_seqs is None:
            self.max_num_seqs = _DEFAULT_MAX_NUM_SEQS[on_cuda]
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = _DEFAULT_MAX_NUM_BATCHED_TOKENS[on_cuda]
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
                     "num_kv_blocks", "kv_cache_memory", "tensor_parallel_size"):
            value = getattr(self, name)
            if value is None and name in ("max_model_len", "num_kv_blocks", "kv_cache_memory"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.gpu_memory_utilization, (int, float)) or not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.kv_policy not in KV_POLICIES:
            raise ValueError(f"kv_policy must be one of {', '.join(KV_POLICIES)}, got {self.kv_policy!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if (self.kv_cache_dtype in CPU_KV_CACHE_DTYPES and on_cuda
                and self.kv_cache_torch_dtype != self.torch_dtype):
            raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r} is a CPU cache format; on the GPU the cache "
                             f"stores the model's dtype ({self.dtype}) or fp8: pass 'auto' or 'fp8'")
        if self.all_reduce not in ALL_REDUCES:
            raise ValueError(f"all_reduce must be one of {', '.join(ALL_REDUCES)}, got {self.all_reduce!r}")
        if self.all_reduce == "peer" and not on_cuda:
            raise ValueError("all_reduce='peer' reads the other GPUs' memory, so it needs device='cuda'; on the CPU "
                             "the ranks sum through gloo: pass all_reduce='auto'")
        if self.async_scheduling is None:   # where it pays (engine.py): one GPU; a CPU step has nothing to overlap
            # (several GPUs: not measured yet, so off unless asked for)
            self.async_scheduling = on_cuda and self.tensor_parallel_size == 1
        for name in ("enable_prefix_caching", "enforce_eager", "async_scheduling"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.quantization not in (None, "none") and (self.quantization not in (*ONLINE_METHODS, *GGUF_CHOICES)
                                                        or self.dtype in QUANTIZED_DTYPES):
            raise ValueError(f"quantization must be one of {', '.join((*ONLINE_METHODS, *GGUF_CHOICES))} with a float "
                             f"dtype, got {self.quantization!r} with dtype={self.dtype!r}; quantized checkpoints "
                             "need none")
        if not isinstance(self.batch_invariant, bool):
            raise ValueError(f"batch_invariant must be True or False, got {self.batch_invariant!r}")
        if self.batch_invariant:
            if self.device == "cuda" and self.quantization is None:
                self.quantization = "none"     # a GGUF's blocks dequantized: the invariant kernels are float
            self._check_batch_invariant()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    def _check_batch_invariant(self) -> None:
        """Refuse the combinations that have no batch-invariant kernels, rather than run them variant."""
        if self.device == "cpu" and self.dtype not in ("int4", "float32"):
            raise ValueError(f"batch_invariant on the CPU needs dtype 'int4' or 'float32' (their kernels give a row "
                             f"the same result in any batch); {self.dtype!r} has no such kernels")
        if self.device == "cuda" and self.quantization != "none":
            raise ValueError("batch_invariant has GPU kernels for float weights only; drop quantization "
                             f"({self.quantization!r}) or batch_invariant")
        if self.tensor_parallel_size > 1:
            raise ValueError("batch_invariant runs with tensor_parallel_size=1 only")
        # The numba attention reads float32 and float16 caches. A float16 cache rounds what it stores, so a
        # last-bit difference in k or v can become a float16 step: only int4's exact kernels keep it invariant.
        float16_ok = self.dtype == "int4" and self.kv_cache_torch_dtype == torch.float16
        if self.device == "cpu" and self.kv_cache_torch_dtype != torch.float32 and not float16_ok:
            raise ValueError(f"batch_invariant on the CPU needs a float32 KV cache (int4 weights: float32 or "
                             f"float16); drop kv_cache_dtype={self.kv_cache_dtype!r} or batch_invariant")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype of activations and the KV cache (bfloat16 for the int formats)."""
        return DTYPES.get(self.dtype) or QUANTIZED_DTYPES[self.dtype]

    @property
    def kv_cache_torch_dtype(self) -> torch.dtype:
        """The dtype the KV cache stores: the one kv_cache_dtype names, else (auto) torch_dtype, or float16
        for the CPU's int formats."""
        named = KV_CACHE_DTYPES[self.kv_cache_dtype]
        if named is None and self.dtype in QUANTIZED_DTYPES:
            return QUANTIZED_KV_CACHE_DTYPE
        return named or self.torch_dtype

    @property
    def kv_cache_dtype_name(self) -> str:
        """What the KV cache stores, as torch names it ("bfloat16", "float8_e4m3fn"): for the visualizer and /metrics."""
        return str(self.kv_cache_torch_dtype).removeprefix("torch.")

    def fit_model(self, model_config: ModelConfig) -> "EngineConfig":
        """A copy with max_model_len resolved against the model; raises if it asks for more than the model has."""
        limit = model_config.max_position_embeddings
        window = model_config.sliding_window
        if self.max_model_len is None:
            return dataclasses.replace(self, max_model_len=min(limit, window or limit, DEFAULT_MAX_MODEL_LEN))
        if self.max_model_len > limit:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's max_position_embeddings "
                             f"({limit}); pass max_model_len={limit} or less")
        if window is not None and self.max_model_len > window:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's sliding_window ({window}): "
                             "nano-vllm has no sliding-window attention yet, so past that many tokens it would "
                             f"attend where the model never did; pass max_model_len={window} or less")
        return self

