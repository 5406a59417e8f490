"""The int4 matmul on the CPU, compiled by numba: integer activations, integer dot products.

torch's packed int4 kernel (`int4_linear` in quant.py) widens each weight to
bfloat16 and multiplies in floating point. llama.cpp instead quantizes the
*activation* too, once per matmul input: each run of 32 values of a row x gets
its own scale, x ~ dx * xq. A group of 32 weights w = d * q + low (q in 0..15,
Q4_1) then meets it in one integer dot product,

    sum_k w_k x_k ~ d dx (sum_k q_k xq_k) + low (sum_k x_k),

where the sum of q * xq is exact in int32 and two float multiplies remain per
group. llama.cpp's int8 xq (Q8_1) fails our quality guard (92% top-1 agreement
with float32 on its text, against 98% required); int16 xq (dx = amax / 32767)
passes with 99.6%, so xq is int16. On a CPU with AVX-512 VNNI one `vpdpwssd`
multiplies 32 pairs of int16 (the codes, the activation) and adds each pair's
products into sixteen int32 lanes.

The weights are repacked once for that instruction: tiles of 16 output rows,
and in each group of 32 along K four runs of 64 bytes, one for every 8 values
of K (lane r, byte i: code k = 8c + i in the low nibble, 8c + 4 + i in the
high one). A mask (or a 16-bit shift) takes two int16 codes at a time from a
lane's 4 bytes, and the sixteen rows of a tile fill the sixteen lanes, so a
group ends in one vector of 16 sums with no horizontal reduction. One call
runs a tile's whole row of groups for one or four activation rows, the float
sums in registers (`_tile_rows_codegen`); numba has no SIMD intrinsics of its
own, so it is written in LLVM IR.

Every output row is computed by the same loop (its groups in order, the same
operations) whatever the rows beside it, serial or split over threads by tile:
the matmul stays batch-invariant, like torch's kernel. `int4_linear_int16_torch`
is the reference. Used where `int4_numba_supported()` (numba imports, the CPU
has AVX-512 VNNI) and the layer has a multiple of 64 outputs (torch's packed
layout is unpacked for those; other layers keep torch's kernel).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from nanovllm.ops.attention_numba import _launch_lock
from nanovllm.ops.numba_cache import kernel
from nanovllm.ops.numba_ir import F32, FLOATS16, I8, I16, I32, I64, INTS16, SHORTS32, address, splat, sum_lanes

GROUP_SIZE = 32            # values of K per scale: Q4_1's and Q8_1's block
TILE_ROWS = 16             # output rows per tile: the int32 lanes of one AVX-512 vector
TORCH_BLOCK_ROWS = 64      # torch's packed int4 CPU layout interleaves rows in blocks of 64
ACTIVATION_LEVELS = 32767     # int16 activations: int8 (127) fails the quality guard (92% top-1)
INT8_LEVELS = 127             # int8 activations: the refined LM head's coarse pass (quant.RefinedLMHead)
PARALLEL_MIN_MACS = 1 << 24   # below this many multiply-adds one thread is quicker than a parallel launch
PREFETCH_BYTES = 2048         # how far ahead in a tile's codes the kernel asks for the next groups


@dataclasses.dataclass(slots=True)
class Int4Tiles:
    """An int4 weight [N, K] in the kernel's layout (N a multiple of 16, K of 32, G = K / 32)."""
    weight: np.ndarray      # uint8 [N / 16 * G * 256]: tile t, group g, run c, row r, byte i
    scale: np.ndarray       # float32 [N / 16 * G * 16]: d of (t, g, r)
    low: np.ndarray         # float32 [N / 16 * G * 16]: low of (t, g, r)
    out_features: int
    in_features: int


def tiles_from_codes(q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> Int4Tiles:
    """q [N, K] codes in 0..15, scale and low [N, K / 32] (w = scale * q + low) -> Int4Tiles."""
    num_rows, in_features = q.shape
    if num_rows % TILE_ROWS or in_features % GROUP_SIZE:
        raise ValueError(f"the numba int4 kernel needs N % {TILE_ROWS} == 0 and K % {GROUP_SIZE} == 0, "
                         f"got [{num_rows}, {in_features}]")
    num_tiles, num_groups = num_rows // TILE_ROWS, in_features // GROUP_SIZE
    codes = q.to(torch.uint8).reshape(num_tiles, TILE_ROWS, num_groups, 4, 2, 4)   # [t, r, g, c, half, i]
    packed = codes[..., 0, :] | (codes[..., 1, :] << 4)                             # [t, r, g, c, i]
    weight = packed.permute(0, 2, 3, 1, 4).contiguous()                              # [t, g, c, r, i]

    def per_tile(x: torch.Tensor) -> np.ndarray:                                     # [N, G] -> [t, g, r]
        x = x.float().reshape(num_tiles, TILE_ROWS, num_groups).permute(0, 2, 1)
        return x.contiguous().reshape(-1).numpy()

    return Int4Tiles(weight.reshape(-1).numpy(), per_tile(scale), per_tile(low), num_rows, in_features)


def unpack_torch_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """torch's CPU int4 layout [N, K / 2] uint8 (N a multiple of 64) -> codes [N, K] uint8.
    Per block of 64 rows and each k, 32 bytes: row j in the low nibble, row 32 + j in the high one."""
    num_rows = packed.shape[0]
    if num_rows % TORCH_BLOCK_ROWS:
        raise ValueError(f"torch's int4 layout is unpacked here for multiples of {TORCH_BLOCK_ROWS} rows, "
                         f"got {num_rows}")
    blocks = packed.reshape(num_rows // TORCH_BLOCK_ROWS, in_features, TORCH_BLOCK_ROWS // 2)   # [b, K, 32]
    rows = torch.cat([blocks & 15, blocks >> 4], dim=2)                                         # [b, K, 64]
    return rows.permute(0, 2, 1).reshape(num_rows, in_features)


def tiles_from_torch_int4(packed: torch.Tensor, scale_and_zero: torch.Tensor) -> Int4Tiles:
    """A PackedLinear's int4 buffers (packed [N, K / 2], scale_and_zero [G, N, 2], w = (q - 8) * scale
    + zero) -> Int4Tiles of the same weights (low = zero - 8 * scale, in float32)."""
    num_groups = scale_and_zero.shape[0]
    scale, zero = scale_and_zero.float().transpose(0, 1).unbind(-1)               # [N, G] each
    q = unpack_torch_int4(packed, num_groups * GROUP_SIZE)
    return tiles_from_codes(q, scale, zero - 8 * scale)


# ---- the reference ---------------------------------------------------------------------------

def quantize_activation_torch(x: torch.Tensor, levels: int = ACTIVATION_LEVELS
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] float32 -> (xq [M, K], dx [M, K / 32], sx [M, K / 32]): per group of 32, dx = amax /
    levels, xq = round(x / dx) (0 where the group is all zeros), sx = the sum of x. xq is int16 for
    ACTIVATION_LEVELS, int8 for INT8_LEVELS."""
    groups = x.float().reshape(x.shape[0], -1, GROUP_SIZE)                          # [M, G, 32]
    dx = groups.abs().amax(dim=-1) / levels                                         # [M, G]
    safe = torch.where(dx > 0, dx, torch.ones_like(dx))
    xq = torch.where(dx[..., None] > 0, torch.round(groups / safe[..., None]), torch.zeros_like(groups))
    return xq.to(torch.int16 if levels > INT8_LEVELS else torch.int8).reshape(x.shape), dx, groups.sum(dim=-1)


def int4_linear_int16_torch(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor,
                            levels: int = ACTIVATION_LEVELS) -> torch.Tensor:
    """Reference: x [M, K] float32, q [N, K] codes, scale and low [N, K / 32] -> [M, N] float32, the
    formula of the module docstring in float64 (x rounded to int16, or to int8 at INT8_LEVELS)."""
    xq, dx, sx = quantize_activation_torch(x, levels)
    num_rows, in_features = q.shape
    groups = in_features // GROUP_SIZE
    dots = torch.einsum("mgk,ngk->mng", xq.double().reshape(-1, groups, GROUP_SIZE),
                        q.double().reshape(num_rows, groups, GROUP_SIZE))               # [M, N, G], exact
    out = dots * scale.double()[None] * dx.double()[:, None] + low.double()[None] * sx.double()[:, None]
    return out.sum(dim=-1).float()


# ---- the kernel ------------------------------------------------------------------------------

def activation_dtype(activation_bits: int) -> type:
    """The dtype the kernels round activations to: np.int16 (16 bits) or np.int8 (8); the intrinsics
    pick their arithmetic from it."""
    if activation_bits not in (8, 16):
        raise ValueError(f"activations are rounded to 8 or 16 bits, got {activation_bits}")
    return np.int16 if activation_bits == 16 else np.int8


def int4_linear_numba(x: torch.Tensor, tiles: Int4Tiles, activation_bits: int = 16) -> torch.Tensor:
    """x [M, K] float32 -> x @ w^T [M, N] float32 (activations rounded to int16 per group of 32, or
    to int8 where activation_bits is 8)."""
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.float().contiguous()
    xq = np.empty(x.shape, activation_dtype(activation_bits))
    if x.shape[0] * tiles.out_features * tiles.in_features < PARALLEL_MIN_MACS:
        return torch.from_numpy(_int4_matmul_serial(x.numpy(), xq, tiles.weight, tiles.scale, tiles.low,
                                                    tiles.out_features))
    with _launch_lock:
        return torch.from_numpy(_int4_matmul_parallel(x.numpy(), xq, tiles.weight, tiles.scale, tiles.low,
                                                      tiles.out_features))


_SLOT = np.array([0, 2, 1, 3, 4, 6, 5, 7])   # where value i of a run of 8 sits in the int16 activation


def _tile_rows_codegen(num_rows: int, int8: bool = False):
    """The LLVM IR of `_tile_rows_intrinsic(num_rows)`: num_rows rows of the activation against one tile,
    every group of K in a loop, each row's 16 outputs summed in registers and stored once.

    int8 activations (in their own order): `vpdpbusd` multiplies four unsigned bytes by four signed
    ones per lane, so a run's 64 bytes of codes give two vectors, the low nibbles (k0..k3 of each
    row) and the high ones (k4..k7), each against x's four bytes at 8 run (+ 4): half the
    instructions of the int16 path, one exact int32 sum per row (|sum| <= 32 * 15 * 127).

    Per group and run of 8 values of K, the 64 bytes of the tile's codes are loaded once and give four
    vectors of int16 pairs for every row: `and` with 0x000F000F takes codes (k0, k2), with 0x0F000F00
    (k1, k3) times 256, with 0x00F000F0 (k4, k6) times 16, and a 16-bit shift by 12 takes (k5, k7).
    The pairs times 16 and 256 go into sums of their own, which are shifted back exactly before the
    group's total (|sum| <= 8 * 15 * 32767 * 256 < 2^31). So each row's arithmetic is the same whatever
    num_rows: exact integer sums, then the same float operations in the same order, group after group."""

    def codegen(context, builder, signature, args):
        weight_, w_at_, xq_, x_at_, x_stride_, scale_, low_, s_at_, dx_, sx_, d_at_, d_stride_, out_, o_at_, \
            o_stride_, num_groups_ = args
        weight_t, _, xq_t, _, _, scale_t, low_t, _, dx_t, sx_t, _, _, out_t, _, _, _ = signature.args
        dpwssd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(INTS16, [INTS16] * 3),
                                                "llvm.x86.avx512.vpdpwssd.512")
        dpbusd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(INTS16, [INTS16] * 3),
                                                "llvm.x86.avx512.vpdpbusd.512")
        nibbles = ir.Constant(INTS16, [0x0F0F0F0F] * 16)
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [I8.as_pointer(), I32, I32, I32]), "llvm.prefetch.p0i8")
        masks = [ir.Constant(INTS16, [mask] * 16) for mask in (0x000F000F, 0x0F000F00, 0x00F000F0)]
        top_nibble = ir.Constant(SHORTS32, [12] * 32)
        zero = ir.Constant(INTS16, [0] * 16)
        sums_of = [cgutils.alloca_once_value(builder, ir.Constant(FLOATS16, [0.0] * 16)) for _ in range(num_rows)]

        def i64(value: int) -> ir.Constant:
            return ir.Constant(I64, value)

        def prefetch_at(pointer: ir.Value) -> None:    # read, keep in all cache levels, data
            builder.call(prefetch, [builder.bitcast(pointer, I8.as_pointer()), ir.Constant(I32, 0),
                                    ir.Constant(I32, 3), ir.Constant(I32, 1)])

        with cgutils.for_range(builder, num_groups_) as loop:
            g = loop.index
            w_ptr = address(context, builder, weight_t, weight_, builder.add(w_at_, builder.mul(g, i64(256))), I8)
            s_at = builder.add(s_at_, builder.mul(g, i64(16)))
            for offset in range(0, 256, 64):        # the codes, scales and lows PREFETCH_BYTES of codes ahead
                prefetch_at(builder.gep(w_ptr, [ir.Constant(I32, PREFETCH_BYTES + offset)]))
            for array_t, array in ((scale_t, scale_), (low_t, low_)):
                prefetch_at(address(context, builder, array_t, array, builder.add(s_at, i64(PREFETCH_BYTES // 16)), F32))
            scale_v = builder.load(address(context, builder, scale_t, scale_, s_at, FLOATS16), align=4)
            low_v = builder.load(address(context, builder, low_t, low_, s_at, FLOATS16), align=4)
            x_ptrs = [address(context, builder, xq_t, xq_, builder.add(builder.add(x_at_, builder.mul(i64(row), x_stride_)),
                                                                          builder.mul(g, i64(GROUP_SIZE))), I8 if int8 else I16)
                      for row in range(num_rows)]
            sums = [[zero, zero, zero] for _ in range(num_rows)]     # pairs times 1, 256, 16 (int8: the first only)
            for run in range(4):
                packed = builder.load(builder.bitcast(builder.gep(w_ptr, [ir.Constant(I32, 64 * run)]),
                                                      INTS16.as_pointer()), align=1)
                if int8:
                    codes = [builder.and_(packed, nibbles), builder.and_(builder.lshr(packed, ir.Constant(INTS16, [4] * 16)),
                                                                         nibbles)]
                    for row in range(num_rows):
                        for half, code in enumerate(codes):
                            x4 = builder.load(builder.bitcast(builder.gep(x_ptrs[row], [ir.Constant(I32, 8 * run + 4 * half)]),
                                                              I32.as_pointer()), align=1)
                            sums[row][0] = builder.call(dpbusd, [sums[row][0], code, splat(builder, x4, INTS16)])
                    continue
                top = builder.bitcast(builder.lshr(builder.bitcast(packed, SHORTS32), top_nibble), INTS16)
                codes = [builder.and_(packed, masks[0]), builder.and_(packed, masks[1]), builder.and_(packed, masks[2]),
                         top]
                for row in range(num_rows):
                    for pair, code in enumerate(codes):
                        x2 = builder.load(builder.bitcast(builder.gep(x_ptrs[row], [ir.Constant(I32, 8 * run + 2 * pair)]),
                                                          I32.as_pointer()), align=2)
                        slot = 0 if pair == 3 else pair
                        sums[row][slot] = builder.call(dpwssd, [sums[row][slot], code, splat(builder, x2, INTS16)])
            for row in range(num_rows):
                ones, times_256, times_16 = sums[row]
                total = builder.add(builder.add(ones, builder.ashr(times_256, ir.Constant(INTS16, [8] * 16))),
                                    builder.ashr(times_16, ir.Constant(INTS16, [4] * 16)))
                dot = builder.sitofp(total, FLOATS16)         # [16], exact: |q . xq| <= 32 * 15 * 32767 < 2^24
                d_at = builder.add(builder.add(d_at_, builder.mul(i64(row), d_stride_)), g)
                dx = builder.load(address(context, builder, dx_t, dx_, d_at, F32))
                sx = builder.load(address(context, builder, sx_t, sx_, d_at, F32))
                term = builder.fadd(builder.fmul(dot, builder.fmul(scale_v, splat(builder, dx, FLOATS16))),
                                    builder.fmul(low_v, splat(builder, sx, FLOATS16)))
                builder.store(builder.fadd(builder.load(sums_of[row]), term), sums_of[row])
        for row in range(num_rows):
            o_at = builder.add(o_at_, builder.mul(i64(row), o_stride_))
            builder.store(builder.load(sums_of[row]), address(context, builder, out_t, out_, o_at, FLOATS16), align=4)
        return context.get_dummy_value()

    return codegen


def _tile_rows_intrinsic(num_rows: int):
    """For rows m .. m + num_rows - 1 of the flattened activation: out[m, tile] = sum over the groups g of
    (q . xq[m, g]) * scale * dx[m, g] + low * sx[m, g], for the 16 rows of one tile. weight[w_at + 256 g:]
    group g's codes, xq[x_at + m K + 32 g ...] its activation (int16 in `_SLOT` order, or int8 in order), scale and low
    [s_at + 16 g:][:16], dx and sx at d_at + m G + g, out at o_at + m N (strides K, G, N given)."""

    def typer(typingctx, weight, w_at, xq, x_at, x_stride, scale, low, s_at, dx, sx, d_at, d_stride, out,
              o_at, o_stride, num_groups):
        i64 = types.int64
        sig = types.void(weight, i64, xq, i64, i64, scale, low, i64, dx, sx, i64, i64, out, i64, i64, i64)
        return sig, _tile_rows_codegen(num_rows, int8=xq.dtype == types.int8)

    return intrinsic(typer)


_tile_rows_1 = _tile_rows_intrinsic(1)
_tile_rows_4 = _tile_rows_intrinsic(4)


def _quantize_group_codegen(int8: bool):
    """The LLVM IR of `_quantize_group`: the group's 32 values as two vectors of 16, their absolute
    maximum (an unsigned maximum of the bits without the sign), their sum by halves (16 + 16, then 8 + 8
    down to 1 + 1: a fixed order, the same for every row), then each value divided by the scale, rounded
    to the nearest integer (ties to even, as np.round) and narrowed, all 32 stored at once: to int16 with
    the runs of 8 in `_SLOT` order, or (int8) to int8 in their own order."""
    levels, narrow = (INT8_LEVELS, I8) if int8 else (ACTIVATION_LEVELS, I16)

    def codegen(context, builder, signature, args):
        x_, x_at, xq_, q_at, dx_, sx_, d_at = args
        x_t, _, xq_t, _, dx_t, sx_t, _ = signature.args
        narrow16 = ir.VectorType(narrow, 16)
        module = builder.module
        umax = cgutils.get_or_insert_function(module, ir.FunctionType(I32, [INTS16]), "llvm.vector.reduce.umax.v16i32")
        rint = cgutils.get_or_insert_function(module, ir.FunctionType(FLOATS16, [FLOATS16]), "llvm.rint.v16f32")
        pointer = address(context, builder, x_t, x_, x_at, F32)
        halves = [builder.load(builder.bitcast(builder.gep(pointer, [ir.Constant(I32, 16 * half)]),
                                               FLOATS16.as_pointer()), align=4) for half in (0, 1)]
        magnitude = ir.Constant(INTS16, [0x7FFFFFFF] * 16)
        bits = [builder.and_(builder.bitcast(half, INTS16), magnitude) for half in halves]
        larger = builder.select(builder.icmp_unsigned(">", bits[0], bits[1]), bits[0], bits[1])
        amax = builder.bitcast(builder.call(umax, [larger]), F32)
        total = sum_lanes(builder, builder.fadd(halves[0], halves[1]))
        scale = builder.fdiv(amax, ir.Constant(F32, float(levels)))
        builder.store(scale, address(context, builder, dx_t, dx_, d_at, F32))
        builder.store(total, address(context, builder, sx_t, sx_, d_at, F32))
        positive = builder.fcmp_ordered(">", scale, ir.Constant(F32, 0.0))
        codes = []
        for half in halves:
            rounded = builder.call(rint, [builder.fdiv(half, splat(builder, scale, FLOATS16))])
            codes.append(builder.select(positive, builder.trunc(builder.fptosi(rounded, INTS16), narrow16),
                                        ir.Constant(narrow16, [0] * 16)))
        order = list(range(32)) if int8 else [8 * run + int(slot) for run in range(4) for slot in _SLOT]
        joined = builder.shuffle_vector(codes[0], codes[1], ir.Constant(ir.VectorType(I32, 32), order))
        builder.store(joined, builder.bitcast(address(context, builder, xq_t, xq_, q_at, narrow),
                                              ir.VectorType(narrow, 32).as_pointer()), align=1)
        return context.get_dummy_value()

    return codegen


@intrinsic
def _quantize_group(typingctx, x, x_at, xq, q_at, dx, sx, d_at):
    """One group of quantize_activation_torch's formula: x[x_at:][:32] float32 -> xq[q_at:][:32] (int16,
    the runs of 8 in `_SLOT` order; or int8 at INT8_LEVELS, in order), dx[d_at] = amax / levels and
    sx[d_at] = the sum; 1-D arrays."""
    i64 = types.int64
    return types.void(x, i64, xq, i64, dx, sx, i64), _quantize_group_codegen(xq.dtype == types.int8)


@kernel(boundscheck=False)
def _quantize_activation_into(x, xq, dx, sx):
    """quantize_activation_torch's formula, x [M, K] float32 -> xq [M, K] (int16, each run of 8 in
    `_SLOT` order; or int8, in order, at INT8_LEVELS), dx and sx [M, K / 32] float32 (x and xq C
    contiguous)."""
    x_flat, xq_flat, dx_flat, sx_flat = x.reshape(-1), xq.reshape(-1), dx.reshape(-1), sx.reshape(-1)
    num_groups = dx.shape[1]
    for m in range(x.shape[0]):
        for g in range(num_groups):
            _quantize_group(x_flat, m * x.shape[1] + g * GROUP_SIZE, xq_flat, m * xq.shape[1] + g * GROUP_SIZE,
                            dx_flat, sx_flat, m * num_groups + g)


@kernel(boundscheck=False)
def _quantize_activation(x, xq):
    """`_quantize_activation_into` x into xq, with new dx and sx [M, K / 32] float32 -> (dx, sx)."""
    dx, sx = np.empty((x.shape[0], x.shape[1] // 32), np.float32), np.empty((x.shape[0], x.shape[1] // 32), np.float32)
    _quantize_activation_into(x, xq, dx, sx)
    return dx, sx


@kernel(boundscheck=False)
def _tile(t, xq, dx, sx, weight, scale, low, out):
    """Rows t * 16 .. t * 16 + 15 of out [M, N] for every row of xq [M, K]: four rows of xq at a
    time through `_tile_rows_4` (the tile's codes unpacked once for the four), the rest one by one
    (the same arithmetic for each row)."""
    num_tokens, in_features = xq.shape
    num_groups, out_features = dx.shape[1], out.shape[1]
    xq_flat, dx_flat, sx_flat, out_flat = xq.reshape(-1), dx.reshape(-1), sx.reshape(-1), out.reshape(-1)
    at = t * num_groups
    first_single = num_tokens - num_tokens % 4
    for m in range(0, first_single, 4):
        _tile_rows_4(weight, at * 256, xq_flat, m * in_features, in_features, scale, low, at * 16, dx_flat, sx_flat,
                     m * num_groups, num_groups, out_flat, m * out_features + t * 16, out_features, num_groups)
    for m in range(first_single, num_tokens):
        _tile_rows_1(weight, at * 256, xq_flat, m * in_features, in_features, scale, low, at * 16, dx_flat, sx_flat,
                     m * num_groups, num_groups, out_flat, m * out_features + t * 16, out_features, num_groups)


@kernel(boundscheck=False)
def _int4_matmul_serial(x, xq, weight, scale, low, out_features):
    """x [M, K] float32 -> out [M, N] float32, on the calling thread; xq [M, K] (int16 or int8) takes
    the rounded activation."""
    out = np.empty((x.shape[0], out_features), np.float32)
    dx, sx = _quantize_activation(x, xq)
    for t in range(out.shape[1] // 16):
        _tile(t, xq, dx, sx, weight, scale, low, out)
    return out


@kernel(parallel=True, boundscheck=False)
def _int4_matmul_parallel(x, xq, weight, scale, low, out_features):
    """`_int4_matmul_serial` with the tiles split over numba's threads."""
    out = np.empty((x.shape[0], out_features), np.float32)
    dx, sx = _quantize_activation(x, xq)
    for t in prange(out.shape[1] // 16):
        _tile(t, xq, dx, sx, weight, scale, low, out)
    return out
