"""Command-line flags for EngineConfig, shared by `nano-vllm run`, `serve` and `bench`.

Every EngineConfig field becomes `--field-name` (booleans that default to True
get a `--no-...` switch; those that default to None, "the engine decides", get
both). A subcommand may leave some out (`skip=`) when it spells them its own
way, e.g. `run --kv paged|naive` for kv_policy.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from nanovllm.config import DEVICES, DTYPES, KV_POLICIES, QUANTIZED_DTYPES, EngineConfig

_HELP = {
    "tokenizer": "tokenizer path (default: the model's own; llama2.c needs tokenizer.bin)",
    "load_format": "auto | safetensors | gguf | llama2c | dummy (random weights)",
    "dtype": ("auto (cpu: int4 for the embedded model, else float32; cuda: bfloat16) | "
              + " | ".join([*DTYPES, *QUANTIZED_DTYPES]) + " (int8, int4: cpu weight formats)"),
    "device": " | ".join(DEVICES),
    "block_size": "token slots per KV-cache block",
    "max_num_seqs": "most sequences running at once",
    "max_num_batched_tokens": "token budget of one step (prefill chunks + decodes)",
    "max_model_len": "longest prompt + output accepted",
    "num_kv_blocks": "exact KV pool size in blocks (overrides memory-based sizing)",
    "kv_cache_memory": "bytes for the KV pool on the CPU",
    "gpu_memory_utilization": "fraction of the GPU the engine may fill",
    "enable_prefix_caching": "share KV blocks of identical prompt prefixes",
    "kv_policy": " | ".join(KV_POLICIES),
    "kv_cache_dtype": ("auto (the model's dtype) | fp8: K and V stored as float8 e4m3 with a scale per layer, "
                       "twice the tokens in the same memory | float16, float32: CPU caches"),
    "enforce_eager": "never capture CUDA graphs",
    "seed": "seed for requests that bring none",
    "tensor_parallel_size": "split the model over this many processes (GPUs, or CPU processes over gloo)",
    "all_reduce": ("auto: torch.distributed (NCCL on cuda, gloo on cpu) | peer: with several CUDA GPUs of one "
                   "host, the sums of up to 2 MiB in one Triton kernel that reads the other GPUs' memory"),
    "quantization": ("fp8 | w4a16 | gguf-q8_0 | gguf-q4_k: quantize a float checkpoint's linear layers as it "
                     "loads (GPU kernels; quantized checkpoints, compressed-tensors, GPTQ, AWQ, load quantized "
                     "without it); gguf | none: keep a GGUF's Q4_0..Q8_0, Q2_K..Q6_K and IQ4 blocks quantized "
                     "(default on cuda) or dequantize them (default on cpu)"),
    "async_scheduling": "schedule a step while the GPU runs the one before (default: on with one CUDA GPU)",
    "skip_tokenizer_init": "load no tokenizer: prompts are token ids, outputs token ids with empty text",
    "batch_invariant": ("a request's tokens and log-probabilities do not depend on what it is batched with "
                        "(GPU: fixed-tile kernels, slower; CPU: int4 and float32 are invariant already)"),
}


def add_engine_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ("model",)) -> None:
    group = parser.add_argument_group("engine")
    for field in dataclasses.fields(EngineConfig):
        if field.name in skip or field.name == "model":
            continue
        flag = "--" + field.name.replace("_", "-")
        if field.default is True:
            group.add_argument("--no-" + field.name.replace("_", "-"), dest=field.name, action="store_false",
                               default=True, help="do not " + _HELP.get(field.name, ""))
        elif field.type == "bool | None":   # None: the engine decides; --flag / --no-flag decide
            group.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None,
                               help=_HELP.get(field.name))
        elif field.default is False:
            group.add_argument(flag, dest=field.name, action="store_true", default=False,
                               help=_HELP.get(field.name))
        else:
            kind = {"int": int, "float": float}.get(str(field.type).split(" |")[0], str)
            group.add_argument(flag, dest=field.name, type=kind, default=field.default,
                               help=_HELP.get(field.name))


def engine_config_from_args(args: argparse.Namespace, **overrides: Any) -> EngineConfig:
    """EngineConfig from the parsed flags present in `args`, then `overrides`."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig) if hasattr(args, f.name)}
    values.update(overrides)
    return EngineConfig(**values)
