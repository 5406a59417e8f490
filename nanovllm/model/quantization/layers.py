"""The linear layers a quantized checkpoint becomes: one per stored format, whatever file it came from.

Every loader (compressed-tensors, GPTQ, AWQ, GGUF, online fp8) converts its tensors to one of
these three layouts, with output channels along dim 0, so that q/k/v and gate/up fuse
into one layer by rows exactly as float weights do (model/llama.py):

    Fp8Linear     weight [N, K] float8_e4m3fn, weight_scale [N] float32
    W4A16Linear   qweight [N, K / 8] int32 (4-bit codes, low nibble first), scales [N, K / group]
                  float32 (a checkpoint's float16 scales would lose 3 bits in bfloat16), zeros
                  [N, K / group] uint8 (GGUF's Q4_1 and Q4_K: float32 offsets, w = q s - m);
                  input_perm [K] when the checkpoint ordered its groups by activation (GPTQ desc_act)
    W8A16Linear   qweight [N, K] int8 (or e4m3), scales [N, K / group] float32, offsets [N, K / group]
                  float32 or None (GGUF's other types, and layers that mix them with 4-bit ones;
                  8-bit GPTQ and compressed-tensors); input_perm [K] as W4A16Linear's

The tensors are buffers, not parameters: `LlamaForCausalLM.load_weights` fills the float
parameters (norms, embeddings, biases), the quantization loader fills these.
"""
from __future__ import annotations

import torch
from torch import nn

from nanovllm.ops.quant_format import FP8_WEIGHT_ONLY_MAX_ROWS, Fp8Rows
from nanovllm.ops.quant_linear import (FP8_DTYPE, PACK_FACTOR, fp8_linear, fp8_linear_or_partials,
                                       fp8_linear_silu_and_mul, w4a16_linear, w4a16_linear_or_partials,
                                       w4a16_linear_silu_and_mul, w8a16_linear, w8a16_linear_or_partials)


class Fp8Linear(nn.Module):
    """x [M, K] -> [M, N]: an e4m3 weight with a scale per output channel, activations
    quantized per row on the fly (ops/quant_linear.py), or already quantized by the kernel
    before (x given as Fp8Rows: see takes_fp8_rows)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8_DTYPE))       # [N, K]
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32))          # [N]
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def takes_fp8_rows(self, num_rows: int) -> bool:
        """Whether forward quantizes x per row at this many rows (W8A8; one row is weight-only), so
        that the kernel writing x may quantize it instead and pass Fp8Rows (ops/quant_linear.py)."""
        return num_rows > FP8_WEIGHT_ONLY_MAX_ROWS

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale, self.bias)

    def forward_or_partials(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        """forward(x) [M, N], or its float32 partial products [S, M, N] (ops/linear.py)."""
        return fp8_linear_or_partials(x, self.weight, self.weight_scale, self.bias)

    def forward_silu_and_mul(self, x: torch.Tensor | Fp8Rows, fp8: bool = False) -> torch.Tensor | Fp8Rows:
        """silu_and_mul(forward(x), fp8) for gate_up_proj, fused where the kernel can (ops/activation.py)."""
        return fp8_linear_silu_and_mul(x, self.weight, self.weight_scale, self.bias, fp8)

    def extra_repr(self) -> str:
        return f"fp8, in_features={self.in_features}, out_features={self.out_features}"


def _in_group_order(x: torch.Tensor, input_perm: torch.Tensor | None) -> torch.Tensor:
    """x [M, K], its inputs gathered in the order GPTQ's act order sorted the weight's into (input_perm);
    x itself without one."""
    return x if input_perm is None else x[:, input_perm]                       # [M, K] in group order


class W4A16Linear(nn.Module):
    """x [M, K] -> [M, N]: 4-bit weight codes with a scale and a zero per group of `group_size`
    along K, dequantized inside the matmul (ops/quant_linear.py). offsets=True: the zeros are
    float offsets (w = q s - m, GGUF's Q4_1 and Q4_K)."""

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False,
                 act_order: bool = False, offsets: bool = False):
        super().__init__()
        if in_features % PACK_FACTOR or in_features % group_size:
            raise ValueError(f"a 4-bit layer needs its input size ({in_features}) to be a multiple of 8 and of "
                             f"the group size ({group_size})")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        num_groups = in_features // group_size
        self.register_buffer("qweight", torch.empty(out_features, in_features // PACK_FACTOR, dtype=torch.int32))
        self.register_buffer("scales", torch.empty(out_features, num_groups, dtype=torch.float32))    # [N, G]
        zeros_dtype = torch.float32 if offsets else torch.uint8
        self.register_buffer("zeros", torch.empty(out_features, num_groups, dtype=zeros_dtype))       # [N, G]
        # GPTQ desc_act: the input channels reordered so that each group is contiguous; x is gathered to match
        self.register_buffer("input_perm", torch.empty(in_features, dtype=torch.int64) if act_order else None)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return w4a16_linear(_in_group_order(x, self.input_perm), self.qweight, self.scales, self.zeros, self.bias)

    def forward_or_partials(self, x: torch.Tensor) -> torch.Tensor:
        """forward(x) [M, N], or its float32 partial products [S, M, N] (ops/linear.py)."""
        return w4a16_linear_or_partials(_in_group_order(x, self.input_perm), self.qweight, self.scales, self.zeros,
                                        self.bias)

    def forward_silu_and_mul(self, x: torch.Tensor, fp8: bool = False) -> torch.Tensor | None:
        """silu_and_mul(forward(x)) for gate_up_proj in one kernel where the GPU's one-row GEMV takes it
        (ops/quant_linear.py); None otherwise (and for fp8 rows), and ops/activation.py runs the two."""
        if fp8:
            return None
        return w4a16_linear_silu_and_mul(_in_group_order(x, self.input_perm), self.qweight, self.scales,
                                         self.zeros, self.bias)

    def extra_repr(self) -> str:
        return (f"w4a16, in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, act_order={self.input_perm is not None}, "
                f"offsets={self.zeros.is_floating_point()}")


class W8A16Linear(nn.Module):
    """x [M, K] -> [M, N]: int8 weight codes with a float scale (and with offsets=True a float
    offset) per group of `group_size` along K, dequantized inside the matmul (ops/quant_linear.py).
    fp8=True: the codes are float8 e4m3 (FP8 checkpoints with a scale per 128 x 128 block), the
    same kernels, x kept in 16 bits."""

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False,
                 offsets: bool = False, act_order: bool = False, fp8: bool = False):
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"an 8-bit layer needs its input size ({in_features}) to be a multiple of the group "
                             f"size ({group_size})")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        num_groups = in_features // group_size
        code_dtype = FP8_DTYPE if fp8 else torch.int8       # fp8: e4m3 codes (block-scaled FP8 checkpoints)
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=code_dtype))     # [N, K]
        self.register_buffer("scales", torch.empty(out_features, num_groups, dtype=torch.float32))    # [N, G]
        self.register_buffer("offsets", torch.empty(out_features, num_groups, dtype=torch.float32)   # [N, G]
                             if offsets else None)
        # GPTQ desc_act, as W4A16Linear's
        self.register_buffer("input_perm", torch.empty(in_features, dtype=torch.int64) if act_order else None)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return w8a16_linear(_in_group_order(x, self.input_perm), self.qweight, self.scales, self.offsets, self.bias)

    def forward_or_partials(self, x: torch.Tensor) -> torch.Tensor:
        """forward(x) [M, N], or its float32 partial products [S, M, N] (ops/linear.py)."""
        return w8a16_linear_or_partials(_in_group_order(x, self.input_perm), self.qweight, self.scales, self.offsets,
                                        self.bias)

    def extra_repr(self) -> str:
        return (f"w8a16, in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, offsets={self.offsets is not None}, "
                f"act_order={self.input_perm is not None}, codes={str(self.qweight.dtype).removeprefix('torch.')}")
