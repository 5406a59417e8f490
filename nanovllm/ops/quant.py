"""Weight-only quantized matmuls for the CPU: int8 per output channel, int4 in groups.

Decoding one token at a time multiplies a single row by every weight of the
model, so a decode step costs the time it takes to *read* the weights: 538 MB
in float32 for SmolLM2-135M. Storing them in fewer bits reads fewer bytes:

- **int8, per output channel**: row n of W is `q[n, :] * scale[n]`, q in
  [-127, 127]. 1 byte a weight. torch's `_weight_int8pack_mm` multiplies
  without widening W in memory.
- **int4, in groups of 32 along K**: each run of 32 weights of a row has its
  own scale and zero, `w = (q - 8) * scale + zero`, q in [0, 15]. Half a byte
  a weight, plus 4 bytes of scale/zero per 32. This is GGUF's Q4_1 (`d * q + m`
  with scale = d, zero = m + 8 d), so a Q4_1 checkpoint -- the embedded model --
  is reproduced up to bfloat16 rounding of d and m. torch's
  `_weight_int4pack_mm_for_cpu` unpacks inside the kernel.

Both torch kernels take bfloat16 inputs and return bfloat16 (their float32
paths are 10-100x slower on this CPU), so `PackedLinear` casts at its edges and
the model around it stays float32. Each quantized matmul has a plain-torch
reference (dequantize, then `F.linear`) that the tests compare the kernel against.

**numba's int4 kernel** (quant_numba.py) replaces torch's where the CPU has
AVX-512 VNNI: it rounds the activation to int16 per group of 32 (not to
bfloat16) and multiplies in integers, at one row 1.0-1.8x torch's speed per
shape on a loaded machine (docs/reference/cpu-kernels.md). It is
batch-invariant too. `PackedLinear.kernel` says which one a layer runs.

**Batch invariance.** torch's int4 kernel computes each output row the same
way whatever the number of rows beside it (its K loop runs in one order per
output; rows are tiled, never reduced together), so an int4 layer uses it for
every step, one row or a 512-token prefill chunk: a request's greedy text then
does not depend on what it is batched with, how its prompt is chunked, or
whether its prefix came from the cache. The cost is prefill: at 64 rows the
packed kernel multiplies about 2.5x slower than a bfloat16 GEMM on this CPU
(docs/reference/cpu-kernels.md).

int8 keeps two paths: its packed kernel walks the weights once per input row,
so it wins only for a few rows (decode); for prefill chunks and large batches
the matmul is compute-bound and a bfloat16 GEMM (AMX on this CPU) is several
times faster. An int8 `PackedLinear` therefore keeps both: the packed weight
for steps of up to `max_packed_rows` rows and a bfloat16 copy for larger ones.
On the first large step the bfloat16 copy is also reordered into oneDNN's
blocked layout (when torch has oneDNN with bfloat16), which multiplies 1.2-2x
faster than `F.linear` on the plain copy here, with the same result. The two
paths round differently, so int8's greedy output can change with the load.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

INT4_GROUP_SIZE = 32          # GGUF's block size for Q4_0/Q4_1/Q8_0
INT8_K_MULTIPLE = 16          # torch 2.13's int8 kernel crashes on other input sizes
PACKED_MAX_ROWS = 8           # measured crossover, see docs/reference/cpu-fast-path.md
ONEDNN_ROWS_HINT = 16         # the row count oneDNN's weight layout is tuned for (any count works)


# ---- int8, one scale per output channel -----------------------------------------------------

def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] float -> (q [N, K] int8 in [-127, 127], scales [N] float32), w ~ q * scales[:, None]."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)   # [N]
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)              # [N, K]
    return q, scales


def int8_linear_torch(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Reference: x [M, K], q [N, K] int8, scales [N] -> x @ (q * scales)^T [M, N] in x's dtype."""
    return (F.linear(x.float(), q.float()) * scales.float()).to(x.dtype)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] bfloat16, q [N, K] int8 (K a multiple of 16), scales [N] bfloat16 -> [M, N] bfloat16."""
    return torch._weight_int8pack_mm(x, q, scales)


# ---- int4, a scale and a zero per group of 32 along K ---------------------------------------

def quantize_int4(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] float -> (q [N, K] int32 in [0, 15], scale_and_zero [K / group_size, N, 2] float32).

    Each group maps its range [min, max] onto 0..15 (asymmetric, like Q4_1), so
    a group that was Q4_1 comes back to its own codes.
    """
    num_rows, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"int4 needs the input size ({in_features}) to be a multiple of {group_size}; "
                         "use dtype='int8' or 'bfloat16' for this model")
    groups = weight.float().reshape(num_rows, in_features // group_size, group_size)   # [N, G, g]
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)                                 # [N, G]
    scale = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15)
    zero = low + 8 * scale                                     # so that w = (q - 8) * scale + zero
    scale_and_zero = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()   # [G, N, 2]
    return q.to(torch.int32).reshape(num_rows, in_features), scale_and_zero


def dequantize_int4(q: torch.Tensor, scale_and_zero: torch.Tensor) -> torch.Tensor:
    """q [N, K] int32, scale_and_zero [G, N, 2] -> w [N, K] float32."""
    num_rows, in_features = q.shape
    num_groups = scale_and_zero.shape[0]
    scale, zero = scale_and_zero.float().transpose(0, 1).unbind(-1)                      # [N, G] each
    groups = q.float().reshape(num_rows, num_groups, in_features // num_groups)
    return ((groups - 8) * scale[..., None] + zero[..., None]).reshape(num_rows, in_features)


def int4_linear_torch(x: torch.Tensor, q: torch.Tensor, scale_and_zero: torch.Tensor) -> torch.Tensor:
    """Reference: x [M, K], q [N, K] int32 codes, scale_and_zero [G, N, 2] -> [M, N] in x's dtype."""
    return F.linear(x.float(), dequantize_int4(q, scale_and_zero)).to(x.dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] int32 in [0, 15] -> torch's CPU layout for `int4_linear`: [N, K / 2] uint8."""
    if q.shape[0] % 16:
        raise ValueError(f"torch's int4 CPU kernel needs the output size ({q.shape[0]}) to be a multiple of 16; "
                         "use dtype='int8' or 'bfloat16' for this model")
    return torch._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale_and_zero: torch.Tensor) -> torch.Tensor:
    """x [M, K] bfloat16, packed [N, K / 2] uint8, scale_and_zero [G, N, 2] bfloat16 -> [M, N] bfloat16."""
    group_size = x.shape[-1] // scale_and_zero.shape[0]
    return torch._weight_int4pack_mm_for_cpu(x, packed, group_size, scale_and_zero)


# ---- the module ---------------------------------------------------------------------------

class PackedLinear(nn.Module):
    """A linear layer with its weight packed (int8: `packed` int8 [N, K]; int4: uint8 [N, K / 2]).
    int4 multiplies every step through the packed kernel (batch-invariant); int8 does so for steps
    of up to `max_packed_rows` rows and through a bfloat16 copy (`dense`) for larger steps.
    The format follows from `packed`'s dtype. Inputs and outputs keep the caller's dtype."""

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, dense: torch.Tensor | None,
                 bias: torch.Tensor | None = None, max_packed_rows: int = PACKED_MAX_ROWS):
        super().__init__()
        self.register_buffer("packed", packed)    # int8 [N, K] | uint8 [N, K / 2]
        self.register_buffer("scales", scales)    # int8: bfloat16 [N]; int4: bfloat16 [K / 32, N, 2]
        self.register_buffer("dense", dense)      # int8: bfloat16 [N, K]; int4: None
        self.register_buffer("bias", bias)        # bfloat16 [N] or None
        self.fmt = "int8" if packed.dtype == torch.int8 else "int4"
        if self.fmt == "int8" and dense is None:
            raise ValueError("an int8 PackedLinear needs its bfloat16 copy (dense) for steps of many rows")
        self.max_packed_rows = max_packed_rows if self.fmt == "int8" else None   # int4: every step packed
        self.out_features = scales.shape[-1] if self.fmt == "int8" else scales.shape[1]
        self.in_features = packed.shape[1] if self.fmt == "int8" else 2 * packed.shape[1]
        self._matmul = int8_linear if self.fmt == "int8" else int4_linear
        self._onednn_dense: torch.Tensor | None = None   # `dense` in oneDNN's layout, made on first use
        # int4: numba's kernel (quant_numba.py) where it runs, for every step (batch-invariant too)
        self.kernel = "numba" if self.fmt == "int4" and _int4_numba_fits(packed) else "torch"
        self._int4_tiles = None                           # the weight in numba's layout, made on first use
        self.activation_bits = 16     # numba's kernel rounds x to int16 per group of 32 (8: int8, RefinedLMHead's)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, fmt: str, bias: torch.Tensor | None = None,
                    max_packed_rows: int = PACKED_MAX_ROWS) -> "PackedLinear":
        """weight [N, K] (float32 preferred: quantized before any bfloat16 rounding), fmt "int8" | "int4"."""
        if fmt == "int8":
            if weight.shape[1] % INT8_K_MULTIPLE:
                raise ValueError(f"torch's int8 CPU kernel needs the input size ({weight.shape[1]}) to be a "
                                 f"multiple of {INT8_K_MULTIPLE}; keep this layer in float32")
            q, scales = quantize_int8(weight)
            return cls(q, scales.to(torch.bfloat16), weight.to(torch.bfloat16).contiguous(), bias, max_packed_rows)
        if fmt == "int4":
            q, scale_and_zero = quantize_int4(weight)
            return cls(pack_int4(q), scale_and_zero.to(torch.bfloat16), None, bias)
        raise ValueError(f"PackedLinear format must be 'int8' or 'int4', got {fmt!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> [M, N]."""
        if self.kernel == "numba":
            return self._forward_numba(x)
        xb = x.to(torch.bfloat16)
        if self.max_packed_rows is None or x.shape[0] <= self.max_packed_rows:
            out = self._matmul(xb, self.packed, self.scales)
            out = out if self.bias is None else out + self.bias
        elif _onednn_bfloat16(self.dense):
            if self._onednn_dense is None:
                self._onednn_dense = torch.ops.mkldnn._reorder_linear_weight(self.dense, ONEDNN_ROWS_HINT)
            out = torch.ops.mkldnn._linear_pointwise(xb, self._onednn_dense, self.bias, "none", [], "")
        else:
            out = F.linear(xb, self.dense, self.bias)
        return out.to(x.dtype)

    def _forward_numba(self, x: torch.Tensor) -> torch.Tensor:
        if self._int4_tiles is None:
            from nanovllm.ops.quant_numba import tiles_from_torch_int4
            self._int4_tiles = tiles_from_torch_int4(self.packed, self.scales)
        out = _int4_linear_numba()(x, self._int4_tiles, self.activation_bits)   # [M, N] float32
        if self.bias is not None:
            out += self.bias
        return out if x.dtype == torch.float32 else out.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.fmt}, kernel={self.kernel}, in_features={self.in_features}, out_features={self.out_features}, "
                f"max_packed_rows={self.max_packed_rows}")


@functools.cache
def _int4_linear_numba():
    from nanovllm.ops.quant_numba import int4_linear_numba
    return int4_linear_numba


def _int4_numba_fits(packed: torch.Tensor) -> bool:
    """Whether numba's int4 kernel takes this CPU weight: it runs here, and the rows come in torch's
    blocks of 64 (quant_numba.py unpacks those)."""
    from nanovllm.ops import int4_numba_supported
    return packed.device.type == "cpu" and packed.shape[0] % 64 == 0 and int4_numba_supported()


def _onednn_bfloat16(weight: torch.Tensor) -> bool:
    """Whether torch's oneDNN can multiply by this bfloat16 CPU weight in its own layout."""
    return weight.device.type == "cpu" and onednn_bfloat16_supported()


@functools.cache
def onednn_bfloat16_supported() -> bool:
    """Whether torch's oneDNN multiplies bfloat16 on this CPU with its own instructions (AVX-512 BF16,
    AMX); without them a bfloat16 product is emulated, about 15x slower than float32 (an AVX2 AMD EPYC)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def top_k_indices(scores: torch.Tensor, k: int, chunk: int = 64) -> torch.Tensor:
    """scores [N, V] -> the indices [N, k] of each row's k largest (in no particular order): the same
    set as `scores.topk(k).indices` (up to ties), 3x faster on a CPU for a vocabulary-sized row.

    The k largest lie in the k chunks (of `chunk` scores) with the largest maxima: were one in another
    chunk, k chunks' maxima would all be at least as large, k + 1 scores in all. So: one max per
    chunk, top-k of the chunks, top-k of their k * chunk scores.
    """
    num_rows, size = scores.shape
    if size % chunk or size < 2 * k * chunk:
        return scores.topk(k, dim=-1).indices
    chunks = scores.view(num_rows, size // chunk, chunk)                        # [N, V / c, c]
    best_chunks = chunks.amax(dim=-1).topk(k, dim=-1).indices                  # [N, k]
    candidates = chunks.gather(1, best_chunks[..., None].expand(num_rows, k, chunk))   # [N, k, c]
    best = candidates.view(num_rows, k * chunk).topk(k, dim=-1).indices        # [N, k] into candidates
    return best_chunks.gather(1, best // chunk) * chunk + best % chunk


class RefinedLMHead(nn.Module):
    """The LM head as a PackedLinear, with the logits of each row's `top_k` candidates recomputed
    in float32 from the float32 weight.

    The packed kernels return bfloat16, whose 8 significant bits leave a logit of 13 uncertain by
    0.05: enough to swap the top two tokens wherever they are that close (one position in ten for
    a 135M model). Recomputing the few logits that compete for the top costs a gather of
    `top_k` rows per sequence; the rest keep the packed head's precision.

    On numba's kernel the coarse pass rounds x to int8 per group of 32, not int16 as the decoder's
    layers do: its job is to rank the candidates, whose logits are then recomputed, and its other
    logits already carry the int4 weights' error, which is larger (a batch-16 head on one thread
    5.7 -> 4.0 ms on a 2-core AMD EPYC; the quality guard of tests/test_cpu_formats.py holds).
    """

    def __init__(self, coarse: PackedLinear, weight: torch.Tensor, top_k: int = 32):
        super().__init__()
        self.coarse = coarse
        coarse.activation_bits = 8
        self.register_buffer("weight", weight)   # float32 [V, H], shared with a tied embedding
        self.top_k = top_k

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] float32 -> logits [N, V] float32."""
        logits = self.coarse(hidden).float()                                    # [N, V]
        candidates = top_k_indices(logits, min(self.top_k, logits.shape[-1]))  # [N, k]
        exact = torch.einsum("nh,nkh->nk", hidden.float(), self.weight[candidates].float())   # [N, k]
        return logits.scatter_(1, candidates, exact)
