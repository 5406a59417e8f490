"""llama2.c checkpoints (`stories15M.bin` and friends): a 28-byte header, then raw arrays.

    int32 dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len
    token_embedding [vocab, dim]
    rms_att [L, dim]  wq [L, dim, dim]  wk [L, kv_dim, dim]  wv [L, kv_dim, dim]  wo [L, dim, dim]
    rms_ffn [L, dim]  w1 [L, hidden, dim]  w2 [L, dim, hidden]  w3 [L, hidden, dim]
    rms_final [dim]  freq_cis_real [max_seq_len, head_dim/2]  freq_cis_imag [same]
    wcls [vocab, dim]          only if vocab_size was negative (an untied classifier)

with kv_dim = dim * n_kv_heads / n_heads. Matrices are [out, in], as in
torch. w1 is the gate, w3 the up projection, w2 the down projection. The
arrays are float32, or float16 in the half-size variant: the header does not
say which, so the file size does (28 + 4 or 2 bytes per weight). The
freq_cis tables are RoPE's cos/sin, which we compute ourselves.

llama2.c's RoPE rotates interleaved pairs (x[2i], x[2i+1]); ours rotates
halves, so wq and wk rows are reordered at load (`interleaved_to_rotate_half`).
Fixed by the format: RoPE theta 10000, RMSNorm eps 1e-5, BOS 1, EOS 2.
"""
from __future__ import annotations

import os
import struct
from typing import Iterator

import numpy as np
import torch

from nanovllm.model.config import ModelConfig, ModelConfigError
from nanovllm.model.errors import ModelLoadError
from nanovllm.model.weight_utils import interleaved_to_rotate_half

HEADER = struct.Struct("<7i")
VERSIONED_MAGIC = 0x616B3432   # "ak42": llama2.c's later export versions, a different layout


def _header(path: str) -> tuple[int, ...]:
    with open(path, "rb") as f:
        raw = f.read(HEADER.size)
    if len(raw) < HEADER.size:
        raise ModelLoadError(f"{path}: {len(raw)} bytes, too short for a llama2.c checkpoint (28-byte header)")
    header = HEADER.unpack(raw)
    if header[0] == VERSIONED_MAGIC:
        raise ModelLoadError(f"{path}: a versioned llama2.c export (magic 'ak42'); only the legacy format "
                             "(export.py --version 0) is supported")
    return header


def llama2c_config(path: str) -> ModelConfig:
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len = _header(path)
    if n_heads <= 0 or dim % n_heads:
        raise ModelConfigError(f"{path}: dim ({dim}) is not a multiple of n_heads ({n_heads}); this is not a "
                               "llama2.c checkpoint or its header is damaged")
    config = ModelConfig(
        architecture="llama", vocab_size=abs(vocab_size), hidden_size=dim, intermediate_size=hidden_dim,
        num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
        head_dim=dim // n_heads, max_position_embeddings=max_seq_len, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=vocab_size > 0, bos_token_id=1, eos_token_ids=[2], torch_dtype="float32")
    config.validate(str(path))
    return config


def _layout(config: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(array name, shape) in file order."""
    dim, hidden, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv_dim = config.num_key_value_heads * config.head_dim
    layout = [
        ("token_embedding", (config.vocab_size, dim)),
        ("rms_att", (layers, dim)), ("wq", (layers, dim, dim)), ("wk", (layers, kv_dim, dim)),
        ("wv", (layers, kv_dim, dim)), ("wo", (layers, dim, dim)),
        ("rms_ffn", (layers, dim)), ("w1", (layers, hidden, dim)), ("w2", (layers, dim, hidden)),
        ("w3", (layers, hidden, dim)),
        ("rms_final", (dim,)),
        ("freq_cis_real", (config.max_position_embeddings, config.head_dim // 2)),
        ("freq_cis_imag", (config.max_position_embeddings, config.head_dim // 2)),
    ]
    if not config.tie_word_embeddings:
        layout.append(("wcls", (config.vocab_size, dim)))
    return layout


def llama2c_weights(path: str, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    layout = _layout(config)
    num_weights = sum(int(np.prod(shape)) for _, shape in layout)
    size = os.path.getsize(path)
    dtypes = {HEADER.size + 4 * num_weights: np.float32, HEADER.size + 2 * num_weights: np.float16}
    if size not in dtypes:
        raise ModelLoadError(
            f"{path}: {size} bytes, but its header implies {HEADER.size + 4 * num_weights} (float32) or "
            f"{HEADER.size + 2 * num_weights} (float16); the file is truncated or not a llama2.c checkpoint")
    flat = np.memmap(path, dtype=dtypes[size], mode="r", offset=HEADER.size, shape=(num_weights,))
    arrays, offset = {}, 0
    for name, shape in layout:
        count = int(np.prod(shape))
        arrays[name] = flat[offset:offset + count].reshape(shape)
        offset += count

    def tensor(name: str, *index: int) -> torch.Tensor:
        return torch.from_numpy(np.array(arrays[name][index], dtype=np.float32))

    yield "model.embed_tokens.weight", tensor("token_embedding")
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        yield f"{prefix}.input_layernorm.weight", tensor("rms_att", layer)
        yield f"{prefix}.self_attn.q_proj.weight", interleaved_to_rotate_half(
            tensor("wq", layer), config.num_attention_heads)
        yield f"{prefix}.self_attn.k_proj.weight", interleaved_to_rotate_half(
            tensor("wk", layer), config.num_key_value_heads)
        yield f"{prefix}.self_attn.v_proj.weight", tensor("wv", layer)
        yield f"{prefix}.self_attn.o_proj.weight", tensor("wo", layer)
        yield f"{prefix}.post_attention_layernorm.weight", tensor("rms_ffn", layer)
        yield f"{prefix}.mlp.gate_proj.weight", tensor("w1", layer)
        yield f"{prefix}.mlp.down_proj.weight", tensor("w2", layer)
        yield f"{prefix}.mlp.up_proj.weight", tensor("w3", layer)
    yield "model.norm.weight", tensor("rms_final")
    if not config.tie_word_embeddings:
        yield "lm_head.weight", tensor("wcls")
