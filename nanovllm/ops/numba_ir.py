"""Pieces of LLVM IR shared by the numba kernels that are written as intrinsics (quant_numba's int4
tile and activation rounding, attention_numba's key blocks): numba has no SIMD types of its own, so
those kernels build vectors of 16 float32 or int32 lanes (one AVX-512 register) directly."""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

I8, I16, I32, I64, F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
INTS16, SHORTS32, FLOATS16 = ir.VectorType(I32, 16), ir.VectorType(I16, 32), ir.VectorType(F32, 16)


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


def load_floats16(builder: ir.IRBuilder, pointer: ir.Value, offset: int = 0) -> ir.Value:
    """The 16 float32 at pointer + offset (a float*), alignment 4."""
    at = builder.gep(pointer, [ir.Constant(I32, offset)]) if offset else pointer
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
