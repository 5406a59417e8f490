"""Every Triton kernel compiles for Hopper (sm_90), here on a machine without a GPU.

The interpreter tests (test_ops_triton.py) run a kernel's Python line by line, so some errors
only the compiler sees pass them: a variable that changes type inside a loop, a constexpr used
as a value, a layout it cannot lower. One such error once cost a whole GPU run
(docs/reference/gpu-kernels.md). triton.compile lowers a kernel to a cubin for a named target without a driver, so CI
compiles each kernel in the configurations the engine launches (bfloat16 at Llama-3.2-1B's
and Qwen3-0.6B's shapes).
"""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
tl = triton.language

from nanovllm.ops import (activation_triton, all_reduce_triton, attention_triton, quant_linear_triton,  # noqa: E402
                          rmsnorm_triton, rotary_triton, sampling_triton)

POINTER_TYPES = {   # pointer arguments that are not bfloat16 tensors
    "query_start_loc_ptr": "*i32", "seq_lens_ptr": "*i32", "block_tables_ptr": "*i32",
    "positions_ptr": "*i64", "slot_mapping_ptr": "*i64", "keys_ptr": "*i64", "token_ptr": "*i64",
    "out_ptr": "*fp32", "lse_ptr": "*fp32", "partial_ptr": "*fp32", "cos_sin_ptr": "*fp32",
    "temperature_ptr": "*fp32", "score_ptr": "*fp32", "logit_ptr": "*fp32", "max_ptr": "*fp32",
    "sum_ptr": "*fp32", "logprob_ptr": "*fp32",
}
FLOAT_ARGS = {"scale_log2", "eps", "k_scale", "v_scale"}
ALIGNED_SCALARS = ("K", "K_PER_SPLIT", "numel", "slot_offset")   # multiples of 16 at Llama's shapes
FP8_CACHE = {"k_cache_ptr": "*fp8e4nv", "v_cache_ptr": "*fp8e4nv"}   # kv_cache_dtype="fp8"


def compile_for_hopper(kernel, constexprs: dict, pointer_types: dict | None = None, aligned: bool = False,
                       **options):
    """triton.compile `kernel` with these constexprs for sm_90 -> the compiled kernel (its cubin).
    pointer_types: the types of arguments that are not bfloat16 pointers named `*_ptr` (a tuple of
    types for a tuple argument). aligned: the pointers, the strides, K, K_PER_SPLIT, `numel` and `slot_offset` are
    multiples of 16, as a launch at Llama's shapes specializes them. options: num_warps and num_stages
    as the engine launches the kernel (Triton's defaults otherwise)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    types = dict(POINTER_TYPES, **(pointer_types or {}))
    parameters = inspect.signature(kernel.fn).parameters
    params = list(parameters)
    constexprs = {**{name: p.default for name, p in parameters.items()          # constexprs left at their defaults
                     if p.default is not inspect.Parameter.empty}, **constexprs}
    signature = {}
    for name in params:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr") or name in types:
            signature[name] = types.get(name, "*bf16")
        else:
            signature[name] = "fp32" if name in FLOAT_ARGS else "i32"
    multiples_of_16 = {(index,): [["tt.divisibility", 16]] for index, name in enumerate(params)
                       if aligned and name not in constexprs
                       and (name.endswith("_ptr") or name.startswith("stride") or name in ALIGNED_SCALARS)}
    for index, name in enumerate(params):      # the pointers of a tuple argument
        if aligned and isinstance(signature[name], tuple):
            multiples_of_16.update({(index, element): [["tt.divisibility", 16]]
                                    for element in range(len(signature[name]))})
    source = ASTSource(fn=kernel, signature=signature, attrs=multiples_of_16,
                       constexprs={(params.index(name),): value for name, value in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def resource_usage(compiled, tmp_path) -> str:
    """cuobjdump's resource usage of a compiled kernel (registers, STACK and LOCAL bytes a thread)."""
    import subprocess
    from pathlib import Path

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        pytest.skip("this Triton ships no cuobjdump")
    cubin = tmp_path / "kernel.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    return subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True, text=True,
                          check=True).stdout


LLAMA = dict(GROUP=4, HEAD_DIM=64, HEAD_DIM_PAD=64)      # Llama-3.2-1B: 32 query heads on 8 KV heads
QWEN3 = dict(GROUP=2, HEAD_DIM=128, HEAD_DIM_PAD=128)    # Qwen3-0.6B: 16 on 8, per-head q/k norm
DECODE = dict(BLOCK_SIZE=16, BLOCK_Q=1, BLOCK_M=16, BLOCK_N=128, BLOCK_B=64, DECODE=True, IEEE=False, NUM_STAGES=2,
              HEADS_TOGETHER=8)     # 8 KV heads, launched side by side as the engine does (DECODE_HEADS_TOGETHER)


@pytest.mark.parametrize("kv", ["bf16", "fp8", "fp8, V keys-innermost"])
@pytest.mark.parametrize("model,rope,num_splits", [(LLAMA, True, 32), (LLAMA, False, 1), (QWEN3, True, 8)])
def test_decode_attention_compiles(model, rope, num_splits, kv):
    """An FP8 cache as a GPU reads it: V's codes converted by the asm (two e4m3 pairs a
    register) or, stored keys-innermost, by the compiler's cast as K's are, both to float16 for
    the tensor cores."""
    fp8_kv = kv != "bf16"
    kernel = compile_for_hopper(attention_triton._paged_attention_kernel,
                                dict(**model, **DECODE, NUM_SPLITS=num_splits, ROPE=rope,
                                     HAS_NORM=rope and model is QWEN3, FP8_KV=fp8_kv, CODES_ASM=fp8_kv,
                                     V_KEYS_INNER=kv.endswith("keys-innermost")),
                                FP8_CACHE if fp8_kv else None)
    assert kernel.asm["cubin"]
    assert ("cvt.rn.f16x2.e4m3x2" in kernel.asm["ptx"]) == fp8_kv
    assert ("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in kernel.asm["ptx"]) == fp8_kv
    compile_for_hopper(attention_triton._merge_splits_kernel,
                       dict(NUM_SPLITS=num_splits, SPLITS_PAD=num_splits, HEAD_DIM=model["HEAD_DIM"],
                            HEAD_DIM_PAD=model["HEAD_DIM_PAD"]), {"out_ptr": "*bf16"})


@pytest.mark.parametrize("kv", ["bf16", "fp8", "fp8, V keys-innermost"])
def test_prefill_attention_compiles(kv):
    fp8_kv = kv != "bf16"
    assert compile_for_hopper(attention_triton._paged_attention_kernel,
                              dict(**LLAMA, BLOCK_SIZE=16, BLOCK_Q=16, BLOCK_M=64, BLOCK_N=64, BLOCK_B=64,
                                   NUM_SPLITS=1, DECODE=False, ROPE=False, HAS_NORM=False, IEEE=False,
                                   NUM_STAGES=2, FP8_KV=fp8_kv, CODES_ASM=fp8_kv,
                                   V_KEYS_INNER=kv.endswith("keys-innermost")),
                              {"out_ptr": "*bf16", **(FP8_CACHE if fp8_kv else {})}).asm["cubin"]


ROWS_OUT = {"plain": {"out_ptr": "*bf16"}, "fp8": {"out_ptr": "*fp8e4nv", "scale_ptr": "*fp32"}}  # by the rows written
ROWS_FLAGS = {"plain": {}, "fp8": {"FP8_OUT": True}}


@pytest.mark.parametrize("rows", ["plain", "fp8"])
@pytest.mark.parametrize("num_partials", [1, 4])
def test_norm_kernels_compile(num_partials, rows):
    compile_for_hopper(rmsnorm_triton._rms_norm_kernel,
                       dict(HIDDEN=4096, BLOCK_H=4096, ROUND_TO=tl.bfloat16, **ROWS_FLAGS[rows]), ROWS_OUT[rows])
    compile_for_hopper(rmsnorm_triton._add_rms_norm_kernel,
                       dict(NUM_PARTIALS=num_partials, HIDDEN=4096, BLOCK_H=4096, ROUND_TO=tl.bfloat16,
                            **ROWS_FLAGS[rows]),
                       {"x_ptr": "*fp32" if num_partials > 1 else "*bf16", **ROWS_OUT[rows]})


def test_silu_and_mul_writing_fp8_rows_compiles_without_spills(tmp_path):
    """One program a row of Llama-3.1-8B's 14,336 features (BLOCK 16,384, 16 warps, as the engine
    launches it): the row's gate and up stay in registers for its amax."""
    kernel = compile_for_hopper(activation_triton._silu_and_mul_kernel,
                                dict(INTERMEDIATE=14336, BLOCK=16384, ROUND_TO=tl.bfloat16, FP8_OUT=True, PDL=True),
                                ROWS_OUT["fp8"],
                                aligned=True, num_warps=16)
    usage = resource_usage(kernel, tmp_path)
    assert " STACK:0 " in usage and " LOCAL:0 " in usage, usage


@pytest.mark.parametrize("wait", [False, True])
def test_kernels_between_gemvs_let_the_next_launch_early(wait):
    """With PDL the norms, SiLU-and-mul, the attention and its merge and the sum of partials let the next
    kernel launch from their first instruction; with WAIT (launched early themselves, PDL_BETWEEN) they
    wait for the kernel before them in the kernel."""
    flags = dict(PDL=True, WAIT=wait)
    kernels = [compile_for_hopper(rmsnorm_triton._rms_norm_kernel,
                                  dict(HIDDEN=2048, BLOCK_H=2048, ROUND_TO=tl.bfloat16, **flags), {"out_ptr": "*bf16"}),
               compile_for_hopper(rmsnorm_triton._add_rms_norm_kernel,
                                  dict(NUM_PARTIALS=2, HIDDEN=2048, BLOCK_H=2048, ROUND_TO=tl.bfloat16, **flags),
                                  {"x_ptr": "*fp32", "out_ptr": "*bf16"}),
               compile_for_hopper(activation_triton._silu_and_mul_kernel,
                                  dict(INTERMEDIATE=8192, BLOCK=1024, ROUND_TO=tl.bfloat16, **flags),
                                  {"out_ptr": "*bf16"}),
               compile_for_hopper(attention_triton._merge_splits_kernel,
                                  dict(NUM_SPLITS=8, SPLITS_PAD=8, HEAD_DIM=64, HEAD_DIM_PAD=64, **flags),
                                  {"out_ptr": "*bf16"}),
               compile_for_hopper(quant_linear_triton._sum_partials_kernel, dict(NUM_PARTIALS=2, BLOCK=1024, **flags),
                                  {"partial_ptr": "*fp32", "out_ptr": "*bf16"})]
    kernels += [compile_for_hopper(attention_triton._paged_attention_kernel,
                                   dict(**LLAMA, **DECODE, NUM_SPLITS=4, ROPE=rope, HAS_NORM=False, FP8_KV=False,
                                        **flags)) for rope in (True, False)]
    for kernel in kernels:
        assert "griddepcontrol.launch_dependents" in kernel.asm["ptx"]
        assert ("griddepcontrol.wait" in kernel.asm["ptx"]) == wait
    plain = compile_for_hopper(rmsnorm_triton._rms_norm_kernel, dict(HIDDEN=2048, BLOCK_H=2048, ROUND_TO=tl.bfloat16),
                               {"out_ptr": "*bf16"})
    assert "griddepcontrol" not in plain.asm["ptx"]


@pytest.mark.parametrize("has_norm,store_kv,fp8_kv", [(False, True, False), (True, True, False), (True, False, False),
                                                    (False, True, True)])
def test_rotary_kernel_compiles(has_norm, store_kv, fp8_kv):
    compile_for_hopper(rotary_triton._rotary_kernel,
                       dict(NUM_Q_HEADS=16, Q_HEADS_PAD=16, NUM_KV_HEADS=8, KV_HEADS_PAD=8, HALF=64, HALF_PAD=64,
                            HAS_NORM=has_norm, STORE_KV=store_kv, BLOCK_SIZE=16, FP8_KV=fp8_kv),
                       FP8_CACHE if fp8_kv else None)


def test_activation_and_sampling_kernels_compile():
    for num_partials in (1, 4):     # gate_up_proj's output, or its partial products over K
        compile_for_hopper(activation_triton._silu_and_mul_kernel,
                           dict(INTERMEDIATE=8192, BLOCK=1024, ROUND_TO=tl.bfloat16, NUM_PARTIALS=num_partials),
                           {"out_ptr": "*bf16", "x_ptr": "*fp32" if num_partials > 1 else "*bf16"})
    for greedy, scaled in [(True, False), (False, True), (False, False)]:
        compile_for_hopper(sampling_triton._sample_from_logits_kernel,
                           dict(GREEDY=greedy, SCALED=scaled, BLOCK=sampling_triton.BLOCK))
    compile_for_hopper(sampling_triton._combine_splits_kernel, dict(MAX_SPLITS=sampling_triton.MAX_SPLITS),
                       {"out_ptr": "*i64"})


@pytest.mark.parametrize("world_size", [2, 8])
def test_peer_all_reduce_compiles_to_128_bit_loads_and_system_scope_signals(world_size):
    """The buffers come as pointers of their own (a tuple), not as addresses in a tensor: only then does
    the compiler know their alignment and load 16 bytes a thread. The signals must be system-scope
    atomics (another GPU reads them), sent after a barrier of the program's threads. (The interpreter
    runs a program as one thread, so only the compiled kernel shows that barrier.)"""
    compiled = compile_for_hopper(all_reduce_triton._peer_all_reduce_kernel,
                                  dict(RANK=1, WORLD=world_size, BLOCK=all_reduce_triton.BLOCK),
                                  {"x_ptr": "*bf16", "buffers": ("*u8",) * world_size, "abort_ptr": "*i32",
                                   "slot_offset": "i32"}, aligned=True, num_warps=4)
    ptx = compiled.asm["ptx"]
    assert "atom.global.release.sys.cas.b32" in ptx and "atom.global.acquire.sys.cas.b32" in ptx
    # every thread's copy into the buffer is done (a barrier) before one thread signals it out
    assert -1 < ptx.find("bar.sync") < ptx.find("atom.global.release")
    loads = set(re.findall(r"ld\.global[\w.]*", ptx))                  # e.g. ld.global.v4.b32
    assert "ld.global.v4.b32" in loads and not any(load.endswith("b16") for load in loads), loads


@pytest.mark.parametrize("preset", [None, "0"])
def test_importing_the_ops_keeps_triton_fusing_multiply_adds_unless_the_environment_chose(preset):
    """Triton 3.10 stops fusing a multiply and an add into one FMA by default; the kernels are timed with
    it. Importing nanovllm.ops asks for it, and a value already set stays."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_DEFAULT_FP_FUSION"}
    if preset is not None:
        env["TRITON_DEFAULT_FP_FUSION"] = preset
    out = subprocess.run([sys.executable, "-c", "import os, nanovllm.ops; print(os.environ['TRITON_DEFAULT_FP_FUSION'])"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == (preset or "1")
