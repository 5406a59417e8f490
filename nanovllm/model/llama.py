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
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from nanovllm.model.config import ModelConfig
from nanovllm.model.errors import ModelLoadError
from nanovllm.ops.activation import silu_and_mul
from nanovllm.ops.attention import AttentionMetadata, paged_attention, store_kvcache
from nanovllm.ops.rmsnorm import add_rms_norm, rms_norm
from nanovllm.ops.rotary import apply_rotary, qk_norm_rotary, rope_cos_sin_cache

KVCache = tuple[torch.Tensor, torch.Tensor]   # k_cache, v_cache: [num_blocks, block_size, Hkv, D]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without residual: rms_norm(x). With it: (rms_norm(x + residual), x + residual)."""
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return add_rms_norm(x, residual, self.weight, self.eps)


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, cos_sin_cache: torch.Tensor):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.cos_sin_cache = cos_sin_cache            # [max_position, D] float32, shared by all layers

    def forward(self, positions: torch.Tensor, x: torch.Tensor, metadata: AttentionMetadata,
                kv_cache: KVCache) -> torch.Tensor:
        T = x.shape[0]
        qkv = self.qkv_proj(x)                                                  # [T, (Hq + 2 Hkv) D]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(T, self.num_heads, self.head_dim)                         # [T, Hq, D]
        k = k.reshape(T, self.num_kv_heads, self.head_dim)                      # [T, Hkv, D]
        v = v.reshape(T, self.num_kv_heads, self.head_dim)                      # [T, Hkv, D]
        if self.qk_norm:   # Qwen3: RMSNorm each head of q and k, then RoPE (one kernel on CUDA)
            q, k = qk_norm_rotary(q, k, positions, self.cos_sin_cache,
                                  self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)
        else:
            q, k = apply_rotary(q, k, positions, self.cos_sin_cache)
        k_cache, v_cache = kv_cache
        store_kvcache(k, v, k_cache, v_cache, metadata.slot_mapping)
        o = paged_attention(q, k_cache, v_cache, metadata, self.scale)          # [T, Hq, D]
        return self.o_proj(o.reshape(T, self.q_size))                           # [T, H]


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))               # [T, 2I] -> [T, I] -> [T, H]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, cos_sin_cache: torch.Tensor):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, cos_sin_cache)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                metadata: AttentionMetadata, kv_cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, metadata, kv_cache)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    """Build under `torch.device(...)` and a default dtype; the RoPE table stays float32."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        cos_sin_cache = rope_cos_sin_cache(config.head_dim, config.max_position_embeddings,
                                           config.rope_theta, config.rope_scaling)
        self.register_buffer("cos_sin_cache", cos_sin_cache, persistent=False)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, cos_sin_cache)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata,
                kv_caches: list[KVCache]) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, H] (before the LM head)."""
        x = self.embed_tokens(input_ids)                                        # [T, H]
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(positions, x, residual, metadata, kv_cache)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> float32 logits [N, V]."""
        return self.lm_head(hidden).float()

    # ---- weights ---------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HuggingFace-named tensors into the (fused) parameters; every one must be filled.

        Raises ModelLoadError for an unknown name, a wrong shape or a missing tensor.
        """
        params = dict(self.named_parameters())
        pending = {name: param.numel() for name, param in params.items()}
        for hf_name, tensor in weights:
            if "rotary_emb" in hf_name:
                continue
            if hf_name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            name, rows = self._param_slot(hf_name)
            if name not in params:
                raise ModelLoadError(f"unexpected tensor {hf_name!r}: the model has no such weight")
            target = params[name].data if rows is None else params[name].data[rows[0]:rows[1]]
            if tuple(target.shape) != tuple(tensor.shape):
                raise ModelLoadError(f"tensor {hf_name!r} has shape {tuple(tensor.shape)}, "
                                     f"the config implies {tuple(target.shape)}")
            target.copy_(tensor)
            pending[name] -= tensor.numel()
        missing = [name for name, left in pending.items() if left > 0]
        if missing:
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            raise ModelLoadError(f"missing weights: {shown}")

    def _param_slot(self, hf_name: str) -> tuple[str, tuple[int, int] | None]:
        """HF name -> (our parameter name, row range inside a fused parameter or None)."""
        name = hf_name.removeprefix("model.")
        c = self.config
        q, kv, inter = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.intermediate_size
        fused = {
            "q_proj": ("qkv_proj", (0, q)),
            "k_proj": ("qkv_proj", (q, q + kv)),
            "v_proj": ("qkv_proj", (q + kv, q + 2 * kv)),
            "gate_proj": ("gate_up_proj", (0, inter)),
            "up_proj": ("gate_up_proj", (inter, 2 * inter)),
        }
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in fused:
            fused_name, rows = fused[parts[-2]]
            return ".".join(parts[:-2] + [fused_name, parts[-1]]), rows
        return name, None
