"""The Llama decoder on the CPU as one compiled call per step: llama.py's forward, in numba.

llama.py runs a decoder layer as dozens of dispatched torch ops (two RMSNorms,
four int4 matmuls, RoPE, the KV store, attention, SiLU-and-mul, residual adds
and casts), each a few microseconds of Python and dispatch around a kernel
that, at one row, is itself only tens of microseconds. Here the whole stack
of layers is one compiled function, run once per step:

    h = embed_tokens[input_ids]                                        [T, H]
    for each layer:
        xq = int16(rms_norm(h))                                        [T, H]
        q, k, v = int4 qkv GEMV (quant_numba._tile)                     [T, Hq + 2 Hkv, D]
        RoPE, store k and v in their cache slots, attention            [T, Hq, D]
        h += int4 o_proj(int16(attention))                             [T, H]
        gate, up = int4 gate_up GEMV(int16(rms_norm(h)))               [T, 2I]
        h += int4 down(int16(silu(gate) * up))                         [T, H]
    hidden = rms_norm(h)                                               [T, H]

It reuses the int4 kernel of quant_numba.py (weights repacked once into
its tiles, activations rounded to int16 per group of 32) and the RoPE, KV
store and attention of attention_numba.py, so a row's arithmetic is the one of
the unfused numba path except for RMSNorm and SiLU, which are plain loops here
instead of torch's vectorized ones (last-bit differences). Every stage computes
each row (or each tile of 16 output features, or each (row, head) of the
attention) by the same loop whatever the rows beside it, so a step's result
for a row does not depend on its batch: prefill chunks and decodes run the
same code, and `int4` stays batch-invariant.

Two drivers run it: `_forward_serial` on the calling thread and
`_forward_parallel`, which splits every matmul by tiles and the attention by
(row, head) over numba's threads. A parallel region costs a workqueue launch
(50-150 us on a 2-core VM, docs/reference/cpu-kernels.md) and a step has six
per layer, so small steps (decodes of a few sequences) run serially
(`PARALLEL_MIN_ROWS`). Scratch buffers are made once and grown when a step
has more rows than any before.

Used where `FusedDecoder.of(model)` accepts the model: one CPU process, every
decoder matmul an int4 `PackedLinear` on numba's kernel without bias, no
per-head q/k norm (Qwen3), a float32 KV cache in one tensor. Otherwise, or
with NANOVLLM_FUSED_CPU=0, llama.py's forward runs.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from numba import njit, prange

from nanovllm.model.llama import KVCache, LlamaForCausalLM
from nanovllm.ops.attention import AttentionMetadata
from nanovllm.ops.attention_numba import _attend, _launch_lock, _rotary_store, _row_sequences
from nanovllm.ops.quant import PackedLinear
from nanovllm.ops.quant_numba import GROUP_SIZE, TILE_ROWS, _quantize_activation_into, _tile, tiles_from_torch_int4

# Steps of at least this many rows run the parallel driver. Below it the six workqueue launches per
# layer cost more than the second core gives back (measured in docs/reference/cpu-kernels.md).
PARALLEL_MIN_ROWS = 24


def fused_cpu_enabled() -> bool:
    """NANOVLLM_FUSED_CPU=0 turns the fused decoder off (llama.py's forward runs): for A/B runs."""
    return os.environ.get("NANOVLLM_FUSED_CPU", "1") != "0"


class FusedDecoder:
    """A LlamaForCausalLM's decoder layers, stacked for the compiled forward (shapes per layer L)."""

    def __init__(self, model: LlamaForCausalLM):
        config = model.config
        attention = model.layers[0].self_attn
        self.num_heads, self.num_kv_heads, self.head_dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
        self.hidden_size, self.intermediate_size = config.hidden_size, config.intermediate_size
        self.scale = np.float32(attention.scale)
        self.eps = np.float32(model.norm.eps)
        self.embed = model.embed_tokens.weight.detach().float().contiguous().numpy()          # [V, H]
        self.final_norm = model.norm.weight.detach().float().contiguous().numpy()            # [H]
        self.norms = np.stack([np.stack([layer.input_layernorm.weight.detach().float().numpy(),
                                         layer.post_attention_layernorm.weight.detach().float().numpy()])
                               for layer in model.layers])                                    # [L, 2, H]
        self.cos_sin = attention.cos_sin_cache.float().contiguous().numpy()                 # [P, D]
        # Each matmul as three stacked arrays [L, ...]: codes, scales, lows (quant_numba.Int4Tiles).
        self.qkv = _stacked([layer.self_attn.qkv_proj for layer in model.layers])
        self.o = _stacked([layer.self_attn.o_proj for layer in model.layers])
        self.gate_up = _stacked([layer.mlp.gate_up_proj for layer in model.layers])
        self.down = _stacked([layer.mlp.down_proj for layer in model.layers])
        self.capacity = 0                           # rows the scratch buffers hold
        self.scratch: tuple[np.ndarray, ...] = ()
        self._kv_caches: list[KVCache] | None = None
        self._kv_cache: np.ndarray | None = None   # [L, 2, num_blocks, block_size, Hkv, D] float32

    @classmethod
    def of(cls, model: LlamaForCausalLM) -> "FusedDecoder | None":
        """The fused decoder of `model`, or None where the compiled forward does not cover it."""
        if not fused_cpu_enabled() or model.parallel.world_size != 1 or model.config.qk_norm:
            return None
        if model.embed_tokens.weight.device.type != "cpu" or model.batch_invariant:
            return None
        for layer in model.layers:
            linears = (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
            if not all(isinstance(m, PackedLinear) and m.kernel == "numba" and m.bias is None for m in linears):
                return None
        return cls(model)

    def kv_cache_of(self, kv_caches: list[KVCache]) -> np.ndarray | None:
        """The one float32 tensor [L, 2, ...] whose views the runner passes as (k_cache, v_cache) per
        layer (model_runner.py allocates it so), as numpy; None if they are separate tensors."""
        if kv_caches is self._kv_caches:
            return self._kv_cache
        base = kv_caches[0][0]._base
        ok = (base is not None and base.dtype == torch.float32 and base.dim() == 6 and base.shape[0] == len(kv_caches)
              and base.shape[1] == 2 and base.is_contiguous()
              and all(k.data_ptr() == base[i, 0].data_ptr() and v.data_ptr() == base[i, 1].data_ptr()
                      for i, (k, v) in enumerate(kv_caches)))
        self._kv_caches, self._kv_cache = kv_caches, base.numpy() if ok else None
        return self._kv_cache

    def _scratch(self, num_rows: int) -> tuple[np.ndarray, ...]:
        """Flat float32/int16 buffers for num_rows rows (made again, twice as large, when outgrown)."""
        if num_rows > self.capacity:
            self.capacity = max(num_rows, 2 * self.capacity)
            rows = self.capacity
            hidden, q_size = self.hidden_size, self.num_heads * self.head_dim
            qkv_size = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
            widest = max(hidden, q_size, self.intermediate_size)
            self.scratch = (
                np.empty(rows * hidden, np.float32),                   # h: the residual stream [T, H]
                np.empty(rows * hidden, np.float32),                   # x: a normed or projected [T, H]
                np.empty(rows * widest, np.int16),                     # xq: an int16 activation [T, K]
                np.empty(rows * widest // GROUP_SIZE, np.float32),     # dx: its scales [T, K / 32]
                np.empty(rows * widest // GROUP_SIZE, np.float32),     # sx: its group sums [T, K / 32]
                np.empty(rows * qkv_size, np.float32),                 # qkv [T, Hq + 2 Hkv, D]
                np.empty(rows * q_size, np.float32),                   # q after RoPE [T, Hq, D]
                np.empty(rows * q_size, np.float32),                   # attention [T, Hq, D]
                np.empty(rows * 2 * self.intermediate_size, np.float32),   # gate | up [T, 2I]
                np.empty(rows * self.intermediate_size, np.float32),   # silu(gate) * up [T, I]
            )
        return self.scratch

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata,
                 kv_cache: np.ndarray) -> torch.Tensor:
        """input_ids, positions [T] -> hidden states [T, H] after the final norm, like llama.py's forward."""
        num_rows = input_ids.shape[0]
        out = np.empty((num_rows, self.hidden_size), np.float32)                              # [T, H]
        args = (input_ids.numpy(), positions.numpy(), metadata.slot_mapping.numpy(),
                metadata.query_start_loc.numpy(), metadata.seq_lens.numpy(), metadata.block_tables.numpy(),
                self.embed, self.norms, self.final_norm, self.eps, self.cos_sin, kv_cache, self.scale,
                self.num_heads, self.num_kv_heads, *self.qkv, *self.o, *self.gate_up, *self.down,
                *self._scratch(num_rows), out)
        if num_rows < PARALLEL_MIN_ROWS:
            _forward_serial(*args)
        else:
            with _launch_lock:
                _forward_parallel(*args)
        return torch.from_numpy(out)


def _stacked(linears: list[PackedLinear]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The layers' int4 weights in quant_numba's tiles, stacked: codes [L, N / 16 * G * 256] uint8,
    scales and lows [L, N / 16 * G * 16] float32."""
    tiles = [m._int4_tiles if m._int4_tiles is not None else tiles_from_torch_int4(m.packed, m.scales)
             for m in linears]
    return (np.stack([t.weight for t in tiles]), np.stack([t.scale for t in tiles]),
            np.stack([t.low for t in tiles]))


# ---- the compiled forward ----------------------------------------------------------------------

@njit(cache=True, boundscheck=False)
def _rms_norm_rows(x, weight, eps, out):
    """out [T, H] = x / sqrt(mean(x^2) + eps) * weight, row by row, in float32."""
    for t in range(x.shape[0]):
        total = np.float32(0.0)
        for j in range(x.shape[1]):
            total += x[t, j] * x[t, j]
        inverse = np.float32(1.0) / np.sqrt(total / np.float32(x.shape[1]) + eps)
        for j in range(x.shape[1]):
            out[t, j] = x[t, j] * inverse * weight[j]


@njit(cache=True, boundscheck=False)
def _silu_and_mul_rows(gate_up, out):
    """out [T, I] = silu(gate) * up for gate_up [T, 2I] = [gate | up]."""
    size = out.shape[1]
    for t in range(out.shape[0]):
        for j in range(size):
            gate = gate_up[t, j]
            out[t, j] = gate / (np.float32(1.0) + np.exp(-gate)) * gate_up[t, size + j]


@njit(cache=True, boundscheck=False)
def _embed_rows(input_ids, embed, h):
    """h [T, H] = embed[input_ids]: the embedding lookup."""
    for t in range(h.shape[0]):
        for j in range(h.shape[1]):
            h[t, j] = embed[input_ids[t], j]


@njit(cache=True, boundscheck=False)
def _add_rows(x, h):
    """h [T, H] += x [T, H]: the residual add."""
    for t in range(h.shape[0]):
        for j in range(h.shape[1]):
            h[t, j] = x[t, j] + h[t, j]


@njit(cache=True, boundscheck=False)
def _views(num_rows, hidden, num_heads, num_kv_heads, head_dim, intermediate, h_buf, x_buf, xq_buf, dx_buf,
           sx_buf, qkv_buf, rq_buf, attn_buf, gu_buf, act_buf):
    """The scratch buffers as [T, ...] arrays of this step."""
    q_size = num_heads * head_dim
    groups_h, groups_q, groups_i = hidden // 32, q_size // 32, intermediate // 32
    return (h_buf[:num_rows * hidden].reshape((num_rows, hidden)),
            x_buf[:num_rows * hidden].reshape((num_rows, hidden)),
            (xq_buf[:num_rows * hidden].reshape((num_rows, hidden)),
             dx_buf[:num_rows * groups_h].reshape((num_rows, groups_h)),
             sx_buf[:num_rows * groups_h].reshape((num_rows, groups_h))),
            (xq_buf[:num_rows * q_size].reshape((num_rows, q_size)),
             dx_buf[:num_rows * groups_q].reshape((num_rows, groups_q)),
             sx_buf[:num_rows * groups_q].reshape((num_rows, groups_q))),
            (xq_buf[:num_rows * intermediate].reshape((num_rows, intermediate)),
             dx_buf[:num_rows * groups_i].reshape((num_rows, groups_i)),
             sx_buf[:num_rows * groups_i].reshape((num_rows, groups_i))),
            qkv_buf[:num_rows * (num_heads + 2 * num_kv_heads) * head_dim].reshape(
                (num_rows, num_heads + 2 * num_kv_heads, head_dim)),
            rq_buf[:num_rows * q_size].reshape((num_rows, num_heads, head_dim)),
            attn_buf[:num_rows * q_size].reshape((num_rows, num_heads, head_dim)),
            gu_buf[:num_rows * 2 * intermediate].reshape((num_rows, 2 * intermediate)),
            act_buf[:num_rows * intermediate].reshape((num_rows, intermediate)))


@njit(cache=True, boundscheck=False)
def _forward_serial(input_ids, positions, slot_mapping, query_start_loc, seq_lens, block_tables, embed, norms,
                    final_norm, eps, cos_sin, kv_cache, scale, num_heads, num_kv_heads, qkv_w, qkv_s, qkv_l,
                    o_w, o_s, o_l, gu_w, gu_s, gu_l, down_w, down_s, down_l, h_buf, x_buf, xq_buf, dx_buf,
                    sx_buf, qkv_buf, rq_buf, attn_buf, gu_buf, act_buf, out):
    """The module docstring's forward on the calling thread; out [T, H] the final hidden states."""
    num_rows, hidden = out.shape
    head_dim = cos_sin.shape[1]
    intermediate = act_buf.shape[0] // (h_buf.shape[0] // hidden)
    h, x, xq_h, xq_q, xq_i, qkv, rq, attn, gu, act = _views(
        num_rows, hidden, num_heads, num_kv_heads, head_dim, intermediate, h_buf, x_buf, xq_buf, dx_buf, sx_buf,
        qkv_buf, rq_buf, attn_buf, gu_buf, act_buf)
    row_seq = _row_sequences(num_rows, query_start_loc, seq_lens)              # [T]
    _embed_rows(input_ids, embed, h)
    q_size = num_heads * head_dim
    attn_flat = attn_buf[:num_rows * q_size].reshape((num_rows, q_size))
    for layer in range(norms.shape[0]):
        k_cache, v_cache = kv_cache[layer, 0], kv_cache[layer, 1]
        _rms_norm_rows(h, norms[layer, 0], eps, x)
        _quantize_activation_into(x, xq_h[0], xq_h[1], xq_h[2])
        qkv2 = qkv.reshape((num_rows, qkv.shape[1] * head_dim))
        for tile in range(qkv2.shape[1] // 16):
            _tile(tile, xq_h[0], xq_h[1], xq_h[2], qkv_w[layer], qkv_s[layer], qkv_l[layer], qkv2)
        _rotary_store(qkv[:, :num_heads], qkv[:, num_heads:num_heads + num_kv_heads],
                      qkv[:, num_heads + num_kv_heads:], positions, cos_sin, k_cache, v_cache, slot_mapping, rq)
        for item in range(num_rows * num_heads):
            _attend(item, row_seq, rq, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, attn)
        _quantize_activation_into(attn_flat, xq_q[0], xq_q[1], xq_q[2])
        for tile in range(hidden // 16):
            _tile(tile, xq_q[0], xq_q[1], xq_q[2], o_w[layer], o_s[layer], o_l[layer], x)
        _add_rows(x, h)
        _rms_norm_rows(h, norms[layer, 1], eps, x)
        _quantize_activation_into(x, xq_h[0], xq_h[1], xq_h[2])
        for tile in range(gu.shape[1] // 16):
            _tile(tile, xq_h[0], xq_h[1], xq_h[2], gu_w[layer], gu_s[layer], gu_l[layer], gu)
        _silu_and_mul_rows(gu, act)
        _quantize_activation_into(act, xq_i[0], xq_i[1], xq_i[2])
        for tile in range(hidden // 16):
            _tile(tile, xq_i[0], xq_i[1], xq_i[2], down_w[layer], down_s[layer], down_l[layer], x)
        _add_rows(x, h)
    _rms_norm_rows(h, final_norm, eps, out)


@njit(parallel=True, cache=True, boundscheck=False)
def _forward_parallel(input_ids, positions, slot_mapping, query_start_loc, seq_lens, block_tables, embed, norms,
                      final_norm, eps, cos_sin, kv_cache, scale, num_heads, num_kv_heads, qkv_w, qkv_s, qkv_l,
                      o_w, o_s, o_l, gu_w, gu_s, gu_l, down_w, down_s, down_l, h_buf, x_buf, xq_buf, dx_buf,
                      sx_buf, qkv_buf, rq_buf, attn_buf, gu_buf, act_buf, out):
    """`_forward_serial` with the matmuls split by tiles and the attention by (row, head) over numba's
    threads: the same per-item code, so the same bits."""
    num_rows, hidden = out.shape
    head_dim = cos_sin.shape[1]
    intermediate = act_buf.shape[0] // (h_buf.shape[0] // hidden)
    h, x, xq_h, xq_q, xq_i, qkv, rq, attn, gu, act = _views(
        num_rows, hidden, num_heads, num_kv_heads, head_dim, intermediate, h_buf, x_buf, xq_buf, dx_buf, sx_buf,
        qkv_buf, rq_buf, attn_buf, gu_buf, act_buf)
    row_seq = _row_sequences(num_rows, query_start_loc, seq_lens)              # [T]
    _embed_rows(input_ids, embed, h)
    q_size = num_heads * head_dim
    attn_flat = attn_buf[:num_rows * q_size].reshape((num_rows, q_size))
    for layer in range(norms.shape[0]):
        k_cache, v_cache = kv_cache[layer, 0], kv_cache[layer, 1]
        _rms_norm_rows(h, norms[layer, 0], eps, x)
        _quantize_activation_into(x, xq_h[0], xq_h[1], xq_h[2])
        qkv2 = qkv.reshape((num_rows, qkv.shape[1] * head_dim))
        for tile in prange(qkv2.shape[1] // 16):
            _tile(tile, xq_h[0], xq_h[1], xq_h[2], qkv_w[layer], qkv_s[layer], qkv_l[layer], qkv2)
        _rotary_store(qkv[:, :num_heads], qkv[:, num_heads:num_heads + num_kv_heads],
                      qkv[:, num_heads + num_kv_heads:], positions, cos_sin, k_cache, v_cache, slot_mapping, rq)
        for item in prange(num_rows * num_heads):
            _attend(item, row_seq, rq, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, attn)
        _quantize_activation_into(attn_flat, xq_q[0], xq_q[1], xq_q[2])
        for tile in prange(hidden // 16):
            _tile(tile, xq_q[0], xq_q[1], xq_q[2], o_w[layer], o_s[layer], o_l[layer], x)
        _add_rows(x, h)
        _rms_norm_rows(h, norms[layer, 1], eps, x)
        _quantize_activation_into(x, xq_h[0], xq_h[1], xq_h[2])
        for tile in prange(gu.shape[1] // 16):
            _tile(tile, xq_h[0], xq_h[1], xq_h[2], gu_w[layer], gu_s[layer], gu_l[layer], gu)
        _silu_and_mul_rows(gu, act)
        _quantize_activation_into(act, xq_i[0], xq_i[1], xq_i[2])
        for tile in prange(hidden // 16):
            _tile(tile, xq_i[0], xq_i[1], xq_i[2], down_w[layer], down_s[layer], down_l[layer], x)
        _add_rows(x, h)
    _rms_norm_rows(h, final_norm, eps, out)
