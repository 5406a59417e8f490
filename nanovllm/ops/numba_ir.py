"""What the numba kernels share: pieces of LLVM IR for those written as intrinsics (quant_numba's int4
tile and activation rounding, attention_numba's key blocks; numba has no SIMD types of its own, so they
build vectors of 16 float32 or int32 lanes, one AVX-512 register, directly), float16 as numba can hold
it, and a vectorized exp (the attention's softmax, SiLU, the sampler's log-normalizer).

numba has no float16 type on the CPU. A float16 array (the KV cache of kv_cache_dtype="float16") is
passed to it as int16, the same bits, and read and written through `as_float32` and `as_stored`: LLVM's
half conversions, which are exact one way and round to nearest even the other, as torch's `.to()`;
on x86 with F16C they are one instruction per 16 values (vcvtph2ps, vcvtps2ph)."""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from nanovllm.ops.numba_cache import kernel

I8, I16, I32, I64, F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
HALF = ir.HalfType()
INTS16, SHORTS32, FLOATS16 = ir.VectorType(I32, 16), ir.VectorType(I16, 32), ir.VectorType(F32, 16)
HALVES16 = ir.VectorType(HALF, 16)


def splat(builder: ir.IRBuilder, scalar: ir.Value, vector_type: ir.VectorType) -> ir.Value:
    """A vector of vector_type with `scalar` in every lane."""
    undef = ir.Constant(vector_type, ir.Undefined)
    one = builder.insert_element(undef, scalar, ir.Constant(I32, 0))
    return builder.shuffle_vector(one, undef, ir.Constant(ir.VectorType(I32, vector_type.count),
                                                          [0] * vector_type.count))


def address(context, builder: ir.IRBuilder, array_type, array: ir.Value, offset: ir.Value,
            element_type: ir.Type) -> ir.Value:
    """A pointer to the element `offset` elements past a numba array's data pointer, as element_type*."""
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [offset]), element_type.as_pointer())


def element_of(array_type) -> ir.Type:
    """The IR type of a numba array's elements as the kernels address them: float, or i16 for float16 bits."""
    return I16 if array_type.dtype == types.int16 else F32


def load_floats16(builder: ir.IRBuilder, pointer: ir.Value, offset: int = 0) -> ir.Value:
    """The 16 values at pointer + offset as 16 float32: a float* loaded as is (alignment 4), an i16*
    read as float16 and widened (exactly)."""
    at = builder.gep(pointer, [ir.Constant(I32, offset)]) if offset else pointer
    if pointer.type.pointee == I16:
        return builder.fpext(builder.load(builder.bitcast(at, HALVES16.as_pointer()), align=2), FLOATS16)
    return builder.load(builder.bitcast(at, FLOATS16.as_pointer()), align=4)


def sum_lanes(builder: ir.IRBuilder, vector: ir.Value) -> ir.Value:
    """The sum of a float vector's lanes (a power of two), by halves: the low half plus the high half,
    down to one value. A fixed order, the same on every call."""
    width = vector.type.count
    while width > 1:
        width //= 2
        low_half = builder.shuffle_vector(vector, vector, ir.Constant(ir.VectorType(I32, width), list(range(width))))
        high_half = builder.shuffle_vector(vector, vector, ir.Constant(ir.VectorType(I32, width),
                                                                       list(range(width, 2 * width))))
        vector = builder.fadd(low_half, high_half)
    return builder.extract_element(vector, ir.Constant(I32, 0))


@intrinsic
def float32_from_bits(typingctx, bits):
    """The float32 whose bits are the int32 `bits` (a bitcast, which vectorizes with the loop around it)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], F32)
    return types.float32(types.int32), codegen


@intrinsic
def as_float32(typingctx, value):
    """An element of a kernel's float array as float32: float32 as it is, int16 as the bits of a float16
    (widened exactly)."""
    if value == types.int16:
        def codegen(context, builder, signature, args):
            return builder.fpext(builder.bitcast(args[0], HALF), F32)
        return types.float32(types.int16), codegen
    if value == types.float32:
        return types.float32(types.float32), lambda context, builder, signature, args: args[0]
    return None


@intrinsic
def as_stored(typingctx, value, array):
    """The float32 `value` as `array` stores it: itself in a float32 array, in an int16 one the bits of
    the nearest float16 (ties to even, as torch rounds; beyond 65504 infinity)."""
    if array.dtype == types.int16:
        def codegen(context, builder, signature, args):
            return builder.bitcast(builder.fptrunc(args[0], HALF), I16)
        return types.int16(types.float32, array), codegen
    if array.dtype == types.float32:
        return types.float32(types.float32, array), lambda context, builder, signature, args: args[0]
    return None


# exp(x) = 2^k exp(r): k = round(x / ln 2), r = x - k ln 2 with ln 2 in two parts (Cody and Waite: k ln2_hi
# is exact, so r keeps its bits), |r| <= ln(2) / 2; exp(r) by its Taylor series to degree 7 (truncation
# error 5e-9 of the value, under float32's rounding).
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI, _LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)
_EXP_TAYLOR = tuple(np.float32(1.0 / c) for c in (1, 2, 6, 24, 120, 720, 5040))     # 1/1! .. 1/7!


@kernel(fastmath={"nnan", "ninf", "nsz", "contract"}, boundscheck=False)   # no reassociation: r's two steps stay
def exp_clamped(x):
    """exp(x) for x clamped to [-87, 88] (exp 1.6e-38 .. 1.7e38: no underflow, no infinity): the
    polynomial of exp(r) times 2^k made from its bits. A loop of calls vectorizes (numba's np.exp is
    a call per value that does not)."""
    c1, c2, c3, c4, c5, c6, c7 = _EXP_TAYLOR
    x = min(max(x, np.float32(-87.0)), np.float32(88.0))
    k = np.floor(x * _LOG2E + np.float32(0.5))
    r = (x - k * _LN2_HI) - k * _LN2_LO
    power = float32_from_bits((np.int32(k) + np.int32(127)) << np.int32(23))     # 2^k
    return (np.float32(1.0) + r * (c1 + r * (c2 + r * (c3 + r * (c4 + r * (c5 + r * (c6 + r * c7))))))) * power


@kernel(boundscheck=False)
def exp_shifted_into(s, shift):
    """s[j] = exp_clamped(s[j] - shift), in one vectorized loop."""
    for j in range(s.shape[0]):
        s[j] = exp_clamped(s[j] - shift)


@kernel(boundscheck=False, fastmath={"reassoc"})
def exp_shifted_sum(s, shift):
    """sum_j exp_clamped(s[j] - shift), summed in vector lanes (one vectorized loop, s unchanged)."""
    total = np.float32(0.0)
    for j in range(s.shape[0]):
        total += exp_clamped(s[j] - shift)
    return total
