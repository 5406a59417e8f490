"""FP8 W8A8, W4A16 and W8A16 matmuls in Triton, the same arguments as their references in quant_linear.py.

All compute out[M, N] = x[M, K] @ W[N, K]^T, a program per [BLOCK_M, BLOCK_N] tile of the
output walking K in BLOCK_K steps; what differs is what a step loads and who multiplies:

- **FP8, one row** (`_fp8_gemv_kernel`, a decode step of one sequence): weight-only, as the
  reference defines it at that many rows. Each step loads a [BLOCK_N, BLOCK_K] tile of e4m3
  codes, 16 contiguous bytes a thread, widens them to float32 in registers and multiplies them
  by x on the FMA units; the channel's scale multiplies the sum. No kernel quantizes x first.
  gate_up_proj's takes the gate's rows and the up rows beside them, and writes silu(gate) * up
  (fp8_linear_silu_and_mul_triton). On Hopper the one-row GEMVs (FP8, W4A16) are launched early
  (launch_pdl): the first step's weights are loaded before waiting for the kernel that wrote x.
- **FP8, more rows**: the GEMM multiplies e4m3 tiles on the tensor cores (`tl.dot` on fp8e4nv,
  float32 accumulators) and applies scale_x[m] * scale_w[n] (and the bias) once, in the
  epilogue. The weight is read as stored: one byte a weight. The activations are quantized per
  row (amax / 448, then e4m3 codes) by the kernel that computed them (x given as `Fp8Rows`: the
  norms, SiLU-and-mul; fp8_rows_triton.py), else by `quantize_fp8_rows_triton` first. Past 256
  rows (prefill) `_fp8_tma_gemm_kernel` loads the tiles through tensor descriptors instead (TMA
  on Hopper), [128, 256] outputs a program, the programs in groups of row tiles (FP8_TMA_GEMM).
  At a decode batch's 2 to 256 rows `_fp8_swap_gemm_kernel` computes the product transposed,
  out^T = W x^T, so that the weight's rows take the tensor cores' long side and the batch's rows
  the short one (all of them in one tile up to 64, tiles of 128 beyond), its tiles through
  tensor descriptors too (FP8_SWAP_GEMM, FP8_SWAP_MAX_ROWS).
- **W4A16, a few rows** (`_w4a16_gemv_kernel`, M <= GEMV_MAX_ROWS): a matrix-vector product
  bound by reading the codes, on the FMA units. A step loads [BLOCK_N, BLOCK_K / 8] int32
  words, 16 contiguous bytes a thread along K, and multiplies nibble j of each word by
  x[k0 + 8 w + j] in float32: an AND leaves the code in place, and its bits read as a float32
  are a subnormal number proportional to it (no int -> float conversion, no subtraction), so a
  weight costs two instructions; the zero point and the group's scale are applied once a word.
- **W4A16, 3 to 16 rows** (`_w4a16_dot_gemv_kernel`): x padded to 16 rows on the tensor cores.
  The words are cut into eight planes (code j of each word), each one tl.dot over the words
  with x's columns 8 w + j, so nothing is repacked; a plane's codes become q - z in 16 bits with
  the magic-number trick, two words a register (PTX: PRMT, SHF, LOP3, a bf16x2 subtraction),
  and the group's scale multiplies the float32 sum. One and two rows stay on the FMA GEMV,
  which measured faster there.
- **W4A16, more rows** (`_w4a16_gemm_kernel`): the same words expanded in registers into the
  [BLOCK_N, BLOCK_K] 16-bit tile (`tl.join` of the eight nibble planes, then a reshape that
  moves no data), dequantized, and handed to `tl.dot`. Either way the weight crosses memory
  at half a byte a weight (Marlin's idea, in Triton), in the layout the checkpoint loaders
  produce ([N, K / 8], K contiguous: no repacking). GGUF's 4-bit blocks (w = q s - m) take the
  same kernels with a float offset in place of the integer zero point; the GEMV holds a step's
  words as runs within one group (four words for GGUF's groups of 32), each run loading its scale
  and offset once.
- **W8A16** (GGUF's Q8_0, Q6_K and the other non-4-bit types, 8-bit GPTQ and compressed-tensors,
  block-scaled FP8): int8 or e4m3 codes, one byte a weight, a scale (and offset) per group of 16,
  32, 128 or a whole row. At a few rows `_w8a16_gemv_kernel` multiplies the codes by x on the FMA
  units, as the FP8 GEMV does, and each run of 16 codes (a thread's load) meets its scale once,
  as a sum; at more rows `_w8a16_kernel` scales each run of codes in registers and hands the tile
  to `tl.dot`.

Tile shapes follow the row count: a decode step (M <= 16) is bound by reading W, so it takes
narrow tiles and splits K over several programs (SPLIT_K) until there are a few programs per
SM, each writing its partial product [M, N] in float32 (the GEMVs' tables were chosen by
timing at Llama's shapes on an H200, tools/quant_gemv_probe.py --sweep). `*_linear_partials_triton` hands the S
partials [S, M, N] on to a consumer that adds them up as it loads them (o_proj and down_proj:
the residual-add + RMSNorm after them, as ops/linear.py does for bfloat16); `*_linear_triton`
adds them up itself, in one more small kernel. Larger M gets square tiles for the tensor cores
and no split.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:      # a Triton without host-side tensor descriptors: the pointer-load kernels only
    TensorDescriptor = None

from nanovllm.ops import pdl_between, sm_count, use_pdl
from nanovllm.ops.activation_triton import silu_and_mul_triton
from nanovllm.ops.fp8_rows_triton import quantize_fp8_rows_triton
from nanovllm.ops.matmul_triton import grouped_tile
from nanovllm.ops.quant_format import (FP8_WEIGHT_ONLY_MAX_ROWS, Fp8Rows, power_of_two_dividing,
                                      step_holds_groups, w4a16_block_k)

PROGRAMS_PER_SM = 4     # a decode product splits K until it has about this many programs per SM
GEMV_PROGRAMS_PER_SM = 8    # the weight-only GEMVs (FP8, W4A16) split K up to this many programs per SM
FP8_GEMM_PROGRAMS_PER_SM = 3    # FP8's W8A8 GEMM at a decode batch's rows (2 to 64) splits K up to about this many
# FP8's W8A8 GEMM past 64 rows (prefill chunks): (block_n, block_k, warps, stages) of a 128-row tile,
# loaded through tensor descriptors (TMA on Hopper) with the programs in groups of FP8_TMA_GROUP_M
# row tiles, or with FP8_TMA_GEMM off the pointer-load kernel's [128, 128] tiles. On an H100 at
# 8,192 rows 12-23% faster a layer than those (tools/fp8_prefill_probe.py; docs/reference/quantization.md).
FP8_TMA_GEMM = True
FP8_TMA_TILES = (256, 128, 8, 3)
FP8_TMA_GROUP_M = 8
# FP8's W8A8 GEMM at a decode batch's rows (2 to 64), transposed so that the weight's rows fill the tensor
# cores' long side (_fp8_swap_gemm_kernel): (block_n, block_k, warps, stages), K split while the programs stay
# within FP8_SWAP_PROGRAMS_PER_SM an SM (0: never, as every split timed slower); off, the pointer-load
# kernel's tiles (choose_fp8_gemm_tiles). On an H100 at 8 to 64 rows of Llama-3.1-8B's layers 3-18% faster
# than those (tools/fp8_gemm_probe.py --swap), and `bench throughput` on 64 requests, fp8, 6,230 -> 6,326
# output tok/s (docs/reference/quantization.md).
FP8_SWAP_GEMM = True
FP8_SWAP_TILES = (64, 256, 4, 5)
FP8_SWAP_PROGRAMS_PER_SM = 0
# A decode batch of 65 to FP8_SWAP_MAX_ROWS rows takes the transposed kernel too, in tiles of FP8_SWAP_WIDE_ROWS
# rows at FP8_SWAP_WIDE_TILES (twice its outputs a program where those tiles would be more programs than SMs),
# and K split while the programs stay within FP8_SWAP_WIDE_PROGRAMS_PER_SM an SM. The prefill tiles above
# gave such a batch one 128-row tile and 256 outputs a program: Llama-3.1-8B's o_proj and down_proj 16 programs
# (32 at 256 rows) for 132 SMs, each program's tensor cores the bound. On an H100 (tools/fp8_gemm_probe.py
# --rows 128,256 --swap, microseconds, prefill tiles -> these): at 128 rows qkv_proj 24.5 -> 14.4, o_proj
# 23.6 -> 11.9, gate_up_proj 50.9 -> 50.1, down_proj 68.6 -> 29.9; at 256 rows 24.6 -> 16.6, 24.1 -> 12.8,
# 64.7 -> 65.5, 68.3 -> 35.3 (cuBLAS bf16: 22.4, 15.4, 102.2, 54.5 and 24.0, 18.7, 101.8, 57.4). `bench
# throughput` (fp8 weights and KV cache) 11,031 -> 11,916 output tok/s (bf16: 8,399); docs/reference/quantization.md.
FP8_SWAP_MAX_ROWS = 256
FP8_SWAP_WIDE_ROWS = 128
FP8_SWAP_WIDE_TILES = (64, 128, 4, 5)
FP8_SWAP_WIDE_PROGRAMS_PER_SM = 1
# A batch of more rows than FP8_SWAP_WIDE_ROWS in a layer whose twice-as-wide tiles would still make more than
# two waves of programs (gate_up_proj, the LM head: the products bound by the tensor cores, not by HBM) takes
# one tile of FP8_SWAP_TALL_ROWS rows at FP8_SWAP_TALL_TILES, two warpgroups: each weight tile fetched once for
# every row, and 256 rows a wgmma. On an H100 at 256 rows (tools/fp8_gemm_probe.py --rows 256 --swap --block-m
# 128,256, microseconds): Llama-3.1-8B's gate_up_proj 64.7 -> 59.0, its LM head 268.2 -> 247.0 (torch._scaled_mm
# 60.7 and 261.5); the narrower layers were fastest on the tiles above.
FP8_SWAP_TALL_ROWS = 256
FP8_SWAP_TALL_TILES = (128, 128, 8, 4)


@dataclass(frozen=True)
class Tiles:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4
    prefetch: bool = False      # the W4A16 GEMV: load step k + 1's words before multiplying step k's
    planes: bool = False        # W4A16 at a few rows on the tensor cores, a nibble plane a tl.dot (_w4a16_dot_gemv_kernel)
    row_gemv: bool = False      # W4A16 at one row, many rows' words a thread (_w4a16_row_gemv_kernel)
    tma: bool = False           # FP8's W8A8 GEMM at prefill rows through tensor descriptors (_fp8_tma_gemm_kernel)
    swap: bool = False          # FP8's W8A8 GEMM at a decode batch's rows, transposed (_fp8_swap_gemm_kernel)


def _sms(device: torch.device) -> int:
    """The SMs a tile choice counts: the GPU's, or 2 for CPU tensors (the interpreter, in tests)."""
    return sm_count(device) if device.type == "cuda" else 2


def _doubling_split(max_splits: int, programs: int, target: int) -> int:
    """K's split: doubled from 1 while it stays within max_splits and programs x split within target."""
    split_k = 1
    while split_k * 2 <= max_splits and programs * split_k * 2 <= target:
        split_k *= 2
    return split_k


def choose_tiles(num_rows: int, out_features: int, k_steps: int, block_k: int, device: torch.device) -> Tiles:
    """The tiles of an [M, K] x [K, N] product whose K is k_steps steps of block_k."""
    if num_rows > 64:
        return Tiles(128, 128, block_k, num_warps=8, num_stages=3)
    if num_rows > 16:
        return Tiles(64, 64, block_k)
    sms = _sms(device)
    split_k = _doubling_split(k_steps, triton.cdiv(out_features, 32), PROGRAMS_PER_SM * sms)
    return Tiles(16, 32, block_k, split_k)


def _launch_grid(num_rows: int, out_features: int, tiles: Tiles) -> tuple[int, int, int]:
    return triton.cdiv(num_rows, tiles.block_m), triton.cdiv(out_features, tiles.block_n), tiles.split_k


def _k_per_split(in_features: int, tiles: Tiles) -> int:
    """The length of K each split program covers: a whole number of block_k steps."""
    return triton.cdiv(triton.cdiv(in_features, tiles.block_k), tiles.split_k) * tiles.block_k


def _pdl_options(x: torch.Tensor) -> dict:
    """The launch options of a GEMV that may start before the kernel writing x ends: USE_PDL, and
    launch_pdl where the device takes part (ops/__init__.py)."""
    return {"USE_PDL": True, "launch_pdl": True} if use_pdl(x) else {"USE_PDL": False}


def _output(num_rows: int, out_features: int, x: torch.Tensor | Fp8Rows, tiles: Tiles) -> torch.Tensor:
    """[M, N] in x's dtype (Fp8Rows: the rows' unquantized dtype), or with K split the float32
    partials [S, M, N]."""
    if tiles.split_k > 1:
        return torch.empty(tiles.split_k, num_rows, out_features, dtype=torch.float32, device=x.device)
    return torch.empty(num_rows, out_features, dtype=x.dtype, device=x.device)


@triton.jit
def _sum_partials_kernel(partial_ptr, out_ptr, size, NUM_PARTIALS: tl.constexpr, BLOCK: tl.constexpr,
                         PDL: tl.constexpr = False, WAIT: tl.constexpr = False):
    if PDL:     # the kernel after this one may launch now (ops/__init__.py)
        tl.extra.cuda.gdc_launch_dependents()
    if WAIT:    # launched early (PDL_BETWEEN): the partials are written once this returns
        tl.extra.cuda.gdc_wait()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < size
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(NUM_PARTIALS):
        acc += tl.load(partial_ptr + s * size + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def sum_partials(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[S, M, N] float32 partials -> their sum [M, N] in dtype; an [M, N] output passes through."""
    if out.dim() == 2:
        return out
    summed = torch.empty(out.shape[1:], dtype=dtype, device=out.device)                 # [M, N]
    block = 1024
    _sum_partials_kernel[(triton.cdiv(summed.numel(), block),)](out, summed, summed.numel(),
                                                                NUM_PARTIALS=out.shape[0], BLOCK=block,
                                                                **pdl_between(out, "partials"))
    return summed


# ---- FP8 -------------------------------------------------------------------------------------

def quantize_fp8_per_token_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (xq [M, K] float8_e4m3fn, scale [M] float32), as quantize_fp8_per_token_torch."""
    rows = quantize_fp8_rows_triton(x)
    return rows.codes, rows.scale


@triton.jit
def _fp8_gemm_kernel(a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, bias_ptr, out_ptr, M, N, K, stride_a, K_PER_SPLIT,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """a is e4m3 codes [M, K] with a scale a row, the weight's e4m3 rows b [N, K] with a scale each:
    the tiles meet on the tensor cores in float32, and the two scales in the epilogue."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_a                        # [BLOCK_M, 1]
    b_rows = b_ptr + offs_n.to(tl.int64)[:, None] * K                               # [BLOCK_N, 1]
    a_scale = tl.load(a_scale_ptr + offs_m, mask=mask_m, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_start = tl.program_id(2) * K_PER_SPLIT
    for k0 in range(k_start, tl.minimum(k_start + K_PER_SPLIT, K), BLOCK_K):
        mask_k = k0 + offs_k < K
        a = tl.load(a_rows + k0 + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_rows + k0 + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc)                                            # e4m3 x e4m3 -> float32
    b_scale = tl.load(b_scale_ptr + offs_n, mask=mask_n, other=0.0)
    acc = acc * a_scale[:, None] * b_scale[None, :]
    _store_tile(acc, bias_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n, M, N, HAS_BIAS)


def _descriptor_ready(t: torch.Tensor) -> bool:
    """Whether a 2-D tensor can back a tensor descriptor: rows contiguous, its start and row stride
    multiples of 16 bytes (a tiny model's K of 40, say, is not)."""
    return (t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0)


@triton.jit
def _fp8_tma_gemm_kernel(a_desc, a_scale_ptr, b_desc, b_scale_ptr, bias_ptr, out_ptr, M, N, K,
                         HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_STAGES: tl.constexpr):
    """_fp8_gemm_kernel's product at prefill rows (e4m3 rows given, K unsplit), its tiles loaded
    through tensor descriptors (TMA on Hopper; the descriptors fill what lies past M, N or K with
    zeros). One axis of programs in groups of GROUP_M row tiles (grouped_tile, matmul_triton.py), so
    the programs running together share their weight tiles in L2."""
    tile_m, tile_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in tl.range(0, tl.cdiv(K, BLOCK_K), num_stages=NUM_STAGES):
        a = a_desc.load([tile_m * BLOCK_M, k * BLOCK_K])
        b = b_desc.load([tile_n * BLOCK_N, k * BLOCK_K])
        acc = tl.dot(a, b.T, acc)                                                    # e4m3 x e4m3 -> float32
    _store_scaled_tile(acc, a_scale_ptr, b_scale_ptr, bias_ptr, out_ptr, tile_m * BLOCK_M + tl.arange(0, BLOCK_M),
                       tile_n * BLOCK_N + tl.arange(0, BLOCK_N), M, N, HAS_BIAS)


@triton.jit
def _fp8_swap_gemm_kernel(a_desc, a_scale_ptr, b_desc, b_scale_ptr, bias_ptr, out_ptr, M, N, K, K_PER_SPLIT,
                          HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr):
    """_fp8_gemm_kernel's product at a decode batch's rows (e4m3 rows given), computed transposed: a
    program's tile is out^T[BLOCK_N, BLOCK_M] = W[BLOCK_N, K] x^T, so the weight's rows fill the
    tensor cores' long side (64 rows a warpgroup on Hopper) and the batch's rows the short one (16 to
    256 a tile; a batch of more rows than one tile takes several, on the first axis of programs).
    Both tiles come through tensor descriptors (zeros past M, N and K) in a pipeline NUM_STAGES deep;
    K split over the third axis of programs, as the pointer kernel's."""
    tile_m, tile_n = tl.program_id(0), tl.program_id(1)
    k_start = tl.program_id(2) * K_PER_SPLIT
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in tl.range(k_start, tl.minimum(k_start + K_PER_SPLIT, K), BLOCK_K, num_stages=NUM_STAGES):
        w = b_desc.load([tile_n * BLOCK_N, k0])                                     # [BLOCK_N, BLOCK_K]
        a = a_desc.load([tile_m * BLOCK_M, k0])                                     # [BLOCK_M, BLOCK_K]
        acc = tl.dot(w, a.T, acc)                                                   # e4m3 x e4m3 -> float32
    _store_scaled_tile(tl.trans(acc), a_scale_ptr, b_scale_ptr, bias_ptr, out_ptr,
                       tile_m * BLOCK_M + tl.arange(0, BLOCK_M), tile_n * BLOCK_N + tl.arange(0, BLOCK_N), M, N,
                       HAS_BIAS)


@triton.jit
def _store_scaled_tile(acc, a_scale_ptr, b_scale_ptr, bias_ptr, out_ptr, offs_m, offs_n, M, N, HAS_BIAS: tl.constexpr):
    """The descriptor kernels' epilogue: the float32 tile [len(offs_m), len(offs_n)] times the rows'
    scales, then the channels' (that order, as _fp8_gemm_kernel's), written by _store_tile."""
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = acc * tl.load(a_scale_ptr + offs_m, mask=mask_m, other=0.0)[:, None] \
        * tl.load(b_scale_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    _store_tile(acc, bias_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n, M, N, HAS_BIAS)


@triton.jit
def _store_tile(acc, bias_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n, M, N, HAS_BIAS: tl.constexpr):
    """Write a float32 output tile (plus the bias) in out's dtype; with K split, as this split's
    partial in float32 (the first split adds the bias)."""
    if HAS_BIAS:
        if tl.program_id(2) == 0:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    split = tl.program_id(2).to(tl.int64)
    out = out_ptr + split * M * N + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def fp8_linear_triton(x: torch.Tensor | Fp8Rows, weight: torch.Tensor, weight_scale: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (or its Fp8Rows), weight [N, K] float8_e4m3fn, weight_scale [N] float32, bias [N] or
    None -> [M, N]."""
    return sum_partials(fp8_linear_partials_triton(x, weight, weight_scale, bias), x.dtype)


def fp8_linear_partials_triton(x: torch.Tensor | Fp8Rows, weight: torch.Tensor, weight_scale: torch.Tensor,
                               bias: torch.Tensor | None = None) -> torch.Tensor:
    """As fp8_linear_triton, but with K split: the float32 partial products [S, M, N]."""
    (num_rows, in_features), out_features = x.shape, weight.shape[0]
    if num_rows == 0:
        return torch.empty(0, out_features, dtype=x.dtype, device=weight.device)
    if isinstance(x, Fp8Rows):                     # quantized by the kernel that wrote them
        return fp8_linear_tiles(x, weight, weight_scale, bias,
                                choose_fp8_gemm_tiles(num_rows, out_features, in_features, weight.device))
    if num_rows <= FP8_WEIGHT_ONLY_MAX_ROWS:       # weight-only, as fp8_linear_torch at this many rows
        return fp8_linear_tiles(x, weight, weight_scale, bias, choose_fp8_gemv_tiles(num_rows, out_features,
                                                                                     in_features, x.device))
    return fp8_linear_tiles(x, weight, weight_scale, bias,
                            choose_fp8_gemm_tiles(num_rows, out_features, in_features, x.device))


# gate_up_proj's one-row GEMVs (FP8, and W4A16's row GEMV) write silu(gate) * up themselves, instead of
# [gate | up] for a SiLU-and-mul kernel after them (fp8_linear_silu_and_mul_triton,
# w4a16_linear_silu_and_mul_triton).
FUSED_SILU = True


def fp8_linear_silu_and_mul_triton(x: torch.Tensor | Fp8Rows, weight: torch.Tensor, weight_scale: torch.Tensor,
                                   bias: torch.Tensor | None = None, fp8: bool = False) -> torch.Tensor | Fp8Rows:
    """silu_and_mul(fp8_linear_triton(x, weight, weight_scale, bias), fp8): x [M, K], weight [2 I, K]
    ([gate | up]) -> [M, I] (fp8: its Fp8Rows). At one row (the weight-only GEMV) in one kernel, the
    gate's rows and the up rows beside them in each program; the tile has half the usual rows of
    each, so a step reads as many bytes as the plain GEMV's."""
    (num_rows, in_features), out_features = x.shape, weight.shape[0]
    if (FUSED_SILU and 0 < num_rows <= FP8_WEIGHT_ONLY_MAX_ROWS and bias is None and not fp8
            and not isinstance(x, Fp8Rows)):
        tiles = choose_fp8_gemv_tiles(num_rows, out_features, in_features, x.device)
        if tiles.split_k == 1:
            return fp8_linear_tiles(x, weight, weight_scale, None, replace(tiles, block_n=max(1, tiles.block_n // 2)),
                                    gated=True)
    return silu_and_mul_triton(fp8_linear_triton(x, weight, weight_scale, bias), fp8)


def fp8_linear_tiles(x: torch.Tensor | Fp8Rows, weight: torch.Tensor, weight_scale: torch.Tensor,
                     bias: torch.Tensor | None, tiles: Tiles, gated: bool = False) -> torch.Tensor:
    """The product with the tiles given (tools/gpu_quant.sh times several): [M, N] in x's dtype, or
    with K split the partials [S, M, N] float32. gated (the GEMV's tiles, unsplit, no bias): the
    weight is gate_up_proj's [gate | up], and the result silu(gate) * up [M, N / 2]. x may be
    Fp8Rows (the W8A8 GEMM's tiles only)."""
    if isinstance(x, Fp8Rows):
        if tiles.block_m <= FP8_WEIGHT_ONLY_MAX_ROWS or gated:
            raise ValueError("Fp8Rows go to the W8A8 GEMM, which quantizes nothing itself")
        return _fp8_gemm(x, weight, weight_scale, bias, tiles)
    (num_rows, in_features), out_features = x.shape, weight.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    if tiles.block_m > FP8_WEIGHT_ONLY_MAX_ROWS:
        if gated:
            raise ValueError("only the FP8 GEMV (one row) is gated")
        return _fp8_gemm(quantize_fp8_rows_triton(x), weight, weight_scale, bias, tiles)
    if gated:                                           # the weight-only GEMV: x as it is
        if tiles.split_k > 1 or bias is not None:
            raise ValueError("the gated FP8 GEMV takes an unsplit product without a bias")
        out_features //= 2                              # [gate | up] -> silu(gate) * up
    out = _output(num_rows, out_features, x, tiles)                     # [M, N], or [S, M, N] float32
    k_per_split = _k_per_split(in_features, tiles)
    _fp8_gemv_kernel[_launch_grid(num_rows, out_features, tiles)](
        x, weight, weight_scale, bias if bias is not None else weight_scale, out, num_rows, out_features,
        in_features, x.stride(0), k_per_split, HAS_BIAS=bias is not None, BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, GATED=gated, num_warps=tiles.num_warps,
        num_stages=tiles.num_stages, **_pdl_options(x))
    return out


def _fp8_gemm(rows: Fp8Rows, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
              tiles: Tiles) -> torch.Tensor:
    """The W8A8 GEMM of rows quantized already."""
    (num_rows, in_features), out_features = rows.shape, weight.shape[0]
    out = _output(num_rows, out_features, rows, tiles)                   # [M, N], or [S, M, N] float32
    if (tiles.tma or tiles.swap) and (TensorDescriptor is None
                                      or not all(_descriptor_ready(t) for t in (rows.codes, weight))):
        tiles = replace(tiles, tma=False, swap=False)      # the same tiles by pointer loads
    if tiles.tma and tiles.split_k > 1:
        raise ValueError("the descriptor GEMM takes an unsplit K")
    if tiles.tma or tiles.swap:
        a = TensorDescriptor.from_tensor(rows.codes, [tiles.block_m, tiles.block_k])
        b = TensorDescriptor.from_tensor(weight, [tiles.block_n, tiles.block_k])
    if tiles.swap:
        _fp8_swap_gemm_kernel[_launch_grid(num_rows, out_features, tiles)](
            a, rows.scale, b, weight_scale, bias if bias is not None else weight_scale, out, num_rows, out_features,
            in_features, _k_per_split(in_features, tiles), HAS_BIAS=bias is not None, BLOCK_M=tiles.block_m,
            BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, NUM_STAGES=tiles.num_stages, num_warps=tiles.num_warps)
        return out
    if tiles.tma:
        grid = (triton.cdiv(num_rows, tiles.block_m) * triton.cdiv(out_features, tiles.block_n),)
        _fp8_tma_gemm_kernel[grid](a, rows.scale, b, weight_scale, bias if bias is not None else weight_scale, out,
                                   num_rows, out_features, in_features, HAS_BIAS=bias is not None,
                                   BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
                                   GROUP_M=FP8_TMA_GROUP_M, NUM_STAGES=tiles.num_stages, num_warps=tiles.num_warps)
        return out
    _fp8_gemm_kernel[_launch_grid(num_rows, out_features, tiles)](
        rows.codes, rows.scale, weight, weight_scale, bias if bias is not None else weight_scale, out, num_rows,
        out_features, in_features, rows.codes.stride(0), _k_per_split(in_features, tiles),
        HAS_BIAS=bias is not None, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k, num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return out


@triton.jit
def _fp8_gemv_weights(w_rows, up_rows, k0, mask, GATED: tl.constexpr):
    """The FP8 GEMV's e4m3 tiles [1, BN, BK] at step k0: the rows', and with GATED the up rows' (else
    the rows' again, unused)."""
    w = tl.load(w_rows + k0, mask=mask, other=0.0)
    w_up = w
    if GATED:
        w_up = tl.load(up_rows + k0, mask=mask, other=0.0)
    return w, w_up


@triton.jit
def _fp8_gemv_accumulate(acc, acc_up, x_rows, k0, mask, w, w_up, GATED: tl.constexpr):
    """Load x [BM, 1, BK] at step k0 and add its products with the step's tiles to the accumulators."""
    x = tl.load(x_rows + k0, mask=mask, other=0.0).to(tl.float32)
    acc += x * w.to(tl.float32)
    if GATED:
        acc_up += x * w_up.to(tl.float32)
    return acc, acc_up


@triton.jit
def _fp8_gemv_kernel(x_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr, M, N, K, stride_x, K_PER_SPLIT,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GATED: tl.constexpr = False, USE_PDL: tl.constexpr = False):
    """Weight-only (W8A16; BLOCK_M 1 as the engine launches it): each step loads a [BLOCK_N,
    BLOCK_K] tile of e4m3 codes, 16 contiguous bytes a thread along K, widens them to float32 in
    registers and multiplies them by x in float32 on the FMA units; the products add up in a
    [BLOCK_M, BLOCK_N, BLOCK_K] accumulator that is reduced along K once, after the loop (no
    shuffles in the loop), and the channel's scale is applied once, to the sum. x stays in its
    own precision: no quantization kernel before the product, and no e4m3 rounding of it.

    GATED (gate_up_proj, unsplit, no bias): the weight is [gate | up], 2 N rows; the program
    multiplies gate rows n and up rows N + n and writes silu(gate) * up [M, N], each rounded to
    out's dtype where silu_and_mul would round it, so no SiLU-and-mul kernel follows.
    USE_PDL (launched with launch_pdl): the first step's weights are loaded before the kernel waits
    for the one before it (gdc_wait), which wrote x."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None, None] * stride_x + offs_k[None, None, :]        # [BM, 1, BK]
    w_rows = w_ptr + offs_n.to(tl.int64)[None, :, None] * K + offs_k[None, None, :]               # [1, BN, BK]
    up_rows = w_ptr + (offs_n.to(tl.int64) + N)[None, :, None] * K + offs_k[None, None, :]       # GATED: row N + n
    mask_m3, mask_n3 = mask_m[:, None, None], mask_n[None, :, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)       # GATED only
    k_start = tl.program_id(2) * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    # The first step apart: its weights are in flight before x can be read.
    mask_k = (k_start + offs_k < K)[None, None, :]      # (a whole step lies in the split, or past K)
    w, w_up = _fp8_gemv_weights(w_rows, up_rows, k_start, mask_n3 & mask_k, GATED)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()                   # the kernel before has finished: x is written
        tl.extra.cuda.gdc_launch_dependents()
    acc, acc_up = _fp8_gemv_accumulate(acc, acc_up, x_rows, k_start, mask_m3 & mask_k, w, w_up, GATED)
    for k0 in range(k_start + BLOCK_K, k_end, BLOCK_K):
        mask_k = (k0 + offs_k < K)[None, None, :]
        w, w_up = _fp8_gemv_weights(w_rows, up_rows, k0, mask_n3 & mask_k, GATED)
        acc, acc_up = _fp8_gemv_accumulate(acc, acc_up, x_rows, k0, mask_m3 & mask_k, w, w_up, GATED)
    w_scale = tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0)
    out = tl.sum(acc, axis=2) * w_scale[None, :]                                                    # [BM, BN]
    if GATED:
        up_scale = tl.load(w_scale_ptr + N + offs_n, mask=mask_n, other=0.0)
        gate = out.to(out_ptr.dtype.element_ty).to(tl.float32)
        up = (tl.sum(acc_up, axis=2) * up_scale[None, :]).to(out_ptr.dtype.element_ty).to(tl.float32)
        out = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32) * up
    _store_tile(out, bias_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n, M, N, HAS_BIAS)


def choose_fp8_gemv_tiles(num_rows: int, out_features: int, in_features: int, device: torch.device) -> Tiles:
    """The FP8 GEMV's tile (one row): 16 contiguous bytes of weight a thread, [8, 512] bytes a step,
    or for layers of at most 4,096 outputs (fewer programs) [8, 1024], [4, 1024] at most 3,072 and
    [4, 2048] at most 2,048: fewer, longer steps. K is split only while a program would take more
    than 16 steps. Measured on an H200 at Llama's shapes (tools/quant_gemv_probe.py --sweep,
    microseconds): Llama-3.1-8B o_proj 9.1 -> 7.5, down_proj 19.9 -> 18.5; Llama-3.2-1B qkv_proj
    5.3 -> 4.4, o_proj 4.9 -> 3.9 -> 2.5 ([4, 2048]), down_proj 10.5 -> 8.8 -> 6.3 ([4, 2048]), and
    its batch-1 decode 1,499 -> 1,553 tok/s with [4, 2048]. On the widest layers (gate_up_proj, the
    LM head) [8, 512] and the [32, 256] tile before are within a few percent of each other, one or
    the other ahead from one run to the next. Splitting K or loading the next step ahead measured
    slower."""
    sms = _sms(device)
    block_n = 4 if out_features <= 3072 else 8
    block_k = 2048 if out_features <= 2048 else 1024 if out_features <= 4096 else 512
    programs, k_steps, split_k = triton.cdiv(out_features, block_n), triton.cdiv(in_features, block_k), 1
    while k_steps > 16 * split_k and programs * split_k * 2 <= GEMV_PROGRAMS_PER_SM * sms:
        split_k *= 2
    return Tiles(triton.next_power_of_2(num_rows), block_n, block_k, split_k, num_warps=4, num_stages=1)


def choose_fp8_gemm_tiles(num_rows: int, out_features: int, in_features: int, device: torch.device) -> Tiles:
    """The W8A8 GEMM's tiles at a decode batch's rows (2 to 64; to FP8_SWAP_MAX_ROWS transposed, in
    tiles of FP8_SWAP_WIDE_ROWS): all the rows in one tile of 16 to 64,
    64 outputs (128 where there are many programs: gate_up_proj, the LM head), and K split until
    there are about 3 programs per SM; more rows take choose_tiles'. Measured on an H200 at
    Llama-3.1-8B's shapes and 32 rows (tools/quant_gemv_probe.py --gemm, microseconds, against the
    unsplit [64, 64] tile before): qkv_proj 15.6 -> 14.3, o_proj 14.6 -> 12.1, gate_up_proj
    43.1 -> 37.3, down_proj 42.2 -> 27.6. A tile of 64 rows and 64 outputs steps 256 along K
    instead, split to about one program per SM (tools/fp8_gemm_probe.py, 64 rows: qkv_proj 12.0
    -> 10.9, o_proj 10.1 -> 9.5, down_proj 21.8 -> 20.5). With FP8_SWAP_GEMM (on) the same rows take
    the transposed kernel instead, at FP8_SWAP_TILES (past 64 rows FP8_SWAP_WIDE_TILES, and on the
    widest layers past 128 rows FP8_SWAP_TALL_TILES)."""
    wide = num_rows > 64
    if wide and not (FP8_SWAP_GEMM and num_rows <= FP8_SWAP_MAX_ROWS):
        if FP8_TMA_GEMM:
            block_n, block_k, num_warps, num_stages = FP8_TMA_TILES
            return Tiles(128, block_n, block_k, num_warps=num_warps, num_stages=num_stages, tma=True)
        return choose_tiles(num_rows, out_features, triton.cdiv(in_features, 128), 128, device)
    sms = _sms(device)
    block_m = FP8_SWAP_WIDE_ROWS if wide else min(64, max(16, triton.next_power_of_2(num_rows)))
    if FP8_SWAP_GEMM:
        block_n, block_k, num_warps, num_stages = FP8_SWAP_WIDE_TILES if wide else FP8_SWAP_TILES
        row_tiles = triton.cdiv(num_rows, block_m)
        if wide and row_tiles * triton.cdiv(out_features, block_n) > sms:   # more than a wave: twice the outputs
            block_n *= 2
        if wide and row_tiles > 1 and row_tiles * triton.cdiv(out_features, block_n) > 2 * sms:  # bound by the
            block_m, row_tiles = FP8_SWAP_TALL_ROWS, triton.cdiv(num_rows, FP8_SWAP_TALL_ROWS)  # tensor cores: tall
            block_n, block_k, num_warps, num_stages = FP8_SWAP_TALL_TILES
        programs = row_tiles * triton.cdiv(out_features, block_n)
        split_k = _doubling_split(triton.cdiv(in_features, block_k), programs,
                                  (FP8_SWAP_WIDE_PROGRAMS_PER_SM if wide else FP8_SWAP_PROGRAMS_PER_SM) * sms)
        return Tiles(block_m, block_n, block_k, split_k, num_warps=num_warps, num_stages=num_stages, swap=True)
    block_n, block_k, num_stages, programs_per_sm = 64, 128, 4, FP8_GEMM_PROGRAMS_PER_SM
    if block_m >= 32 and triton.cdiv(out_features, 64) >= 2 * sms:
        block_n, num_stages = 128, 3
    elif block_m == 64:
        block_k, programs_per_sm = 256, 1
    split_k = _doubling_split(triton.cdiv(in_features, block_k), triton.cdiv(out_features, block_n),
                              programs_per_sm * sms)
    return Tiles(block_m, block_n, block_k, split_k, num_warps=4, num_stages=num_stages)



# ---- W4A16 -----------------------------------------------------------------------------------

GEMV_MAX_ROWS = 4       # up to this many rows the W4A16 product runs on the FMA units, not tl.dot
GEMV_BLOCK_K = 128      # the GEMV's K step for groups smaller than that (a scale a word): 64 bytes of a row
MAGIC = tl.constexpr(0x4B000000)      # float32 2^23: OR-ing a code q < 2^23 into its mantissa gives the float 2^23 + q
# The W4A16 GEMV's products x q are formed as x 2^(EXP_X - 4 j) times the subnormal q 2^(4 j - 149): each
# is x q 2^(EXP_X - 149), in float32's normal range for |x| from 2^-60 to 2^40 (and exact, as x q is)
EXP_X = 88
X_SCALE = tl.constexpr(2.0 ** EXP_X)
PRODUCT_SCALE = tl.constexpr(2.0 ** (149 - EXP_X))    # back from x q 2^(EXP_X - 149) to x q


@triton.jit
def _code_fma(products, x_scaled, words, plane: tl.constexpr):
    """products + x q for the code q at bits plane..plane + 3 of words (plane < 20), given
    x_scaled = x 2^(EXP_X - plane): see _w4a16_gemv_kernel."""
    w = (words & (0xF << plane)).to(tl.float32, bitcast=True)             # q 2^(plane - 149), exact
    return products + x_scaled * w                                        # x q 2^(EXP_X - 149)


@triton.jit
def _w4_fma(products, x_scaled, words, j: tl.constexpr):
    """products + x q_j for nibble j of words (j >= 5: of words >> 20), given x_scaled = x 2^(EXP_X - 4 (j % 5))."""
    return _code_fma(products, x_scaled, words, 4 * (j % 5))


@triton.jit
def _x_scaled(x, j: tl.constexpr):
    """x 2^(EXP_X - 4 (j % 5)), the x that code j of a word meets in _w4_fma."""
    return x * (X_SCALE / (1 << (4 * (j % 5))))


@triton.jit
def _w4a16_gemv_loads(w_rows, scales_ptr, zeros_ptr, group_rows, mask_n4, offs_run, k0,
                      GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    """The W4A16 GEMV's weights at step k0: words [1, BN, R, RW] and their runs' scales and zeros
    [1, BN, R, 1], as stored: converted where they are used, so that a prefetch does not wait
    for its data."""
    words = tl.load(w_rows + tl.multiple_of(k0 // 8, BLOCK_K // 8), mask=mask_n4, other=0)       # [1, BN, R, RW]
    groups = group_rows + (k0 + offs_run) // GROUP_SIZE                                            # [1, BN, R, 1]
    scale = tl.load(scales_ptr + groups, mask=mask_n4, other=0.0)
    zero = tl.load(zeros_ptr + groups, mask=mask_n4, other=0)
    return words, scale, zero


@triton.jit
def _w4a16_gemv_kernel(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr, M, N, K, stride_x, stride_w,
                       K_PER_SPLIT, GROUP_SIZE: tl.constexpr, ZERO_IS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr,
                       USE_PDL: tl.constexpr = False):
    """A few rows: each step loads [BLOCK_N, BLOCK_K / 8] words, contiguous along K (16-byte
    loads), and for each nibble j multiplies code j of every word by x[k0 + 8 w + j] in float32
    on the FMA units: two instructions a weight, an AND and a fused multiply-add. The AND leaves
    code q where it stands in the word (bits 4 j; nibbles 5..7 from the word shifted down by 20,
    as bit 23 is the exponent's), and those bits, read as a float32, are the subnormal number
    q 2^(4 j) 2^-149, exactly. x is scaled by 2^(4 j') once per x value instead (j' = j, or
    j - 5 from 5 on), times 2^(EXP_X - 4 j') so that each product is x q 2^(EXP_X - 149), a
    normal number. The zero point is taken out per word: sum_k x_k (q_k - z) s =
    s (sum_k x_k q_k - z sum_k x_k), so a word's products and its sum of x meet its group's
    scale once. A step's words are held as R runs of RW words, a run within one group (the whole
    step where it lies in one group; GGUF's groups of 32: four words, a thread's 16-byte load),
    so that each run loads its scale and zero once ([BLOCK_M, BLOCK_N, R, RW] accumulators,
    reduced after the loop). With ZERO_IS_OFFSET (GGUF's w = q s - m) zeros holds the float
    offsets m: sum_k x_k (q_k s - m) = s sum_k x_k q_k - m sum_k x_k. With PREFETCH the loads of
    step k + 1 are issued before step k's multiplications, so that they are in flight meanwhile
    (the loop itself is not pipelined through shared memory: that measured slower). USE_PDL
    (launched with launch_pdl): the kernel waits for the one before it (which wrote x) only after
    loading its first step's weights (with PREFETCH; else at once)."""
    RUN_WORDS: tl.constexpr = (GROUP_SIZE if GROUP_SIZE < BLOCK_K else BLOCK_K) // 8
    RUNS: tl.constexpr = BLOCK_K // 8 // RUN_WORDS
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_word = (RUN_WORDS * tl.arange(0, RUNS)[:, None] + tl.arange(0, RUN_WORDS)[None, :])[None, None, :, :]
    offs_run = 8 * RUN_WORDS * tl.arange(0, RUNS)[None, None, :, None]                            # [1, 1, R, 1]
    mask_m, mask_n = offs_m < M, offs_n < N
    num_groups = K // GROUP_SIZE
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_x + tl.arange(0, BLOCK_K)[None, :]     # [BM, BK]
    w_rows = qweight_ptr + offs_n.to(tl.int64)[None, :, None, None] * stride_w + offs_word        # [1, BN, R, RW]
    group_rows = offs_n.to(tl.int64)[None, :, None, None] * num_groups                           # [1, BN, 1, 1]
    mask_n4 = mask_n[None, :, None, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N, RUNS, RUN_WORDS], dtype=tl.float32)
    k_start = tl.program_id(2) * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    k_first = tl.minimum(k_start, K - BLOCK_K)      # (a split past K loads the last step, and uses nothing)
    if PREFETCH:
        words, scale, zero = _w4a16_gemv_loads(w_rows, scales_ptr, zeros_ptr, group_rows, mask_n4, offs_run,
                                               k_first, GROUP_SIZE, BLOCK_K)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()                   # the kernel before has finished: x is written
        tl.extra.cuda.gdc_launch_dependents()
    if PREFETCH:
        x = tl.load(x_rows + k_first, mask=mask_m[:, None], other=0.0)                             # [BM, BK]
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=1):       # K % BLOCK_K == 0
        if PREFETCH:    # the next step's words are in flight while this step's are multiplied (the last step
            # loads itself again rather than read past its split: no mask along K, so the loads stay 16 bytes wide)
            k_next = tl.minimum(k0 + BLOCK_K, k_end - BLOCK_K)
            words_next, scale_next, zero_next = _w4a16_gemv_loads(w_rows, scales_ptr, zeros_ptr, group_rows, mask_n4,
                                                                  offs_run, k_next, GROUP_SIZE, BLOCK_K)
            x_next = tl.load(x_rows + k_next, mask=mask_m[:, None], other=0.0)
        else:
            words, scale, zero = _w4a16_gemv_loads(w_rows, scales_ptr, zeros_ptr, group_rows, mask_n4, offs_run, k0,
                                                   GROUP_SIZE, BLOCK_K)
            x = tl.load(x_rows + k0, mask=mask_m[:, None], other=0.0)
        high = words >> 20                                                 # nibbles 5, 6, 7 at bits 0, 4, 8
        products = tl.zeros([BLOCK_M, BLOCK_N, RUNS, RUN_WORDS], dtype=tl.float32)
        # x[k0 + 8 w + j] for each j: [BM, 1, R, RW] each, split off the last axis (4 a + 2 b + c)
        x_a0, x_a1 = tl.split(tl.reshape(x.to(tl.float32), [BLOCK_M, 1, RUNS, RUN_WORDS, 2, 4],
                                         can_reorder=False).permute(0, 1, 2, 3, 5, 4))
        x_a0b0, x_a0b1 = tl.split(tl.reshape(x_a0, [BLOCK_M, 1, RUNS, RUN_WORDS, 2, 2]).permute(0, 1, 2, 3, 5, 4))
        x_a1b0, x_a1b1 = tl.split(tl.reshape(x_a1, [BLOCK_M, 1, RUNS, RUN_WORDS, 2, 2]).permute(0, 1, 2, 3, 5, 4))
        x0, x1 = tl.split(x_a0b0)
        x2, x3 = tl.split(x_a0b1)
        x4, x5 = tl.split(x_a1b0)
        x6, x7 = tl.split(x_a1b1)
        products = _w4_fma(products, _x_scaled(x0, 0), words, 0)
        products = _w4_fma(products, _x_scaled(x1, 1), words, 1)
        products = _w4_fma(products, _x_scaled(x2, 2), words, 2)
        products = _w4_fma(products, _x_scaled(x3, 3), words, 3)
        products = _w4_fma(products, _x_scaled(x4, 4), words, 4)
        products = _w4_fma(products, _x_scaled(x5, 5), high, 5)
        products = _w4_fma(products, _x_scaled(x6, 6), high, 6)
        products = _w4_fma(products, _x_scaled(x7, 7), high, 7)
        x_sum = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
        scale_f, zero_f = scale.to(tl.float32), zero.to(tl.float32)
        acc += products * (scale_f * PRODUCT_SCALE)
        acc -= x_sum * (zero_f if ZERO_IS_OFFSET else zero_f * scale_f)
        if PREFETCH:
            words, scale, zero = words_next, scale_next, zero_next
            x = x_next
    _store_tile(tl.sum(tl.sum(acc, axis=3), axis=2), bias_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n, M, N, HAS_BIAS)


@triton.jit
def _x_word_pairs(pointers):
    """The eight 16-bit values at each of pointers (16 bytes, aligned) as four int32 pairs, loaded by every
    thread that holds the pointer: a [1, T, 4] tensor takes the layout of the words it meets, where a
    tl.load of so few values would spread them one a thread, to be moved through shared memory."""
    return tl.inline_asm_elementwise("ld.global.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l", [pointers],
                                     dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=False, pack=1)


@triton.jit
def _bf16_pair(pair):
    """The two bfloat16 values of an int32 pair as float32 (exactly): the low half, then the high half."""
    return (pair << 16).to(tl.float32, bitcast=True), (pair & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _row_fma(products, x, words, plane: tl.constexpr):
    """_code_fma with x scaled here by 2^(EXP_X - plane)."""
    return _code_fma(products, x * (X_SCALE / (1 << plane)), words, plane)


@triton.jit
def _row_gemv_x(x_words, k0, X_PAIRS: tl.constexpr):
    """x[k0 + 8 w + j], j = 0..7, float32 [1, T, 4] each, for the words w of x_words (x + 8 w)."""
    if X_PAIRS:
        p0, p1, p2, p3 = _x_word_pairs(x_words + k0)
        x0, x1 = _bf16_pair(p0)
        x2, x3 = _bf16_pair(p1)
        x4, x5 = _bf16_pair(p2)
        x6, x7 = _bf16_pair(p3)
    else:
        x0 = tl.load(x_words + k0).to(tl.float32)
        x1 = tl.load(x_words + k0 + 1).to(tl.float32)
        x2 = tl.load(x_words + k0 + 2).to(tl.float32)
        x3 = tl.load(x_words + k0 + 3).to(tl.float32)
        x4 = tl.load(x_words + k0 + 4).to(tl.float32)
        x5 = tl.load(x_words + k0 + 5).to(tl.float32)
        x6 = tl.load(x_words + k0 + 6).to(tl.float32)
        x7 = tl.load(x_words + k0 + 7).to(tl.float32)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _row_gemv_loads(w_rows, group_ptrs, scales_ptr, zeros_ptr, mask_w, k0, GROUP_SIZE: tl.constexpr):
    """Step k0's words [BN, W] and their groups' scales and zero points (or offsets), as stored: [BN, 1],
    or [BN, T] for groups smaller than a step (each thread's four words lie in one)."""
    words = tl.load(w_rows + tl.multiple_of(k0 // 8, 16), mask=mask_w, other=0)                   # [BN, W]
    scale = tl.load(scales_ptr + group_ptrs + k0 // GROUP_SIZE, mask=mask_w, other=0.0)
    zero = tl.load(zeros_ptr + group_ptrs + k0 // GROUP_SIZE, mask=mask_w, other=0)
    return words, scale, zero


@triton.jit
def _w4a16_row_gemv_kernel(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr, N, K, stride_w, K_PER_SPLIT,
                           GROUP_SIZE: tl.constexpr, ZERO_IS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, X_PAIRS: tl.constexpr,
                           GATED: tl.constexpr = False, USE_PDL: tl.constexpr = False,
                           LATE_DEPENDENTS: tl.constexpr = False):
    """One row of x, groups that a step lies in or that a thread's 32 weights lie in: _w4a16_gemv_kernel's
    arithmetic (an AND and a fused multiply-add a weight), laid out so that x costs little. A step loads
    [BLOCK_N, BLOCK_K / 8] words as [BN, T, 4]: T = BLOCK_K / 32 threads along K, four words (16 bytes)
    each, and each thread holds the same four words of many rows (BLOCK_N / (32 / T) / num_warps), so the
    x values of its words, their scaling and their sum are made once a step for all those rows. The
    products of a row's four words are added up in the thread before they meet their group's scale and
    zero point (or GGUF's offset, ZERO_IS_OFFSET), once a row. With X_PAIRS (bfloat16 x on a GPU) each
    thread loads its words' x as 16-byte pairs itself (_x_word_pairs). GATED (gate_up_proj, unsplit, no
    bias): the weight is [gate | up], 2 N rows; the program's rows pair gate row n with up row N + n, and
    it writes silu(gate) * up [1, N], each rounded to out's dtype where silu_and_mul would round it, so
    no SiLU-and-mul kernel follows. USE_PDL: the first step's weights are loaded before waiting for the
    kernel that writes x; the next kernel may launch from then on, or with LATE_DEPENDENTS once the
    loop is done."""
    T: tl.constexpr = BLOCK_K // 32
    if GATED:       # rows 2 j and 2 j + 1: gate row n_j and up row N + n_j, n_j = the program's output j
        offs_out = tl.program_id(1) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N) // 2
        offs_n = offs_out + (tl.arange(0, BLOCK_N) % 2) * N
    else:
        offs_out = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_n = offs_out
    mask_w = (offs_out < N)[:, None]
    w_rows = qweight_ptr + offs_n.to(tl.int64)[:, None] * stride_w + tl.arange(0, BLOCK_K // 8)[None, :]   # [BN, W]
    group_ptrs = (offs_n.to(tl.int64) * (K // GROUP_SIZE))[:, None]                                # [BN, 1]
    if GROUP_SIZE < BLOCK_K:        # groups smaller than a step: thread t's 32 weights lie in one, [BN, T]
        group_ptrs += tl.arange(0, T)[None, :] * 32 // GROUP_SIZE
    offs_word = (4 * tl.arange(0, T)[:, None] + tl.arange(0, 4)[None, :])[None, :, :]              # [1, T, 4]
    x_words = x_ptr + 8 * offs_word                                                                # [1, T, 4]
    acc = tl.zeros([BLOCK_N, T, 1], dtype=tl.float32)
    k_start = tl.program_id(2) * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    k_first = tl.minimum(k_start, K - BLOCK_K)      # (a split past K loads the last step, and uses nothing)
    words, scale, zero = _row_gemv_loads(w_rows, group_ptrs, scales_ptr, zeros_ptr, mask_w, k_first, GROUP_SIZE)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()                   # the kernel before has finished: x is written
        if not LATE_DEPENDENTS:
            tl.extra.cuda.gdc_launch_dependents()
    x0, x1, x2, x3, x4, x5, x6, x7 = _row_gemv_x(x_words, k_first, X_PAIRS)
    for k0 in range(k_start, k_end, BLOCK_K):       # K % BLOCK_K == 0
        # the next step's loads are in flight while this step's are multiplied (the last loads itself again)
        k_next = tl.minimum(k0 + BLOCK_K, k_end - BLOCK_K)
        words_next, scale_next, zero_next = _row_gemv_loads(w_rows, group_ptrs, scales_ptr, zeros_ptr, mask_w,
                                                            k_next, GROUP_SIZE)
        n0, n1, n2, n3, n4, n5, n6, n7 = _row_gemv_x(x_words, k_next, X_PAIRS)
        words = tl.reshape(words, [BLOCK_N, T, 4])
        high = words >> 12                          # nibbles 5, 6, 7 at bits 8, 12, 16: none at bit 0, so one AND each
        products = _row_fma(tl.zeros([BLOCK_N, T, 4], dtype=tl.float32), x0, words, 0)
        products = _row_fma(products, x1, words, 4)
        products = _row_fma(products, x2, words, 8)
        products = _row_fma(products, x3, words, 12)
        products = _row_fma(products, x4, words, 16)
        products = _row_fma(products, x5, high, 8)
        products = _row_fma(products, x6, high, 12)
        products = _row_fma(products, x7, high, 16)
        x_sum = tl.sum(((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7)), axis=2, keep_dims=True)   # [1, T, 1]
        scale_f = scale.to(tl.float32)[:, :, None]                                                # [BN, 1, 1]
        acc += tl.sum(products, axis=2, keep_dims=True) * (scale_f * PRODUCT_SCALE)
        acc -= x_sum * (zero.to(tl.float32)[:, :, None] * (1.0 if ZERO_IS_OFFSET else scale_f))
        words, scale, zero = words_next, scale_next, zero_next
        x0, x1, x2, x3, x4, x5, x6, x7 = n0, n1, n2, n3, n4, n5, n6, n7
    if USE_PDL and LATE_DEPENDENTS:
        tl.extra.cuda.gdc_launch_dependents()
    out = tl.sum(tl.sum(acc, axis=2), axis=1)                                                      # [BN]
    if GATED:
        gate, up = tl.split(tl.reshape(out, [BLOCK_N // 2, 2]))                                      # [BN / 2] each
        gate = gate.to(out_ptr.dtype.element_ty).to(tl.float32)
        up = up.to(out_ptr.dtype.element_ty).to(tl.float32)
        offs_out = tl.program_id(1) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        out = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32) * up
    _store_tile(out[None, :], bias_ptr, out_ptr, tl.arange(0, 1), offs_out, tl.arange(0, 1) < 1, offs_out < N, 1, N,
                HAS_BIAS)


def _planes_asm(magic: str, sub: str) -> str:
    """PTX for _w4a16_planes: two words a and b ($8, $9) -> the eight registers (m + q_j(a) - o,
    m + q_j(b) - o) as 16-bit pairs ($0..$7, nibble j of both words), o = m + z the pair $10."""
    lines = ["{", ".reg .b32 lo, hi, t, mask, magic;", "mov.b32 mask, 0x000F000F;", f"mov.b32 magic, {magic};",
             "prmt.b32 lo, $8, $9, 0x5410;",      # the low halves of a and b: nibbles 0..3 of each
             "prmt.b32 hi, $8, $9, 0x7632;"]      # the high halves: nibbles 4..7
    for j in range(8):
        half = "lo" if j < 4 else "hi"
        shift = 4 * (j % 4)
        if shift:
            lines.append(f"shr.b32 t, {half}, {shift};")
        lines.append(f"lop3.b32 t, {'t' if shift else half}, mask, magic, 0xEA;")     # (t & mask) | magic
        lines.append(f"{sub} ${j}, t, $10;")
    return "\n".join(lines + ["}"])


# The codes of nibble j of two words, OR-ed into the mantissa of a 16-bit float m (bfloat16 128, float16 1024,
# whose last mantissa bit is 1), read m + q; minus m + z it is q - z, exact (|q - z| <= 15)
PLANES_ASM_BF16 = tl.constexpr(_planes_asm("0x43004300", "sub.rn.bf16x2"))
PLANES_ASM_F16 = tl.constexpr(_planes_asm("0x64006400", "sub.rn.f16x2"))


@triton.jit
def _w4a16_plane(words, zero, j: tl.constexpr, DTYPE: tl.constexpr):
    """q_j - z in DTYPE for nibble j of words [BN, W] (zero [BN, 1] float32): _w4a16_planes' arithmetic,
    one element at a time (the interpreter's: it runs no PTX)."""
    return (((words >> (4 * j)) & 0xF).to(tl.float32) - zero).to(DTYPE)


@triton.jit
def _w4a16_planes(words, zero, DTYPE: tl.constexpr, USE_ASM: tl.constexpr):
    """The eight [BN, W] tiles q_j - z of words [BN, W] int32, nibble j of each (zero [BN, 1] float32
    zero points), exact in DTYPE (16 bits). USE_ASM: two words a register, so that a shift, a LOP3
    and a packed subtraction make two weights, after two PRMTs a pair of words: see _planes_asm."""
    if USE_ASM:
        if DTYPE == tl.bfloat16:
            planes = tl.inline_asm_elementwise(PLANES_ASM_BF16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r",
                                               [words, tl.broadcast_to((128.0 + zero).to(DTYPE), words.shape)],
                                               dtype=(tl.bfloat16,) * 8, is_pure=True, pack=2)
        else:
            planes = tl.inline_asm_elementwise(PLANES_ASM_F16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r",
                                               [words, tl.broadcast_to((1024.0 + zero).to(DTYPE), words.shape)],
                                               dtype=(tl.float16,) * 8, is_pure=True, pack=2)
    else:
        planes = (_w4a16_plane(words, zero, 0, DTYPE), _w4a16_plane(words, zero, 1, DTYPE),
                  _w4a16_plane(words, zero, 2, DTYPE), _w4a16_plane(words, zero, 3, DTYPE),
                  _w4a16_plane(words, zero, 4, DTYPE), _w4a16_plane(words, zero, 5, DTYPE),
                  _w4a16_plane(words, zero, 6, DTYPE), _w4a16_plane(words, zero, 7, DTYPE))
    return planes


@triton.jit
def _x_planes(x, BLOCK_M: tl.constexpr, WORDS: tl.constexpr):
    """x [BM, BK] -> the eight [BM, W] planes x[:, 8 w + j], j = 0..7 (split off the last axis, 4 a + 2 b + c)."""
    x_a0, x_a1 = tl.split(tl.reshape(x, [BLOCK_M, WORDS, 2, 4], can_reorder=False).permute(0, 1, 3, 2))
    x_a0b0, x_a0b1 = tl.split(tl.reshape(x_a0, [BLOCK_M, WORDS, 2, 2]).permute(0, 1, 3, 2))
    x_a1b0, x_a1b1 = tl.split(tl.reshape(x_a1, [BLOCK_M, WORDS, 2, 2]).permute(0, 1, 3, 2))
    x0, x1 = tl.split(x_a0b0)
    x2, x3 = tl.split(x_a0b1)
    x4, x5 = tl.split(x_a1b0)
    x6, x7 = tl.split(x_a1b1)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _prefetch_l2(pointers):
    """Ask L2 for the lines at pointers, keeping nothing in registers (a load would wait for them)."""
    return tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [pointers],
                                     dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_lines_l2(qweight_ptr, offs_n, mask_n, stride_w, k0, k_end, LINES: tl.constexpr):
    """Ask L2 for LINES 128-byte lines of 4-bit words of each row n (mask_n) from K position k0 on,
    256 weights a line, those that start before k_end."""
    line = tl.arange(0, LINES)[None, :]
    lines = qweight_ptr + offs_n.to(tl.int64)[:, None] * stride_w + k0 // 8 + 32 * line                # [BN, LINES]
    _prefetch_l2(tl.where(mask_n[:, None] & (k0 + 256 * line < k_end), lines, qweight_ptr))


@triton.jit
def _w4a16_dot_gemv_kernel(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr, M, N, K, stride_x,
                           stride_w, K_PER_SPLIT, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           USE_ASM: tl.constexpr, USE_PDL: tl.constexpr = False):
    """A few rows on the tensor cores (x padded to BLOCK_M = 16 rows with zeros). A step loads
    [BLOCK_N, BLOCK_K / 8] words, as the GEMV does, and cuts them into eight planes: plane j holds
    code j of every word, the weights of columns 8 w + j. Plane j times x's columns 8 w + j is a
    tl.dot over W = BLOCK_K / 8 (16 at BLOCK_K 128), and the eight dots add up to the step's
    product: the order of K inside a dot is free, so the words need no repacking and no shuffle
    into tl.dot's layout beyond what a load gives (the layout is the words', not the weights').
    Each plane is q - z exactly in 16 bits (_w4a16_planes); the step's sum, in float32, meets
    the group's scale once (BLOCK_K divides the group). So the weight is not rounded: the result
    is the reference's given float32 x, to float32 rounding. USE_PDL: this split's first weights
    are asked of L2 before waiting for the kernel that writes x."""
    WORDS: tl.constexpr = BLOCK_K // 8
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_word = tl.arange(0, WORDS)
    mask_m, mask_n = offs_m < M, offs_n < N
    num_groups = K // GROUP_SIZE
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_x + tl.arange(0, BLOCK_K)[None, :]      # [BM, BK]
    w_rows = qweight_ptr + offs_n.to(tl.int64)[:, None] * stride_w + offs_word[None, :]             # [BN, W]
    group_rows = offs_n.to(tl.int64) * num_groups                                                # [BN]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_start = tl.program_id(2) * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    if USE_PDL:     # the first four steps' words: a 128-byte line a row for two steps
        _prefetch_lines_l2(qweight_ptr, offs_n, mask_n, stride_w, k_start, k_end, 2)
        tl.extra.cuda.gdc_wait()                   # the kernel before has finished: x is written
        tl.extra.cuda.gdc_launch_dependents()
    for k0 in range(k_start, k_end, BLOCK_K):       # K % BLOCK_K == 0
        words = tl.load(w_rows + tl.multiple_of(k0 // 8, WORDS), mask=mask_n[:, None], other=0)    # [BN, W]
        group = k0 // GROUP_SIZE
        scale = tl.load(scales_ptr + group_rows + group, mask=mask_n, other=0.0)                   # [BN]
        zero = tl.load(zeros_ptr + group_rows + group, mask=mask_n, other=0).to(tl.float32)        # [BN]
        x = tl.load(x_rows + k0, mask=mask_m[:, None], other=0.0)                                  # [BM, BK]
        x0, x1, x2, x3, x4, x5, x6, x7 = _x_planes(x, BLOCK_M, WORDS)                              # [BM, W] each
        w0, w1, w2, w3, w4, w5, w6, w7 = _w4a16_planes(words, zero[:, None], x.dtype, USE_ASM)      # [BN, W] each
        step = tl.dot(x0, tl.trans(w0))
        step = tl.dot(x1, tl.trans(w1), step)
        step = tl.dot(x2, tl.trans(w2), step)
        step = tl.dot(x3, tl.trans(w3), step)
        step = tl.dot(x4, tl.trans(w4), step)
        step = tl.dot(x5, tl.trans(w5), step)
        step = tl.dot(x6, tl.trans(w6), step)
        step = tl.dot(x7, tl.trans(w7), step)                                                      # [BM, BN]
        acc += step * scale.to(tl.float32)[None, :]
    _store_tile(acc, bias_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n, M, N, HAS_BIAS)


@triton.jit
def _w4a16_gemm_kernel(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr, M, N, K, stride_x, stride_w,
                       K_PER_SPLIT, GROUP_SIZE: tl.constexpr, ZERO_IS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """More rows: each step expands [BLOCK_N, BLOCK_K / 8] words into the [BLOCK_N, BLOCK_K]
    16-bit tile in registers and hands it to tl.dot. The eight nibble planes are joined
    pairwise (tl.join puts its new axis last, innermost), so that the reshape lays code j of
    word w at column 8 w + j without moving data between threads. With ZERO_IS_OFFSET the tile is
    q s - m, m the group's float offset (zeros)."""
    WORDS: tl.constexpr = BLOCK_K // 8
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_word = tl.arange(0, WORDS)
    mask_m, mask_n = offs_m < M, offs_n < N
    num_groups = K // GROUP_SIZE
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_x + offs_k[None, :]                   # [BM, BK]
    w_rows = qweight_ptr + offs_n.to(tl.int64)[:, None] * stride_w + offs_word[None, :]             # [BN, W]
    group_rows = offs_n.to(tl.int64) * num_groups                                                # [BN]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_start = tl.program_id(2) * K_PER_SPLIT
    for k0 in range(k_start, tl.minimum(k_start + K_PER_SPLIT, K), BLOCK_K):       # K % BLOCK_K == 0
        x = tl.load(x_rows + k0, mask=mask_m[:, None], other=0.0)                                  # [BM, BK]
        words = tl.load(w_rows + tl.multiple_of(k0 // 8, WORDS), mask=mask_n[:, None], other=0)    # [BN, W]
        # slot a + 2b + 4c of the joins lands at column 4a + 2b + c of its word: nibble 4a + 2b + c
        codes = tl.join(tl.join(tl.join(words & 0xF, (words >> 16) & 0xF),
                                tl.join((words >> 8) & 0xF, (words >> 24) & 0xF)),
                        tl.join(tl.join((words >> 4) & 0xF, (words >> 20) & 0xF),
                                tl.join((words >> 12) & 0xF, (words >> 28) & 0xF)))               # [BN, W, 2, 2, 2]
        codes = tl.reshape(codes, (BLOCK_N, BLOCK_K))                                              # code of k0 + k
        group = k0 // GROUP_SIZE
        scale = tl.load(scales_ptr + group_rows + group, mask=mask_n, other=0.0).to(tl.float32)    # [BN]
        zero = tl.load(zeros_ptr + group_rows + group, mask=mask_n, other=0).to(tl.float32)        # [BN]
        if ZERO_IS_OFFSET:
            w = (codes | MAGIC).to(tl.float32, bitcast=True) - 8388608.0                           # q, exact
            w = w * scale[:, None] - zero[:, None]                                                 # q s - m
        else:
            w = (codes | MAGIC).to(tl.float32, bitcast=True) - (8388608.0 + zero)[:, None]         # q - z, exact
            w = w * scale[:, None]
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)                                              # [BN, BK] -> 16 bits
    _store_tile(acc, bias_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n, M, N, HAS_BIAS)


def choose_w4a16_tiles(num_rows: int, out_features: int, k_steps: int, block_k: int, device: torch.device) -> Tiles:
    """choose_tiles, but up to GEMV_MAX_ROWS rows a GEMV tile: all the rows, BLOCK_N 64 (32 above
    two rows, where each thread keeps a partial sum per row), K split up to 8 ways while the
    programs stay within GEMV_PROGRAMS_PER_SM per SM. Measured on an H200 at one row
    (tools/quant_gemv_probe.py --sweep): Llama-3.1-8B's down_proj 29.4 us at 4 splits, 21.4 at 8."""
    if num_rows > GEMV_MAX_ROWS:
        return choose_tiles(num_rows, out_features, k_steps, block_k, device)
    sms = _sms(device)
    block_n = 64 if num_rows <= 2 else 32
    split_k = _doubling_split(min(k_steps, GEMV_MAX_SPLITS), triton.cdiv(out_features, block_n),
                              GEMV_PROGRAMS_PER_SM * sms)
    return Tiles(triton.next_power_of_2(num_rows), block_n, block_k, split_k, num_warps=4, num_stages=3,
                 prefetch=GEMV_PREFETCH)


# One row of a layer steps [8, 512] or [16, 512] where that measured faster than choose_w4a16_tiles'
# [64, 128] (tools/quant_gemv_probe.py; on an H200, microseconds, against the tiles before), K split in
# two past 8 steps. Longer runs of a row's words a step keep more bytes in flight: a kernel that only
# loaded the words (tools/gemv_loads_probe.py) read Llama-3.1-8B's down_proj at 1.9 TB/s in [64, 128]
# steps, 3.0 in [16, 512].
# - Groups smaller than a step (GGUF's 32: runs of four words, each with its scale and offset), every
#   layer: [8, 512], [16, 512] past 6,144 outputs. Llama-3.1-8B qkv_proj 20.0 -> 12.1, o_proj 15.0 -> 7.8,
#   gate_up_proj 75.5 -> 48.6, down_proj 36.9 -> 23.3, LM head 264 -> 203; Llama-3.2-1B qkv_proj 5.4 -> 4.2,
#   gate_up_proj 27.5 -> 17.1, down_proj 11.9 -> 9.6. The sweep timed [8, 512] on the wide layers
#   faster still (gate_up_proj 38.4, the LM head 159), and so it is on every layer now: batch-1 decode
#   on an H100, in one run, Llama-3.2-1B 1,014 -> 1,088 tok/s, Llama-3.1-8B 271 -> 289.
# - Groups of 128 and more: layers of at most 3,072 outputs and 16 steps, [16, 512]. Llama-3.2-1B
#   qkv_proj 6.3 -> 3.7, o_proj 5.8 -> 3.2, and its batch-1 decode 1,347 -> 1,416 tok/s. Llama-3.1-8B's
#   o_proj took 6.9 against 9.1 us alone, yet its decode fell from 377 to 370 tok/s (not traced), so it
#   keeps the wider tile, as wider layers and longer K do.
LONG_GEMV_BLOCK_K = 512
LONG_GEMV_NARROW_OUTPUTS = 1 << 20  # groups smaller than a step: 8 outputs a program up to here (every
                                    # layer; 6,144 before), 16 beyond
LONG_GEMV_MAX_OUTPUTS = 3072        # groups of 128 and more: the widest layer that steps [16, 512]
LONG_GEMV_MAX_STEPS = 16            # groups of 128 and more: the most steps a layer may take


def long_w4a16_gemv_tiles(num_rows: int, out_features: int, in_features: int, group_size: int) -> Tiles | None:
    """The long-step tiles above for one row, or None where the layer keeps choose_w4a16_tiles'."""
    block_k = LONG_GEMV_BLOCK_K
    steps = in_features // block_k
    small_groups = group_size < GEMV_BLOCK_K
    if (num_rows != 1 or in_features % block_k or not step_holds_groups(block_k, group_size)
            or not small_groups and (out_features > LONG_GEMV_MAX_OUTPUTS or steps > LONG_GEMV_MAX_STEPS)):
        return None
    block_n = 8 if small_groups and out_features <= LONG_GEMV_NARROW_OUTPUTS else 16
    return Tiles(1, block_n, block_k, 2 if steps > 8 else 1, num_warps=4, num_stages=1, prefetch=GEMV_PREFETCH)


def choose_w4a16_dot_tiles(num_rows: int, out_features: int, k_steps: int, device: torch.device) -> Tiles:
    """The tiles of _w4a16_dot_gemv_kernel: the rows padded to 16, DOT_GEMV_BLOCK_N outputs, steps
    of 128 along K, K split up to 8 ways while the programs stay within GEMV_PROGRAMS_PER_SM an SM
    and each split keeps at least DOT_GEMV_MIN_STEPS steps (twice that where the outputs alone give
    half as many programs as SMs). Measured on an H200 at 4 rows (tools/w4a16_probe.py): Llama-3.2-1B's
    gate_up_proj 15.4 us unsplit, 16.6 in 2, 19.3 in 4; Llama-3.1-8B's 64.3, 51.7, 48.3; its
    down_proj 97.7 unsplit, 26.9 in 8."""
    sms = _sms(device)
    programs, target = triton.cdiv(out_features, DOT_GEMV_BLOCK_N), GEMV_PROGRAMS_PER_SM * sms
    min_steps = DOT_GEMV_MIN_STEPS * (2 if 2 * programs >= sms else 1)
    split_k = _doubling_split(min(k_steps // min_steps, GEMV_MAX_SPLITS), programs, target)
    return Tiles(16, DOT_GEMV_BLOCK_N, GEMV_BLOCK_K, split_k, num_warps=4, num_stages=3, planes=True)


def takes_w4a16_dot_gemv(x: torch.Tensor, zeros: torch.Tensor, group_size: int) -> bool:
    """Whether a product takes _w4a16_dot_gemv_kernel: DOT_GEMV_MIN_ROWS to DOT_GEMV_MAX_ROWS rows of
    16-bit x, integer zero points, and groups that steps of 128 divide."""
    return (DOT_GEMV_MIN_ROWS <= x.shape[0] <= DOT_GEMV_MAX_ROWS and x.dtype in (torch.bfloat16, torch.float16)
            and not zeros.is_floating_point() and group_size % GEMV_BLOCK_K == 0)


# The tensor-core GEMV's rows. One and two rows stay on the FMA GEMV: on an H200 the tensor-core one
# took 42.3 against 32.1 us at Llama-3.1-8B's gate_up_proj at one row, 48.7 against 47.0 at two, and
# 48.2 against 105.3 at three (tools/w4a16_probe.py); it costs the same at 3 rows as at 16
DOT_GEMV_MIN_ROWS = 3
DOT_GEMV_MAX_ROWS = 16
DOT_GEMV_BLOCK_N = 128
DOT_GEMV_MIN_STEPS = 4
GEMV_MAX_SPLITS = 8
# The W4A16 GEMV loads each next step's words ahead (Tiles.prefetch). On an H200: Llama-3.1-8B batch-1
# decode 350 against 341 tok/s without, up to 10% on a layer (tools/quant_gemv_probe.py --sweep).
GEMV_PREFETCH = True


# One row of W4A16 on a layer of more than ROW_GEMV_MIN_WEIGHTS weights: _w4a16_row_gemv_kernel, steps of
# ROW_GEMV_BLOCK_K (16 threads along K at 512, two rows of lanes), ROW_GEMV_ROWS rows a thread, ROW_GEMV_WARPS
# warps, K split while the programs stay within ROW_GEMV_PROGRAMS_PER_SM an SM. Measured on an H200
# (tools/gpu_row_gemv.sh; layers alone, weights cycled past L2): Llama-3.1-8B w4a16 gate_up_proj 31.6 -> 24.0 us,
# down_proj 19.5 -> 17.3, qkv_proj 10.9 -> 10.5, but o_proj 8.8 -> 10.0 and Llama-3.2-1B's qkv_proj and o_proj
# half again slower (hence the threshold); GGUF's layout 8B gate_up_proj 38.5 -> 32.1. Batch-1 decode in one
# call: Llama-3.1-8B w4a16 382 -> 392 tok/s, gguf-q4_k 304 -> 325, Llama-3.2-1B w4a16 1,429 -> 1,488. At steps
# of 128 it was slower (8B w4a16 382 -> 334): fewer instructions alone did not pay, longer runs of a row did.
# K is split to 16 programs an SM, not 32 (fewer splits: Llama-3.1-8B's qkv_proj in 2, down_proj in 4;
# Llama-3.2-1B's gate_up_proj not at all): a decode step's GPU time on an H100 (tools/decode_ab_probe.py)
# 2,697 -> 2,520 us at 8B w4a16, 3,272 -> 3,124 at 8B gguf-q4_k, 678 -> 665 at 1B w4a16 (12 and 24 an SM:
# between), and `bench latency` in one call 368 -> 392 tok/s, 292 -> 305 and 1,422 -> 1,464.
ROW_GEMV = True
ROW_GEMV_BLOCK_K = 512
ROW_GEMV_ROWS = 4
ROW_GEMV_WARPS = 1
ROW_GEMV_PROGRAMS_PER_SM = 16
ROW_GEMV_MIN_WEIGHTS = 1 << 24
# gate_up_proj's gated row GEMV lets down_proj's GEMV launch (PDL) once its loop is done, not at its
# start, where its grid fits in one wave (ROW_GEMV_PROGRAMS_PER_SM an SM): launched at the start, the
# next grid's programs arrive while all of this one's still run, and Llama-3.2-1B w4a16's batch-1 step
# took 730 us against 620 (NVIDIA H100). Over more than one wave the start is better: the next grid
# arrives with the last wave (Llama-3.1-8B w4a16 2,354 against 2,387 us). tools/decode_ab_probe.py.
GATED_LATE_IN_ONE_WAVE = True


def _one_wave(grid: tuple[int, int, int], device: torch.device) -> bool:
    """Whether a row GEMV's grid fits in one wave of ROW_GEMV_PROGRAMS_PER_SM programs an SM."""
    return grid[0] * grid[1] * grid[2] <= ROW_GEMV_PROGRAMS_PER_SM * _sms(device)


def row_gemv_holds_groups(block_k: int, group_size: int) -> bool:
    """Whether _w4a16_row_gemv_kernel's steps of block_k hold these groups: whole groups a step, or a step
    inside one, with a thread's 32 weights never across two (groups smaller than a step: multiples of 32)."""
    return step_holds_groups(block_k, group_size) and (group_size >= block_k or group_size % 32 == 0)


def loads_x_pairs(x: torch.Tensor) -> bool:
    """Whether the row GEMV's threads load x as 16-byte pairs in PTX: bfloat16 on a GPU, 16-byte aligned."""
    return x.is_cuda and x.dtype == torch.bfloat16 and x.data_ptr() % 16 == 0


def takes_w4a16_row_gemv(x: torch.Tensor, zeros: torch.Tensor, group_size: int) -> bool:
    """Whether a product takes _w4a16_row_gemv_kernel: one row of 16-bit x (bfloat16 on a GPU, where
    each thread loads its x in 16 bytes) on a layer of more than ROW_GEMV_MIN_WEIGHTS weights, with
    integer zero points in groups that its steps divide or that divide them, or groups of 32 (GGUF's
    4-bit layouts, with offsets or zero points)."""
    block_k = ROW_GEMV_BLOCK_K
    return (ROW_GEMV and x.shape[0] == 1 and x.shape[1] % block_k == 0
            and zeros.shape[0] * x.shape[1] > ROW_GEMV_MIN_WEIGHTS
            and row_gemv_holds_groups(block_k, group_size) and (not zeros.is_floating_point() or group_size == 32)
            and (loads_x_pairs(x) if x.is_cuda else x.dtype in (torch.bfloat16, torch.float16, torch.float32)))


def choose_w4a16_row_tiles(out_features: int, k_steps: int, device: torch.device, rows: int | None = None,
                           warps: int | None = None, programs_per_sm: int | None = None,
                           block_k: int | None = None) -> Tiles:
    """The tiles of _w4a16_row_gemv_kernel: (32 / (block_k / 32)) lanes along N times `rows` a thread
    times `warps` outputs a program, K split up to GEMV_MAX_SPLITS ways while the programs stay within
    programs_per_sm an SM (the ROW_GEMV_ settings where not given)."""
    rows, warps = rows or ROW_GEMV_ROWS, warps or ROW_GEMV_WARPS
    programs_per_sm, block_k = programs_per_sm or ROW_GEMV_PROGRAMS_PER_SM, block_k or ROW_GEMV_BLOCK_K
    sms = _sms(device)
    block_n = 32 * 32 // block_k * rows * warps
    split_k = _doubling_split(min(k_steps, GEMV_MAX_SPLITS), triton.cdiv(out_features, block_n), programs_per_sm * sms)
    return Tiles(1, block_n, block_k, split_k, num_warps=warps, num_stages=1, row_gemv=True)


def w4a16_linear_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K], qweight [N, K / 8] int32, scales [N, G], zeros [N, G] uint8 (or float32 offsets),
    bias [N] or None -> [M, N]."""
    return sum_partials(w4a16_linear_partials_triton(x, qweight, scales, zeros, bias), x.dtype)


def w4a16_linear_partials_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """As w4a16_linear_triton, but with K split: the float32 partial products [S, M, N]."""
    (num_rows, in_features), (out_features, num_groups) = x.shape, scales.shape
    group_size = in_features // num_groups
    block_k = w4a16_block_k(group_size)
    if block_k == 0:
        raise ValueError(f"a group of {group_size} does not split into tiles of at least 16; "
                         "w4a16_linear runs such weights through the torch reference")
    if num_rows == 0:
        return torch.empty(0, out_features, dtype=x.dtype, device=x.device)
    if takes_w4a16_dot_gemv(x, zeros, group_size):
        tiles = choose_w4a16_dot_tiles(num_rows, out_features, in_features // GEMV_BLOCK_K, x.device)
        return w4a16_linear_tiles(x, qweight, scales, zeros, bias, tiles)
    if takes_w4a16_row_gemv(x, zeros, group_size):
        tiles = choose_w4a16_row_tiles(out_features, in_features // ROW_GEMV_BLOCK_K, x.device)
        return w4a16_linear_tiles(x, qweight, scales, zeros, bias, tiles)
    long_tiles = long_w4a16_gemv_tiles(num_rows, out_features, in_features, group_size)
    if long_tiles is not None:
        return w4a16_linear_tiles(x, qweight, scales, zeros, bias, long_tiles)
    if (num_rows <= GEMV_MAX_ROWS and block_k < GEMV_BLOCK_K and in_features % GEMV_BLOCK_K == 0
            and step_holds_groups(GEMV_BLOCK_K, group_size)):
        block_k = GEMV_BLOCK_K      # the GEMV spans several small groups a step (runs of a group's words)
    tiles = choose_w4a16_tiles(num_rows, out_features, in_features // block_k, block_k, x.device)
    return w4a16_linear_tiles(x, qweight, scales, zeros, bias, tiles)


def w4a16_linear_silu_and_mul_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                                     zeros: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """silu_and_mul(w4a16_linear_triton(x, ...)) in one kernel, for gate_up_proj's [gate | up] weight
    [2 I, K / 8] -> [1, I]: the one-row GEMV with the SiLU in its epilogue, where that GEMV takes x and
    the layer unsplit (FUSED_SILU); else None, and the caller runs the product and SiLU-and-mul."""
    in_features, (out_features, num_groups) = x.shape[1], scales.shape
    if not (FUSED_SILU and bias is None and takes_w4a16_row_gemv(x, zeros, in_features // num_groups)):
        return None
    tiles = choose_w4a16_row_tiles(out_features, in_features // ROW_GEMV_BLOCK_K, x.device)
    if tiles.split_k > 1:
        return None
    return w4a16_linear_tiles(x, qweight, scales, zeros, None, tiles, gated=True)


def w4a16_linear_tiles(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                       bias: torch.Tensor | None, tiles: Tiles, gated: bool = False) -> torch.Tensor:
    """The product with the tiles given (tiles.block_k must divide the group, or for the GEMV be a
    multiple of it; tiles.planes takes the tensor-core GEMV, else a block_m up to GEMV_MAX_ROWS the
    GEMV kernel): [M, N] in x's dtype, or with K split the partials [S, M, N] float32. gated (the
    one-row GEMV's tiles, unsplit, no bias): the weight is gate_up_proj's [gate | up], and the output
    silu(gate) * up [1, N / 2], a program's tiles.block_n rows half gate, half up."""
    (num_rows, in_features), (out_features, num_groups) = x.shape, scales.shape
    if gated and not (tiles.row_gemv and tiles.split_k == 1 and bias is None and out_features % 2 == 0
                      and tiles.block_n % 2 == 0):
        raise ValueError("only the one-row W4A16 GEMV is gated, unsplit, without a bias, on [gate | up], "
                         "an even number of rows a program")
    gemv = not tiles.planes and tiles.block_m <= GEMV_MAX_ROWS
    if x.stride(-1) != 1:
        x = x.contiguous()
    group_size = in_features // num_groups
    if not step_holds_groups(tiles.block_k, group_size):
        raise ValueError(f"a step of {tiles.block_k} neither holds whole groups of {group_size} nor lies in one")
    outputs = out_features // 2 if gated else out_features
    out = _output(num_rows, outputs, x, tiles)                          # [M, N], or [S, M, N] float32
    k_per_split = _k_per_split(in_features, tiles)
    zero_is_offset = {"ZERO_IS_OFFSET": zeros.is_floating_point()}
    if tiles.row_gemv:
        if num_rows != 1 or not row_gemv_holds_groups(tiles.block_k, group_size):
            raise ValueError("the one-row GEMV takes one row and groups that its steps divide or that divide its "
                             "steps in whole threads (32 weights)")
        grid = _launch_grid(1, out_features, tiles)      # gated: block_n / 2 outputs a program, of N / 2
        _w4a16_row_gemv_kernel[grid](
            x, qweight, scales, zeros, bias if bias is not None else scales, out, outputs, in_features,
            qweight.stride(0), k_per_split, GROUP_SIZE=group_size, HAS_BIAS=bias is not None, **zero_is_offset,
            BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, X_PAIRS=loads_x_pairs(x), GATED=gated,
            LATE_DEPENDENTS=gated and GATED_LATE_IN_ONE_WAVE and _one_wave(grid, x.device),
            num_warps=tiles.num_warps, num_stages=1, **_pdl_options(x))
        return out
    if tiles.planes:
        if zeros.is_floating_point():
            raise ValueError("the tensor-core GEMV takes integer zero points, not float offsets")
        kernel, options = _w4a16_dot_gemv_kernel, {"USE_ASM": x.is_cuda, **_pdl_options(x)}  # CPU: the interpreter
    elif gemv:
        kernel, options = _w4a16_gemv_kernel, {"PREFETCH": tiles.prefetch, **zero_is_offset, **_pdl_options(x)}
    else:
        kernel, options = _w4a16_gemm_kernel, zero_is_offset
    kernel[_launch_grid(num_rows, out_features, tiles)](
        x, qweight, scales, zeros, bias if bias is not None else scales, out, num_rows, out_features, in_features,
        x.stride(0), qweight.stride(0), k_per_split, GROUP_SIZE=group_size,
        HAS_BIAS=bias is not None, BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        **options)
    return out


# ---- W8A16 -----------------------------------------------------------------------------------

@triton.jit
def _w8a16_kernel(x_ptr, qweight_ptr, scales_ptr, offsets_ptr, bias_ptr, out_ptr, M, N, K, stride_x, stride_w,
                  K_PER_SPLIT, GROUP_SIZE: tl.constexpr, RUN: tl.constexpr, HAS_OFFSETS: tl.constexpr,
                  HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """More rows, on the tensor cores: each step loads a [BLOCK_N, BLOCK_K] tile of codes (int8 or
    e4m3, one byte a weight, contiguous along K), dequantizes it in registers and hands it to
    tl.dot in x's dtype. The scales (and offsets) are loaded a run of RUN codes at a time (RUN
    divides the group, or there is one group a row) and broadcast over the run, so a step loads
    BLOCK_K / RUN of them a row. K need not be a multiple of BLOCK_K: the loads are masked along K."""
    RUNS: tl.constexpr = BLOCK_K // RUN
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_run = RUN * tl.arange(0, RUNS)
    mask_m, mask_n = offs_m < M, offs_n < N
    num_groups = K // GROUP_SIZE
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_x + offs_k[None, :]                   # [BM, BK]
    w_rows = qweight_ptr + offs_n.to(tl.int64)[:, None] * stride_w + offs_k[None, :]              # [BN, BK]
    group_rows = offs_n.to(tl.int64)[:, None] * num_groups                                       # [BN, 1]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_start = tl.program_id(2) * K_PER_SPLIT
    for k0 in range(k_start, tl.minimum(k_start + K_PER_SPLIT, K), BLOCK_K):
        mask_k = (k0 + offs_k < K)[None, :]                                                      # [1, BK]
        x = tl.load(x_rows + k0, mask=mask_m[:, None] & mask_k, other=0.0)                       # [BM, BK]
        codes = tl.load(w_rows + k0, mask=mask_n[:, None] & mask_k, other=0.0)                   # [BN, BK] int8 or e4m3
        run_k = (k0 + offs_run)[None, :]                                                         # [1, R]
        groups = group_rows + run_k // GROUP_SIZE                                                # [BN, R]
        mask_r = mask_n[:, None] & (run_k < K)
        w = tl.reshape(codes.to(tl.float32), [BLOCK_N, RUNS, RUN])
        w = w * tl.load(scales_ptr + groups, mask=mask_r, other=0.0)[:, :, None]
        if HAS_OFFSETS:
            w -= tl.load(offsets_ptr + groups, mask=mask_r, other=0.0)[:, :, None]
        acc = tl.dot(x, tl.trans(tl.reshape(w, [BLOCK_N, BLOCK_K]).to(x.dtype)), acc)          # 16 bits -> float32
    _store_tile(acc, bias_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n, M, N, HAS_BIAS)


@triton.jit
def _w8a16_gemv_kernel(x_ptr, qweight_ptr, scales_ptr, offsets_ptr, bias_ptr, out_ptr, M, N, K, stride_x, stride_w,
                       K_PER_SPLIT, GROUP_SIZE: tl.constexpr, RUN: tl.constexpr, HAS_OFFSETS: tl.constexpr,
                       HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       USE_PDL: tl.constexpr = False):
    """A few rows on the FMA units, as the FP8 GEMV: each step loads a [BLOCK_N, BLOCK_K] tile of
    codes (int8 or e4m3), 16 contiguous bytes a thread along K, widens them to float32 and
    multiplies them by x. The products of each run of RUN codes (16: a thread's load, where the
    group is a multiple of 16 or a whole row) add up in the thread that holds them, and the run's
    sum meets its group's scale once: sum_k x_k (q_k s - m) = s sum_k x_k q_k - m sum_k x_k over
    each run, so a weight costs its conversion and one fused multiply-add, and a run one scale.
    The runs' sums add up in [BLOCK_M, BLOCK_N, BLOCK_K / RUN] accumulators, reduced once after
    the loop. x is loaded as [BLOCK_M, BLOCK_N, R, RUN], each thread the x values of its own
    codes (from L1), so that x and the codes share a layout: loaded as [BLOCK_M, 1, ...] it took
    a trip through shared memory and shuffles at every step. K need not be a multiple of
    BLOCK_K: the loads are masked along K. USE_PDL (launched with launch_pdl): the first step's
    codes are loaded before waiting for the kernel that wrote x."""
    RUNS: tl.constexpr = BLOCK_K // RUN
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    # K as [RUNS, RUN], so that a run is a thread's own and its sum needs no other thread
    offs_k = (RUN * tl.arange(0, RUNS)[:, None] + tl.arange(0, RUN)[None, :])[None, None, :, :]    # [1, 1, R, RUN]
    offs_run = RUN * tl.arange(0, RUNS)[None, None, :]                                             # [1, 1, R]
    mask_m, mask_n = offs_m < M, offs_n < N
    mask_m4, mask_n4 = mask_m[:, None, None, None], mask_n[None, :, None, None]
    num_groups = K // GROUP_SIZE
    x_rows = tl.broadcast_to(x_ptr + offs_m.to(tl.int64)[:, None, None, None] * stride_x + offs_k,
                             [BLOCK_M, BLOCK_N, RUNS, RUN])                                       # [BM, BN, R, RUN]
    w_rows = qweight_ptr + offs_n.to(tl.int64)[None, :, None, None] * stride_w + offs_k         # [1, BN, R, RUN]
    group_rows = offs_n.to(tl.int64)[None, :, None] * num_groups                                 # [1, BN, 1]
    acc = tl.zeros([BLOCK_M, BLOCK_N, RUNS], dtype=tl.float32)
    k_start = tl.program_id(2) * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    codes = tl.load(w_rows + k_start, mask=mask_n4 & (k_start + offs_k < K), other=0.0)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()                   # the kernel before has finished: x is written
        tl.extra.cuda.gdc_launch_dependents()
    for k0 in range(k_start, k_end, BLOCK_K):
        if k0 > k_start:
            codes = tl.load(w_rows + k0, mask=mask_n4 & (k0 + offs_k < K), other=0.0)          # [1, BN, R, RUN]
        x = tl.load(x_rows + k0, mask=mask_m4 & (k0 + offs_k < K), other=0.0).to(tl.float32)   # [BM, BN, R, RUN]
        sums = tl.sum(x * codes.to(tl.float32), axis=3)                                         # [BM, BN, R]
        run_k = k0 + offs_run
        groups = group_rows + run_k // GROUP_SIZE                                                # [1, BN, R]
        mask_r = mask_n[None, :, None] & (run_k < K)
        acc += sums * tl.load(scales_ptr + groups, mask=mask_r, other=0.0)
        if HAS_OFFSETS:
            acc -= tl.sum(x, axis=3) * tl.load(offsets_ptr + groups, mask=mask_r, other=0.0)    # the runs' sums of x
    _store_tile(tl.sum(acc, axis=2), bias_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n, M, N, HAS_BIAS)


# tl.dot tiles step 64 codes along K: at 128 their pipelined stages need 288 to 416 KB of shared memory
# (an H200 has 227 KB a block)
W8A16_DOT_BLOCK_K = 64
W8A16_GEMV_RUN = 16     # the GEMV's codes a thread loads at once (16 bytes): its scale runs at most this long


def scale_run(group_size: int, num_groups: int, longest: int) -> int:
    """How many codes in a row one scale is loaded for: the longest power of two up to `longest`
    that divides the group, or `longest` itself where one group covers the whole row."""
    return longest if num_groups == 1 else power_of_two_dividing(group_size, longest)


def choose_w8a16_gemv_tiles(num_rows: int, out_features: int, in_features: int, device: torch.device) -> Tiles:
    """The W8A16 GEMV's tiles: one row a program (more rows are more programs, which read the same
    codes from L2 at about the same time), [4, 1024] codes a step at any width, K split in two
    while each split keeps 4 steps and there are at most GEMV_PROGRAMS_PER_SM programs an SM. On an
    H200 at one row (int8, a scale per 32; tools/quant_gemv_probe.py --sweep, microseconds)
    [4, 1024] beat the FP8 GEMV's [8, 512] on every layer of Llama-3.1-8B: qkv_proj 13.9 against
    18.0, o_proj 9.6 against 14.1, gate_up_proj 44.6 against 53.9, down_proj 30.3 against 44.6, the
    LM head 181 against 220; Llama-3.2-1B's down_proj took 11.0 split in two. Four rows in one
    program ([4, 4, 512]) took 274 us on 8B's gate_up_proj: x [4, BLOCK_N, ...] no longer shares
    the codes' layout."""
    sms = _sms(device)
    block_n, block_k = 4, 1024
    split_k = _doubling_split(triton.cdiv(in_features, block_k) // 4, num_rows * triton.cdiv(out_features, block_n),
                              GEMV_PROGRAMS_PER_SM * sms)        # at least 4 steps a split
    return Tiles(1, block_n, block_k, split_k, num_warps=4, num_stages=1)


def w8a16_linear_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                        offsets: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K], qweight [N, K] int8, scales [N, G] float32, offsets [N, G] float32 or None,
    bias [N] or None -> [M, N]."""
    return sum_partials(w8a16_linear_partials_triton(x, qweight, scales, offsets, bias), x.dtype)


def w8a16_linear_partials_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                                 offsets: torch.Tensor | None = None,
                                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """As w8a16_linear_triton, but with K split: the float32 partial products [S, M, N]."""
    (num_rows, in_features), out_features = x.shape, qweight.shape[0]
    if num_rows == 0:
        return torch.empty(0, out_features, dtype=x.dtype, device=x.device)
    if num_rows <= GEMV_MAX_ROWS:
        tiles = choose_w8a16_gemv_tiles(num_rows, out_features, in_features, x.device)
    else:
        tiles = choose_tiles(num_rows, out_features, triton.cdiv(in_features, W8A16_DOT_BLOCK_K), W8A16_DOT_BLOCK_K,
                             x.device)
    return w8a16_linear_tiles(x, qweight, scales, offsets, bias, tiles)


def w8a16_linear_tiles(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                       bias: torch.Tensor | None, tiles: Tiles) -> torch.Tensor:
    """The product with the tiles given (a block_m up to GEMV_MAX_ROWS multiplies on the FMA units,
    a larger one by tl.dot): [M, N] in x's dtype, or with K split the partials [S, M, N] float32."""
    (num_rows, in_features), (out_features, num_groups) = x.shape, scales.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = _output(num_rows, out_features, x, tiles)                     # [M, N], or [S, M, N] float32
    k_per_split = _k_per_split(in_features, tiles)
    group_size = in_features // num_groups
    if tiles.block_m <= GEMV_MAX_ROWS:
        kernel, options = _w8a16_gemv_kernel, _pdl_options(x)
        run = scale_run(group_size, num_groups, min(W8A16_GEMV_RUN, tiles.block_k))
    else:
        kernel, options, run = _w8a16_kernel, {}, scale_run(group_size, num_groups, tiles.block_k)
    kernel[_launch_grid(num_rows, out_features, tiles)](
        x, qweight, scales, offsets if offsets is not None else scales, bias if bias is not None else scales, out,
        num_rows, out_features, in_features, x.stride(0), qweight.stride(0), k_per_split, GROUP_SIZE=group_size,
        RUN=run, HAS_OFFSETS=offsets is not None, HAS_BIAS=bias is not None, BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        **options)
    return out
