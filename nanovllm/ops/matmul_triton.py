"""A matrix product whose output rows do not depend on how many rows it is given (Triton).

cuBLAS picks its kernel by the product's shape: a different tile, a split of K, another order of
adding up. So row r of x @ W.T can round differently when x has 1 row, 7 rows or 300, and a request's
greedy tokens then depend on which requests happened to share its step. With `--batch-invariant`
every linear layer runs this kernel instead, whose work for one output element is fixed:

    program (row tile, column tile):             BLOCK_M x BLOCK_N outputs
        acc = 0 (float32)
        for k0 in 0, BLOCK_K, 2 BLOCK_K, ... < K:   always the same slices of K, in order
            acc += x[rows, k0:k0+BLOCK_K] @ W[cols, k0:k0+BLOCK_K].T
        out = acc (+ bias), rounded once to the output dtype

The tile sizes are constants, never chosen from the number of rows, and nothing splits K; a row's
products meet no other row's (rows past M are loaded as zeros and not stored). So the bits of row r
depend on x[r] and W only. The cost is the freedom cuBLAS had: docs/reference/gpu-kernels.md measures it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 64
GROUP_M = 8          # row tiles that walk the columns together, so a slice of W is read once for 8 of them
NUM_WARPS, NUM_STAGES = 4, 4


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program pid's output tile (row tile, column tile) on one axis of programs: groups of GROUP_M
    row tiles take the column tiles in turn, so the programs running together share a slice of W
    (the order changes which program computes a tile, never how)."""
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % group_size) % rows_in_group, (pid % group_size) // rows_in_group


@triton.jit(do_not_specialize=["M"])   # one compiled kernel for any number of rows
def _matmul_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K,
                   stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
                   HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_STAGES: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_valid, n_valid = offs_m < M, offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        k_valid = (k0 + offs_k) < K
        x = tl.load(x_rows + (k0 + offs_k)[None, :] * stride_xk, mask=m_valid[:, None] & k_valid[None, :], other=0.0)
        w = tl.load(w_cols + (k0 + offs_k)[:, None] * stride_wk, mask=k_valid[:, None] & n_valid[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(x, w, acc, input_precision="ieee")        # [BLOCK_M, BLOCK_K] @ [BLOCK_K, BLOCK_N]
        else:
            acc = tl.dot(x, w, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_valid, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_valid[:, None] & n_valid[None, :])


def matmul_batch_invariant_triton(x: torch.Tensor, weight: torch.Tensor,
                                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight [N, K].T (+ bias [N]) -> [..., N] in x's dtype; float32 accumulation.
    Row r of the result is the same, bit for bit, whatever the other rows of x are (see above)."""
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} columns but the weight takes {k}")
    rows = x.reshape(-1, k)
    m = rows.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        grid = (triton.cdiv(m, BLOCK_M) * triton.cdiv(n, BLOCK_N),)
        _matmul_kernel[grid](rows, weight, bias if bias is not None else weight, out, m, n, k,
                             rows.stride(0), rows.stride(1), weight.stride(0), weight.stride(1),
                             out.stride(0), out.stride(1),
                             HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
                             BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M,
                             NUM_STAGES=NUM_STAGES, num_warps=NUM_WARPS)
    return out.view(*x.shape[:-1], n)
