"""llama2.c checkpoints run in our model exactly as llama2.c's own forward pass would run them.

The test writes a tiny random checkpoint in llama2.c's legacy format, and a
numpy transcription of run.c's `forward()` (interleaved-pair RoPE, its
rmsnorm, its attention loop) serves as the oracle. The tokenizer.bin is
written here too, and its encoder is checked against a direct transcription of
run.c's `encode()` (rescan every pair, merge the best, repeat).
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PagedSequence, assert_logits_close
from hypothesis import given, settings
from hypothesis import strategies as st

from nanovllm.model.loader import load_model, load_model_config
from nanovllm.tokenizer import IncrementalDetokenizer, Llama2cTokenizer, Tokenizer

DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, SEQ_LEN = 64, 96, 2, 4, 2, 64
HEAD_SIZE = DIM // HEADS

# Multi-character pieces of the tiny tokenizer, with their sentencepiece scores (higher merges first).
PIECES = {" ": -1.0, "e": -2.0, "t": -2.5, "h": -3.0, "o": -3.5, "n": -4.0, "a": -4.2, "c": -4.5,
          "th": -5.0, " t": -5.5, "he": -6.0, " the": -6.5, "the": -7.0, "on": -7.5, " on": -8.0,
          "ce": -8.5, "nce": -9.0, " once": -9.5, "once": -10.0, "an": -10.5, " an": -11.0, "é": -11.5}
VOCAB = 3 + 256 + len(PIECES) + 5   # <unk> <s> </s>, 256 byte pieces, the pieces, some unused slack


def tokenizer_pieces() -> list[tuple[bytes, float]]:
    pieces = [(b"<unk>", 0.0), (b"<s>", 0.0), (b"</s>", 0.0)]
    pieces += [(f"<0x{b:02X}>".encode(), 0.0) for b in range(256)]
    pieces += [(p.encode(), s) for p, s in PIECES.items()]
    pieces += [(f"<unused{i}>".encode(), -1e9) for i in range(VOCAB - len(pieces))]
    return pieces


def write_tokenizer_bin(path: Path) -> Path:
    pieces = tokenizer_pieces()
    with open(path, "wb") as f:
        f.write(struct.pack("<i", max(len(p) for p, _ in pieces)))
        for piece, score in pieces:
            f.write(struct.pack("<fi", score, len(piece)) + piece)
    return path


def random_checkpoint(tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    kv_dim = DIM * KV_HEADS // HEADS

    def w(*shape, scale=0.1):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    angles = np.arange(SEQ_LEN)[:, None] * (10000.0 ** (-np.arange(0, HEAD_SIZE, 2) / HEAD_SIZE))[None, :]
    weights = {
        "token_embedding": w(VOCAB, DIM, scale=1.0),
        "rms_att": 1 + w(LAYERS, DIM), "wq": w(LAYERS, DIM, DIM), "wk": w(LAYERS, kv_dim, DIM),
        "wv": w(LAYERS, kv_dim, DIM), "wo": w(LAYERS, DIM, DIM),
        "rms_ffn": 1 + w(LAYERS, DIM), "w1": w(LAYERS, HIDDEN, DIM), "w2": w(LAYERS, DIM, HIDDEN),
        "w3": w(LAYERS, HIDDEN, DIM),
        "rms_final": 1 + w(DIM),
        "freq_cis_real": np.cos(angles).astype(np.float32), "freq_cis_imag": np.sin(angles).astype(np.float32),
    }
    if not tied:
        weights["wcls"] = w(VOCAB, DIM)
    return weights


def write_checkpoint(path: Path, weights: dict[str, np.ndarray], dtype=np.float32) -> Path:
    vocab = VOCAB if "wcls" not in weights else -VOCAB
    with open(path, "wb") as f:
        f.write(struct.pack("<7i", DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, vocab, SEQ_LEN))
        for array in weights.values():   # dict order is llama2.c's file order
            f.write(array.astype(dtype).tobytes())
    return path


def run_c_forward(weights: dict[str, np.ndarray], tokens: list[int]) -> np.ndarray:
    """A transcription of llama2.c run.c `forward()` for each position in turn -> logits [T, V]."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    kv_dim, kv_mul = DIM * KV_HEADS // HEADS, HEADS // KV_HEADS
    key_cache = np.zeros((LAYERS, SEQ_LEN, kv_dim))
    value_cache = np.zeros((LAYERS, SEQ_LEN, kv_dim))

    def rmsnorm(x, weight):
        ss = np.sum(x * x) / x.size + 1e-5
        return weight * (x / np.sqrt(ss))

    all_logits = []
    for pos, token in enumerate(tokens):
        x = w["token_embedding"][token].copy()
        for l in range(LAYERS):
            xb = rmsnorm(x, w["rms_att"][l])
            q, k, v = w["wq"][l] @ xb, w["wk"][l] @ xb, w["wv"][l] @ xb
            for i in range(0, DIM, 2):   # RoPE: rotate each interleaved pair (i, i+1)
                head_dim = i % HEAD_SIZE
                val = pos * (1.0 / 10000.0 ** (head_dim / HEAD_SIZE))
                fcr, fci = np.cos(val), np.sin(val)
                for vec in ((q, k) if i < kv_dim else (q,)):
                    v0, v1 = vec[i], vec[i + 1]
                    vec[i], vec[i + 1] = v0 * fcr - v1 * fci, v0 * fci + v1 * fcr
            key_cache[l, pos], value_cache[l, pos] = k, v
            xb = np.zeros(DIM)
            for h in range(HEADS):
                qh = q[h * HEAD_SIZE:(h + 1) * HEAD_SIZE]
                kv = slice((h // kv_mul) * HEAD_SIZE, (h // kv_mul + 1) * HEAD_SIZE)
                att = np.array([qh @ key_cache[l, t, kv] for t in range(pos + 1)]) / np.sqrt(HEAD_SIZE)
                att = np.exp(att - att.max())
                att /= att.sum()
                xb[h * HEAD_SIZE:(h + 1) * HEAD_SIZE] = sum(att[t] * value_cache[l, t, kv] for t in range(pos + 1))
            x = x + w["wo"][l] @ xb
            xb = rmsnorm(x, w["rms_ffn"][l])
            hb, hb2 = w["w1"][l] @ xb, w["w3"][l] @ xb
            hb = hb * (1.0 / (1.0 + np.exp(-hb))) * hb2
            x = x + w["w2"][l] @ hb
        x = rmsnorm(x, w["rms_final"])
        all_logits.append((w["wcls"] if "wcls" in w else w["token_embedding"]) @ x)
    return np.stack(all_logits)


@pytest.mark.parametrize("tied, dtype", [(True, np.float32), (False, np.float32), (False, np.float16)],
                         ids=["fp32-tied", "fp32-untied", "fp16-untied"])
def test_llama2c_logits_equal_run_c_forward(tied, dtype, tmp_path):
    weights = random_checkpoint(tied)
    if dtype == np.float16:   # the oracle sees what the file holds
        weights = {k: v.astype(np.float16).astype(np.float32) for k, v in weights.items()}
    path = write_checkpoint(tmp_path / "model.bin", weights, dtype)
    ours, config = load_model(str(path))
    assert config.tie_word_embeddings == tied
    tokens = np.random.default_rng(1).integers(0, VOCAB, 23).tolist()
    expected = torch.from_numpy(run_c_forward(weights, tokens)).float()
    sequence = PagedSequence(ours, block_size=4)
    assert_logits_close(sequence.step(tokens[:13]), expected[:13])
    for position in range(13, len(tokens)):
        assert_logits_close(sequence.step([tokens[position]])[0], expected[position])


def test_llama2c_header_gives_the_config(tmp_path):
    path = write_checkpoint(tmp_path / "model.bin", random_checkpoint(tied=False))
    config = load_model_config(str(path))
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (DIM, HIDDEN, LAYERS)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (HEADS, KV_HEADS, 16)
    assert (config.vocab_size, config.max_position_embeddings, config.tie_word_embeddings) == (VOCAB, SEQ_LEN, False)
    assert (config.rope_theta, config.rms_norm_eps, config.bos_token_id, config.eos_token_ids) == (
        10000.0, 1e-5, 1, [2])


# ---- tokenizer.bin ---------------------------------------------------------------------------------

def run_c_encode(pieces: list[tuple[bytes, float]], text: str) -> list[int]:
    """A transcription of run.c `encode()` with bos=1, eos=0: the oracle for our heap-based merge."""
    ids = {}
    for i, (piece, _) in enumerate(pieces):
        ids.setdefault(piece, i)
    tokens = [1]
    if not text:
        return tokens
    tokens.append(ids[b" "])
    for char in text:
        encoded = char.encode()
        tokens.extend([ids[encoded]] if encoded in ids else [b + 3 for b in encoded])
    while True:
        best_score, best_id, best_idx = -1e10, -1, -1
        for i in range(len(tokens) - 1):
            merged = ids.get(pieces[tokens[i]][0] + pieces[tokens[i + 1]][0])
            if merged is not None and pieces[merged][1] > best_score:
                best_score, best_id, best_idx = pieces[merged][1], merged, i
        if best_idx == -1:
            return tokens
        tokens[best_idx:best_idx + 2] = [best_id]


@pytest.fixture
def tokenizer(tmp_path) -> Llama2cTokenizer:
    return Llama2cTokenizer.from_file(write_tokenizer_bin(tmp_path / "tokenizer.bin"))


def test_llama2c_encode_merges_best_scoring_pairs_first(tokenizer):
    ids = tokenizer.encode("the once")
    assert [tokenizer.pieces[i] for i in ids] == [b"<s>", b" the", b" once"]
    assert tokenizer.encode("the once", add_special_tokens=False) == ids[1:]


def test_llama2c_encode_falls_back_to_bytes_for_unknown_characters(tokenizer):
    ids = tokenizer.encode("€", add_special_tokens=False)
    assert ids == [tokenizer.piece_ids[b" "]] + [3 + b for b in "€".encode()]


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="the oncaé€z\n", max_size=40))
def test_llama2c_encode_equals_run_c_and_round_trips(tmp_path_factory, text):
    path = write_tokenizer_bin(tmp_path_factory.mktemp("tok") / "tokenizer.bin")
    tokenizer = Llama2cTokenizer.from_file(path)
    ids = tokenizer.encode(text)
    assert ids == run_c_encode(tokenizer_pieces(), text)
    assert tokenizer.decode(ids) == text


def test_llama2c_tokenizer_is_found_beside_the_checkpoint(tmp_path):
    write_tokenizer_bin(tmp_path / "tokenizer.bin")
    path = write_checkpoint(tmp_path / "stories.bin", random_checkpoint(tied=True))
    tokenizer = Tokenizer.load(str(path))
    assert (tokenizer.vocab_size, tokenizer.bos_token_id, tokenizer.eos_token_ids) == (VOCAB, 1, [2])
    assert not tokenizer.has_chat_template
    with pytest.raises(ValueError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_llama2c_detokenizer_streams_the_decoded_text(tokenizer):
    prompt = tokenizer.encode("the")
    output = tokenizer.encode(" once é€ an", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detokenizer.add_tokens([t]) for t in output]
    assert "".join(pieces) == detokenizer.text == tokenizer.decode(output)
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces   # the three bytes of € arrived one token at a time and were held back
