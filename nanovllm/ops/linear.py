"""Matrix products of a few rows: split K so that cuBLAS keeps every SM reading the weight.

A decode step of a few sequences multiplies a few rows by each weight matrix, so a product takes
as long as reading its weight. cuBLAS tiles the output 64 columns a tile at batch 1: o_proj of
Llama-3.2-1B (2048 x 2048) is 32 tiles, so 32 of an H200's 132 SMs do all the reading, at 1.4 of
its 4.2 TB/s (docs/reference/gpu-kernels.md). Splitting K into S slices makes S times as many
tiles: one strided batched GEMM (`torch.bmm` over views of x and W, nothing copied) returns the
S partial products [S, T, N] in float32, and the kernel that reads the product next adds them up
as it loads them (`add_rms_norm` accepts partials), so the split costs no extra kernel. The
products stay cuBLAS's; only the shape of the call is ours.

Where it is used: o_proj and down_proj, whose next kernel is the residual-add + RMSNorm. Not
qkv_proj: its 48 tiles gain less (6.1 -> 5.6 us) than reading the partials back cost the RoPE
kernel after it when tried (+0.7 us), and not gate_up_proj, which already has 256 tiles.
On the CPU, and for more rows than SPLIT_K_MAX_ROWS, nothing is split.

Batch-invariant layers (`BatchInvariantLinear`, `--batch-invariant`) never split: how many slices a
product gets depends on its number of rows, and so would the rounding of every row.
"""
from __future__ import annotations

import torch
from torch import nn

from nanovllm.ops import sm_count

SPLIT_K_MAX_ROWS = 16      # measured to pay up to 16 rows (tools/splitk_probe.py)
_TILE_COLUMNS = 64         # the output columns of one cuBLAS tile at batch 1 (its kernel names: 64x8)
_MAX_SPLITS = 8            # each slice adds T x N float32 that the consumer reads back (~0.1 us per
                           # slice for 2048 columns: one program per row reads them all)
_MIN_SLICE = 256           # a slice of K shorter than this is not worth a tile


class BatchInvariantLinear(nn.Linear):
    """An nn.Linear whose output row for an input row is the same bits whatever else is in the batch:
    on CUDA the fixed-tile Triton product (ops/matmul_triton.py), never split; elsewhere nn.Linear's."""

    @classmethod
    def of(cls, layer: nn.Linear) -> "BatchInvariantLinear":
        """A batch-invariant layer over `layer`'s own parameters (tied weights stay tied)."""
        invariant = cls(layer.in_features, layer.out_features, bias=False, device="meta")
        invariant.weight, invariant.bias = layer.weight, layer.bias
        return invariant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from nanovllm.ops.matmul_triton import matmul_batch_invariant_triton
            return matmul_batch_invariant_triton(x, self.weight, self.bias)
        return super().forward(x)

    def forward_or_partials(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)   # whole rows, never partial sums over a split of K


def split_k_count(num_rows: int, n: int, k: int, device: torch.device) -> int:
    """How many slices of K to split a [num_rows, k] x [k, n] product into: the most (a power of 2,
    up to 8) that keeps the tiles within one per SM; 1 means a plain product. (Up to two tiles per
    SM split as far, but the consumer's extra reads then ate the gain.)"""
    if device.type != "cuda" or num_rows > SPLIT_K_MAX_ROWS:
        return 1
    tiles, sms = -(-n // _TILE_COLUMNS), sm_count(device)
    splits = 1
    while (splits < _MAX_SPLITS and tiles * splits * 2 <= sms
           and k % (splits * 2) == 0 and k // (splits * 2) >= _MIN_SLICE):
        splits *= 2
    return splits


def linear_partials(x: torch.Tensor, weight: torch.Tensor, splits: int) -> torch.Tensor:
    """x [T, K] times weight [N, K] transposed, as `splits` partial products over slices of K:
    [S, T, N] float32, whose sum over S is x @ weight.T."""
    (t, k), n = x.shape, weight.shape[0]
    xs = x.view(t, splits, k // splits).transpose(0, 1)                  # [S, T, K/S]
    ws = weight.view(n, splits, k // splits).permute(1, 2, 0)            # [S, K/S, N]: W's slices, transposed views
    if x.is_cuda:
        return torch.bmm(xs, ws, out_dtype=torch.float32)                # cuBLAS accumulates and writes in float32
    return torch.bmm(xs.float(), ws.float())                             # the CPU has no bmm with out_dtype


def linear_or_partials(x: torch.Tensor, layer: nn.Module, may_split: bool = True) -> torch.Tensor:
    """layer(x) [T, N]; or, for a plain bias-free nn.Linear where splitting K pays, the partial
    products [S, T, N] float32, for a consumer that adds them up (add_rms_norm). may_split=False:
    always layer(x) (tensor parallelism, whose all-reduce would carry S float32 copies instead of one)."""
    if may_split and hasattr(layer, "forward_or_partials"):   # quantized layers split K in their own kernels
        return layer.forward_or_partials(x)
    if may_split and type(layer) is nn.Linear and layer.bias is None:
        splits = split_k_count(x.shape[0], *layer.weight.shape, x.device)
        if splits > 1:
            return linear_partials(x.contiguous(), layer.weight, splits)
    return layer(x)
