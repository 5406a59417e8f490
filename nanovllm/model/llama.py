"""The Llama-family decoder: Llama 2/3/3.1/3.2, TinyLlama, SmolLM, Mistral, Qwen2, Qwen3.

    token ids [T] -> embed_tokens -> [T, H]
    N x decoder layer:
        x = x + attention(rms_norm(x))     GQA, RoPE, reads/writes the paged KV cache
        x = x + mlp(rms_norm(x))           SwiGLU: down(silu(gate(x)) * up(x))
    rms_norm -> lm_head -> logits [N, V], only for the N rows that need a next token

The variants differ by config only: Qwen2 adds a bias to q/k/v, Qwen3 normalizes
each head of q and k before RoPE, Llama 3.1+ scales RoPE's long wavelengths.
q/k/v are one fused matmul (`qkv_proj`) and so are gate/up (`gate_up_proj`):
fewer, larger ops. `load_weights` maps HuggingFace tensor names onto them.
At a few rows on one GPU, o_proj and down_proj return partial sums over slices
of K (ops/linear.py), which the residual-add + RMSNorm after them adds up.

Tensor parallel (see parallel.py): built with a ParallelState of N ranks, each
layer holds 1/N of the heads and MLP features (shapes below are per rank:
Hq, Hkv, I are this rank's share), attention and MLP end in one all-reduce each,
and `load_weights` copies only this rank's slice of each tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Protocol

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from nanovllm.model.config import ModelConfig
from nanovllm.model.errors import ModelLoadError
from nanovllm.model.parallel import (ATTENTION_SLOT, MLP_SLOT, ParallelState, VocabParallelEmbedding,
                                     check_tensor_parallel)
from nanovllm.ops.activation import linear_silu_and_mul
from nanovllm.ops.attention import AttentionMetadata
from nanovllm.ops.linear import BatchInvariantLinear, linear_or_partials
from nanovllm.ops.quant_format import Fp8Rows
from nanovllm.ops.quant_linear import takes_fp8_rows
from nanovllm.ops.rmsnorm import add_rms_norm, rms_norm
from nanovllm.ops.rotary import rope_cos_sin_cache, rotary_store_and_attend

KVCache = tuple[torch.Tensor, torch.Tensor]   # k_cache, v_cache: [num_blocks, block_size, Hkv, D]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, fp8: bool = False):
        """Without residual: rms_norm(x). With it: (rms_norm(x + residual), x + residual).
        fp8: the normalized rows quantized for the FP8 product after the norm (Fp8Rows)."""
        if residual is None:
            return rms_norm(x, self.weight, self.eps, fp8)
        return add_rms_norm(x, residual, self.weight, self.eps, fp8)


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, cos_sin_cache: torch.Tensor, parallel: ParallelState):
        super().__init__()
        self.parallel = parallel
        self.num_heads = config.num_attention_heads // parallel.world_size       # this rank's heads
        self.num_kv_heads = config.num_key_value_heads // parallel.world_size
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        # Column-parallel: this rank's q heads, then its k heads, then its v heads.
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        # Row-parallel: the input columns of this rank's heads; outputs are partial sums.
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.batch_invariant = False                  # use_batch_invariant_kernels sets it
        self.cos_sin_cache = cos_sin_cache            # [max_position, D] float32, shared by all layers
        # An FP8 KV cache stores k / k_scale and v / v_scale; 1.0 as vLLM when the checkpoint brings none.
        self.k_scale = 1.0
        self.v_scale = 1.0

    def forward(self, positions: torch.Tensor, x: torch.Tensor | Fp8Rows, metadata: AttentionMetadata,
                kv_cache: KVCache) -> torch.Tensor:
        T = x.shape[0]
        qkv = self.qkv_proj(x).view(T, -1, self.head_dim)                       # [T, Hq + 2 Hkv, D]
        # q [T, Hq, D], k and v [T, Hkv, D]: views of qkv's rows
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        k_cache, v_cache = kv_cache
        # Qwen3 RMSNorms each head of q and k before RoPE; the other models have no norm weights.
        q_norm_weight, k_norm_weight, eps = ((self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)
                                             if self.qk_norm else (None, None, 0.0))
        # RoPE on q and k, the new tokens' k and v into their cache slots, attention over the cache
        # -> [T, Hq, D]; on CUDA one kernel for a decode step (two for a step with prefill chunks).
        o = rotary_store_and_attend(q, k, v, positions, self.cos_sin_cache, k_cache, v_cache, metadata,
                                    self.scale, q_norm_weight, k_norm_weight, eps,
                                    batch_invariant=self.batch_invariant, k_scale=self.k_scale,
                                    v_scale=self.v_scale)
        # [T, H], or at a few rows its partial sums [S, T, H] that the next add_rms_norm adds up
        o = linear_or_partials(o.reshape(T, self.q_size), self.o_proj, self.parallel.world_size == 1)
        return self.parallel.all_reduce(o, ATTENTION_SLOT)


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, parallel: ParallelState):
        super().__init__()
        self.parallel = parallel
        intermediate_size = config.intermediate_size // parallel.world_size     # this rank's features
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * intermediate_size, bias=False)   # column-parallel
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)          # row-parallel

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        # [T, 2I] -> [T, I], quantized already where down_proj is an FP8 product (ops/quant_linear.py)
        x = linear_silu_and_mul(x, self.gate_up_proj, takes_fp8_rows(self.down_proj, x.shape[0]))
        x = linear_or_partials(x, self.down_proj, self.parallel.world_size == 1)   # [T, H] or [S, T, H]
        return self.parallel.all_reduce(x, MLP_SLOT)                            # ranks' partial sums -> their sum


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, cos_sin_cache: torch.Tensor, parallel: ParallelState):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, cos_sin_cache, parallel)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config, parallel)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                metadata: AttentionMetadata, kv_cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        # An FP8 product's input comes quantized from the norm before it (ops/quant_linear.py)
        num_tokens = positions.shape[0]
        qkv_proj, gate_up_proj = self.self_attn.qkv_proj, self.mlp.gate_up_proj
        fp8 = takes_fp8_rows(qkv_proj, num_tokens)
        if residual is None:
            residual, x = x, self.input_layernorm(x, fp8=fp8)
        else:
            x, residual = self.input_layernorm(x, residual, fp8=fp8)
        x = self.self_attn(positions, x, metadata, kv_cache)
        x, residual = self.post_attention_layernorm(x, residual, fp8=takes_fp8_rows(gate_up_proj, num_tokens))
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    """Build under `torch.device(...)` and a default dtype; the RoPE table stays float32.

    parallel: this process's rank among tensor-parallel ranks (default: the only one).
    """
    batch_invariant = False   # use_batch_invariant_kernels: every row's result independent of its batch
    _fused = None             # llama_numba.FusedDecoder, or False where it does not apply (set on the first CPU step)

    def __init__(self, config: ModelConfig, parallel: ParallelState | None = None):
        super().__init__()
        parallel = ParallelState() if parallel is None else parallel
        check_tensor_parallel(config, parallel.world_size)
        self.config = config
        self.parallel = parallel
        cos_sin_cache = rope_cos_sin_cache(config.head_dim, config.max_position_embeddings,
                                           config.rope_theta, config.rope_scaling)
        self.register_buffer("cos_sin_cache", cos_sin_cache, persistent=False)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, parallel)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, cos_sin_cache, parallel)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # This rank's vocabulary rows, as many (padded) as the embedding's.
        self.lm_head = nn.Linear(config.hidden_size, self.embed_tokens.num_embeddings, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata,
                kv_caches: list[KVCache]) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, H] (before the LM head)."""
        if input_ids.device.type == "cpu":
            hidden = self._fused_cpu_forward(input_ids, positions, metadata, kv_caches)
            if hidden is not None:
                return hidden
        x = self.embed_tokens(input_ids)                                        # [T, H]
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(positions, x, residual, metadata, kv_cache)
        x, _ = self.norm(x, residual)
        return x

    def _fused_cpu_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata,
                           kv_caches: list[KVCache]) -> torch.Tensor | None:
        """This forward as one compiled numba call (llama_numba.py) where that covers the model (int4
        on numba's kernel) and the cache (one float32 tensor); None where it does not, once a step of
        it has failed, and in a step where a layer's module has a forward hook (the compiled call runs
        no module: --viz's attention capture hooks them)."""
        if self._fused is None:     # decided on the first CPU step, after quantize_model
            self._fused = False
            if any(getattr(module, "kernel", None) == "numba" for module in self.layers.modules()):
                from nanovllm.model.llama_numba import FusedDecoder
                self._fused = FusedDecoder.of(self) or False
                self._layer_hooks = _hook_tables(self.layers.modules())
                self._head_hooks = _hook_tables(self.lm_head.modules())
        if self._fused is False or self._fused.failed is not None or _hooked(self._layer_hooks):
            return None
        kv_cache = self._fused.kv_cache_of(kv_caches)
        if kv_cache is None:
            return None
        return self._fused(input_ids, positions, metadata, kv_cache)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> logits [N, V] in the model's dtype (a view: rows may be padded); each
        tensor-parallel rank computes its vocabulary rows. The sampler reads them as they are: a
        float32 copy of a [256, 128256] batch would cost more than the whole sampling pass."""
        fused = self._fused
        if (fused and fused.head is not None and fused.failed is None and hidden.device.type == "cpu"
                and not _hooked(self._head_hooks)):
            logits = fused.logits(hidden)                                       # one compiled call (llama_numba.py)
        else:
            logits = self.parallel.all_gather(self.lm_head(hidden))             # [N, world_size * rows per rank]
        return logits[:, :self.config.vocab_size]                               # drop the padding columns

    def use_batch_invariant_kernels(self) -> None:
        """`--batch-invariant`: make every row's result independent of the rest of its batch. Each plain
        linear layer (the LM head too) becomes a fixed-tile product that never splits K
        (ops/matmul_triton.py), and attention runs one kernel configuration for decodes and prefill
        chunks alike, with no split of the context (attention_triton.py). The other kernels (RMSNorm,
        RoPE, SiLU, sampling) already work row by row."""
        for module in list(self.modules()):
            for name, child in list(module.named_children()):
                if type(child) is nn.Linear:
                    setattr(module, name, BatchInvariantLinear.of(child))
        quantized = sorted({type(m).__name__ for m in self.modules() if hasattr(m, "forward_or_partials")
                            and not isinstance(m, BatchInvariantLinear)})
        if quantized:
            raise ValueError(f"batch_invariant has kernels for float weights only; this model's {', '.join(quantized)} "
                             "layers have none (load a bfloat16 checkpoint, or drop batch_invariant)")
        for layer in self.layers:
            layer.self_attn.batch_invariant = True
        self.batch_invariant = True

    # ---- weights ---------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | SafetensorsSlice]]) -> None:
        """Copy this rank's part of HuggingFace-named tensors into the (fused) parameters; every
        parameter must be filled.

        A tensor may be a lazy safetensors slice (`safe_open(...).get_slice(name)`): then only
        this rank's rows or columns are read from the file. Full tensors are sliced here.
        Raises ModelLoadError for an unknown name, a wrong shape or a missing tensor.
        """
        params = dict(self.named_parameters())
        pending = {name: param.numel() for name, param in params.items()}
        vocab_start, vocab_end = self.parallel.vocab_range(self.config.vocab_size)
        for name in ("embed_tokens.weight", "lm_head.weight"):   # rows past this rank's vocabulary: zeros
            if name in pending:
                pending[name] = (vocab_end - vocab_start) * self.config.hidden_size
                params[name].data[vocab_end - vocab_start:].zero_()
        for hf_name, tensor in weights:
            if "rotary_emb" in hf_name:
                continue
            if hf_name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            if hf_name.endswith((".self_attn.k_scale", ".self_attn.v_scale")):
                self._load_kv_scale(hf_name, tensor)
                continue
            slot = self._param_slot(hf_name)
            if slot.name not in params:
                raise ModelLoadError(f"unexpected tensor {hf_name!r}: the model has no such weight")
            target = params[slot.name].data
            if slot.rows is not None:
                target = target[slot.rows[0]:slot.rows[1]]
            expected = list(target.shape)               # the whole tensor's shape, before splitting
            if slot.split_dim is not None:
                expected[slot.split_dim] = slot.full_size
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else tuple(tensor.get_shape())
            if shape != tuple(expected):
                raise ModelLoadError(f"tensor {hf_name!r} has shape {shape}, the config implies {tuple(expected)}")
            start, end = slot.part
            if slot.split_dim == 0:
                part = tensor[start:end]
            elif slot.split_dim == 1:
                part = tensor[:, start:end]
            else:
                part = tensor[:]
            target.copy_(part)
            pending[slot.name] -= target.numel()
        missing = [name for name, left in pending.items() if left > 0]
        if missing:
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            raise ModelLoadError(f"missing weights: {shown}")

    def _load_kv_scale(self, hf_name: str, tensor: torch.Tensor | SafetensorsSlice) -> None:
        """An FP8 KV-cache scale a checkpoint carries (compressed-tensors' `kv_cache_scheme`, as vLLM reads
        it): `layers.{i}.self_attn.k_scale` or `v_scale`, one value, the same on every rank. A float cache
        ignores it."""
        parts = hf_name.removeprefix("model.").split(".")           # layers, i, self_attn, k_scale
        value = tensor if isinstance(tensor, torch.Tensor) else tensor[...] if not tensor.get_shape() else tensor[:]
        if len(parts) != 4 or parts[0] != "layers" or not parts[1].isdigit() or int(parts[1]) >= len(self.layers):
            raise ModelLoadError(f"unexpected tensor {hf_name!r}: the model has no such layer")
        if value.numel() != 1 or not float(value) > 0:
            raise ModelLoadError(f"{hf_name} must be one positive scale (a per-tensor KV-cache scale), got "
                                 f"{value.numel()} values")
        setattr(self.layers[int(parts[1])].self_attn, parts[3], float(value))

    def _param_slot(self, hf_name: str) -> WeightSlot:
        """Where (this rank's part of) a HuggingFace tensor goes."""
        name = hf_name.removeprefix("model.")
        c, parallel = self.config, self.parallel
        q, kv, inter = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.intermediate_size
        n = parallel.world_size
        q_local, kv_local, inter_local = q // n, kv // n, inter // n
        vocab_start, vocab_end = parallel.vocab_range(c.vocab_size)
        # HF module -> (our parameter's module, rows inside it, split dim, whole size along that dim)
        layout = {
            "q_proj": ("qkv_proj", (0, q_local), 0, q),
            "k_proj": ("qkv_proj", (q_local, q_local + kv_local), 0, kv),
            "v_proj": ("qkv_proj", (q_local + kv_local, q_local + 2 * kv_local), 0, kv),
            "gate_proj": ("gate_up_proj", (0, inter_local), 0, inter),
            "up_proj": ("gate_up_proj", (inter_local, 2 * inter_local), 0, inter),
            "o_proj": ("o_proj", None, 1, q),
            "down_proj": ("down_proj", None, 1, inter),
            "embed_tokens": ("embed_tokens", (0, vocab_end - vocab_start), 0, c.vocab_size),
            "lm_head": ("lm_head", (0, vocab_end - vocab_start), 0, c.vocab_size),
        }
        parts = name.split(".")
        if len(parts) < 2 or parts[-2] not in layout:
            return WeightSlot(name, None, None, 0, (0, 0))
        module, rows, split_dim, full_size = layout[parts[-2]]
        part = (vocab_start, vocab_end) if module in ("embed_tokens", "lm_head") else parallel.shard(full_size)
        return WeightSlot(".".join(parts[:-2] + [module, parts[-1]]), rows, split_dim, full_size, part)


def _hook_tables(modules: Iterable[nn.Module]) -> list[dict]:
    """The forward-hook tables of these modules: the dicts that `register_forward_hook` and
    `register_forward_pre_hook` add to in place, so a list of them made once sees later hooks."""
    return [table for m in modules for table in (m._forward_hooks, m._forward_pre_hooks)]


def _hooked(tables: list[dict]) -> bool:
    """Whether a forward hook would run on the modules of these tables (`_hook_tables`): their own, or
    a global one. One C-level pass over the tables: 6 us for the embedded model's 271 layer modules,
    where a Python loop over the modules took 50 us, run every step of the fused CPU decoder."""
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(tables)


class SafetensorsSlice(Protocol):
    """A tensor in a safetensors file, read only when indexed (`safe_open(...).get_slice(name)`)."""

    def get_shape(self) -> list[int]: ...

    def __getitem__(self, index: Any) -> torch.Tensor: ...


@dataclass
class WeightSlot:
    """Where a HuggingFace tensor's part for this rank goes."""
    name: str                        # our parameter
    rows: tuple[int, int] | None     # row range inside a fused (or vocab-padded) parameter; None: all of it
    split_dim: int | None            # the tensor is split over ranks along rows (0), columns (1), or not (None)
    full_size: int                   # the whole tensor's size along split_dim
    part: tuple[int, int]            # this rank's range along split_dim
