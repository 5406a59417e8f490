"""Helpers every weight format shares, below the loader that picks a format.

`loader.py` chooses a format and builds the model; `gguf.py`, `llama2c.py` and
`dummy.py` each read one format. They all need these two helpers, which live
here so that the format readers depend on nothing above them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from nanovllm.model.errors import ModelLoadError


def interleaved_to_rotate_half(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder the q or k rows of each head from interleaved-pair RoPE to rotate-half RoPE.

    Interleaved RoPE (llama2.c, llama.cpp's `llama`, Meta's original code)
    rotates the output pairs (2i, 2i+1) of a head by angle pos * theta^(-2i/D);
    ours rotates (i, i + D/2) by the same angle. Moving row 2i to i and row
    2i+1 to i + D/2 makes our model compute the same q.k scores.
    weight: [num_heads * D, ...] -> the same shape.
    """
    head_dim = weight.shape[0] // num_heads
    return (weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape).contiguous())


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or ModelLoadError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e}); the file is damaged") from None
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot be read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data
