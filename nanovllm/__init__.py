"""nano-vllm: a small, fast, readable LLM inference and serving engine.

    from nanovllm import LLM, SamplingParams

The names below are imported on first use, so `import nanovllm.cli` (and
`nano-vllm --help`) does not pay for importing torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "nanovllm.llm",
    "EngineConfig": "nanovllm.config",
    "SamplingParams": "nanovllm.sampling_params",
    "RequestOutput": "nanovllm.outputs",
    "CompletionOutput": "nanovllm.outputs",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from nanovllm.config import EngineConfig
    from nanovllm.llm import LLM
    from nanovllm.outputs import CompletionOutput, RequestOutput
    from nanovllm.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nanovllm' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
