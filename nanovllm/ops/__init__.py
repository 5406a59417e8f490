"""The kernels. Each op is a plain-torch reference (the CPU backend and the
oracle in tests) and, where it pays, a Triton kernel with the same signature
in a sibling module (`attention_triton.py` beside `attention.py`, ...).
The public function of each module picks one by the device of its inputs:
CUDA tensors go to Triton when it imports; float32 CPU tensors go to a kernel
compiled by numba where one exists (`attention_numba.py`, which also reads a
float16 KV cache) and numba imports; everything else to torch. The Triton and numba modules are imported on first
use, so the CPU backend never loads Triton.
"""
from __future__ import annotations

import functools
import os
import platform

import torch

# The Triton kernels are written and timed with fused multiply-adds (the W4A16 GEMVs' products are one
# FFMA a weight). Triton fuses by default up to 3.9 and from 3.10 only when asked: ask, unless the
# environment has chosen already.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(x: torch.Tensor) -> bool:
    """True when x lives on a CUDA device and the Triton kernels can run there."""
    return x.is_cuda and _triton_importable()


@functools.cache
def _numba_importable() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def int4_numba_supported() -> bool:
    """Whether the numba int4 matmul (quant_numba.py) can run here: numba imports and the CPU is
    x86-64 with AVX-512 VNNI, whose `vpdpbusd` the kernel is written with."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not _numba_importable():
        return False
    import llvmlite.binding as llvm
    features = llvm.get_host_cpu_features()
    return bool(features.get("avx512vnni") and features.get("avx512bw"))


NUMBA_CACHE_DTYPES = (torch.float32, torch.float16)   # the KV caches attention_numba.py reads and writes


def use_numba(*tensors: torch.Tensor) -> bool:
    """True when every tensor is float32 on the CPU and numba imports: the CPU kernels it compiles
    take float32 numpy views of torch's tensors."""
    return all(x.device.type == "cpu" and x.dtype == torch.float32 for x in tensors) and _numba_importable()


@functools.cache
def sm_count(device: torch.device) -> int:
    """The number of multiprocessors of a CUDA device: the kernels size their grids and splits by it."""
    return torch.cuda.get_device_properties(device).multi_processor_count


# Programmatic dependent launch (Hopper and later): the FP8 and W4A16 GEMVs of a one-sequence decode
# step are launched while the kernel before them still runs, load their first weight step (which no
# kernel writes), and only then wait (`gdc_wait`) for that kernel's outputs; the kernels between GEMVs
# (the norms, SiLU-and-mul, the attention and its merge, the sum of partials) let the kernel after them
# launch from their first instruction (`gdc_launch_dependents`). Figures: docs/reference/gpu-kernels.md.
PDL = True


@functools.cache
def _pdl_capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


# The kernels between the GEMVs of the kinds in PDL_BETWEEN are launched early as well: each lets the
# kernel after it launch from its first instruction, loads what no kernel of the step writes (a norm's
# weight), and waits (`gdc_wait`) before it reads anything the kernels before it wrote, and before it
# writes anything, so that its launch and its first instructions overlap the end of the kernel before.
# The kinds (PDL_KINDS): "norm", "partials" (the sum of a split product's partials), "merge" (of a split
# attention's splits), "attention", "silu". The first two pay at batch 1 on an NVIDIA H100; the merge
# launched early made Llama-3.1-8B bf16 slower, the attention Llama-3.1-8B w4a16, SiLU-and-mul
# Llama-3.2-1B w4a16 (figures: docs/reference/gpu-kernels.md).
PDL_KINDS = frozenset({"norm", "partials", "merge", "attention", "silu"})
PDL_BETWEEN = frozenset({"norm", "partials"})


def use_pdl(x: torch.Tensor) -> bool:
    """Whether kernels on x's device take part in programmatic dependent launch: PDL is on and the
    device is a CUDA GPU of compute capability 9 or later (the interpreter's CPU tensors never)."""
    return PDL and x.is_cuda and _pdl_capable(x.device.index if x.device.index is not None
                                              else torch.cuda.current_device())


def pdl_between(x: torch.Tensor, kind: str) -> dict:
    """The launch options of a kernel of this kind between GEMVs: PDL (it lets the kernel after it launch
    at once), and where PDL_BETWEEN holds the kind, WAIT with launch_pdl (it is launched early itself and
    waits in the kernel); none where use_pdl(x) is False."""
    assert kind in PDL_KINDS, kind
    if not use_pdl(x):
        return {}
    return {"PDL": True, "WAIT": True, "launch_pdl": True} if kind in PDL_BETWEEN else {"PDL": True}
