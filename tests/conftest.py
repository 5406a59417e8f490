"""Shared fixtures: tiny random Llama-family models written to disk by transformers.

No model can be downloaded here, so tests build their own: a few layers of
random weights in the exact HuggingFace format (config.json, model.safetensors,
tokenizer.json with a byte-level BPE and a ChatML template), small enough that
the whole suite runs on a 2-core CPU.

Default random initialisation makes useless oracles: attention is nearly
uniform (a masking or position bug barely moves a logit) and a tied model's
greedy token is its input token (32 "matching" greedy tokens compare a repeated
token with itself). So the weights are redrawn at scales that make attention
sharp and continuations vary, and `write_tiny_model` checks both properties
on every model it writes, so the fixtures cannot silently degrade.
"""
from __future__ import annotations

import gc
import hashlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def collect_engines_at_module_end():
    """After each test module, collect the engines its tests dropped: an engine's grammar process
    (structured outputs) ends when the engine is collected, and one kept alive in a reference cycle
    would poll its shared memory, idle, through the rest of the run."""
    yield
    gc.collect()


TINY_VOCAB = 320   # 256 byte tokens + 3 specials, rounded up like real vocabularies
# A folder that keeps the tiny models between pytest runs (opt-in): a mutation run starts pytest once
# per mutant, and writing the models again would cost each mutant seconds. Keyed by this file's text.
TINY_MODEL_CACHE = os.environ.get("NANOVLLM_TINY_MODEL_CACHE")

IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"   # this process runs Triton kernels on the CPU


def in_interpreter(test):
    """Collect `test` only in the subprocess that runs with TRITON_INTERPRET=1."""
    test.__test__ = IN_INTERPRETER
    return test


# The interpreter runs (a subprocess each, a few minutes of one core in all) start as soon as the tests
# are collected, at idle priority, so that they use only the time the main run leaves a core idle
# (waiting on servers, spawned engines and subprocesses); the test that asked for one then waits for
# its result. Idle priority (SCHED_IDLE), not a nice value: a niced process still takes turns beside the
# main run's torch threads, and each of their parallel regions then waits for the thread it displaced.
# Those tests run last: asked for midway, a run not yet done stopped the main run while it finished,
# and the rest of the main run then left a core idle that the runs would have used.
_INTERPRETER_RUNS: dict[tuple[str, ...], tuple[subprocess.Popen, Path]] = {}


def _idle_priority() -> None:
    """In the child, before it runs: the CPU only when nothing else wants it."""
    if hasattr(os, "sched_setscheduler"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    else:
        os.nice(19)


def _start_interpreter_run(test_file: str, *pytest_args: str, idle: bool = False) -> tuple[subprocess.Popen, Path]:
    import tempfile

    log = Path(tempfile.mkstemp(prefix="interpreter-", suffix=".log")[1])
    env = dict(os.environ, TRITON_INTERPRET="1")
    with log.open("w") as stdout:
        process = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file,
                                    *pytest_args], env=env, cwd=Path(__file__).parent.parent, stdout=stdout,
                                   stderr=subprocess.STDOUT, preexec_fn=_idle_priority if idle else None)
    return process, log


def run_in_interpreter(test_file: str, *pytest_args: str) -> str:
    """Run pytest on `test_file` in a subprocess with TRITON_INTERPRET=1 (the interpreter must be set
    before triton is imported, hence the subprocess), or take the run started at collection (a test
    marked `interpreter_run` with these arguments); fail unless it passed. -> its output."""
    pytest.importorskip("triton")
    key = (str(Path(test_file).resolve()), *pytest_args)
    process, log = _INTERPRETER_RUNS.pop(key, None) or _start_interpreter_run(test_file, *pytest_args)
    try:
        returncode = process.wait(timeout=900)
    finally:
        process.kill()
    output = log.read_text()
    log.unlink()
    assert returncode == 0 and " passed" in output, output[-9000:]
    return output


@pytest.hookimpl(trylast=True)      # after -k and -m have deselected what they deselect
def pytest_collection_modifyitems(items):
    if IN_INTERPRETER:
        return
    for item in items:
        marker = item.get_closest_marker("interpreter_run")
        key = (str(item.path.resolve()), *marker.args) if marker else None
        if marker and key not in _INTERPRETER_RUNS and importlib.util.find_spec("triton") is not None:
            _INTERPRETER_RUNS[key] = _start_interpreter_run(str(item.path), *marker.args, idle=True)
    items.sort(key=lambda item: item.get_closest_marker("interpreter_run") is not None)   # stable: those last


def pytest_sessionfinish():
    for process, log in _INTERPRETER_RUNS.values():     # runs whose tests never ran (-x, an interrupt)
        process.kill()
        process.wait()
        log.unlink(missing_ok=True)


CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# name -> (transformers config class name, overrides). Shapes are tiny but keep the
# features the issues ask for: GQA 4:1 and 1:1, head_dim 64 and 80, tied and
# untied embeddings, llama3 rope scaling, Qwen2 biases, Qwen3 q/k norms.
TINY_MODELS = {
    "llama-gqa4": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=64,
                                       hidden_size=256, tie_word_embeddings=False)),
    "llama-mha-hd80": ("LlamaConfig", dict(num_attention_heads=2, num_key_value_heads=2, head_dim=80,
                                           hidden_size=160, tie_word_embeddings=True)),
    "llama3-scaled": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                          hidden_size=128, tie_word_embeddings=True,
                                          rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 64})),
    "qwen2": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2, hidden_size=128,
                                  tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                  hidden_size=128, tie_word_embeddings=True)),
}


def save_byte_tokenizer(path: Path) -> None:
    """A byte-level BPE with no merges (one token per byte) plus <s>, </s> and ChatML markers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(path)


def write_tiny_model(path: Path, name: str = "llama-gqa4", num_layers: int = 2, seed: int = 0,
                     **overrides) -> Path:
    """Write a random tiny model `name` (a TINY_MODELS key) as a HF directory at `path`."""
    import transformers

    config_cls, shape = TINY_MODELS[name]
    kwargs = dict(vocab_size=TINY_VOCAB, intermediate_size=256, num_hidden_layers=num_layers,
                  max_position_embeddings=512, bos_token_id=256, eos_token_id=257)
    kwargs.update(shape)
    kwargs.update(overrides)
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    draw_discriminating_weights(model, seed)
    assert_discriminates(model)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    save_byte_tokenizer(path)
    return path


QK_GAIN = 2.0            # query and key scale: attention scores of std ~4, so each query attends to a few keys
TIED_EMBEDDING_STD = 0.1  # small, so a tied model's residual stream is not dominated by its input token
LOGIT_STD = 3.0          # logits spread enough that greedy choices are not near-ties


@torch.no_grad()
def draw_discriminating_weights(model, seed: int) -> None:
    """Redraw every weight of a transformers model: matrices at 1/sqrt(fan_in) (so each layer's output is
    of the size of its input), queries and keys QK_GAIN times more, norms and biases off their defaults
    (so a loader that drops them is caught), and the output scaled to logits of std LOGIT_STD."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    tied = config.tie_word_embeddings
    embedding_std = TIED_EMBEDDING_STD if tied else 1.0

    def normal(shape: torch.Size, std: float, mean: float = 0.0) -> torch.Tensor:
        return mean + std * torch.randn(shape, generator=generator)

    for name, weight in model.named_parameters():
        if name.endswith("embed_tokens.weight"):
            weight.copy_(normal(weight.shape, embedding_std))
        elif name.endswith("lm_head.weight"):
            if not tied:
                weight.copy_(normal(weight.shape, LOGIT_STD / math.sqrt(config.hidden_size)))
        elif name.endswith(("q_norm.weight", "k_norm.weight")):
            weight.copy_(normal(weight.shape, 0.1 * QK_GAIN, mean=QK_GAIN))   # Qwen3 scales q and k here
        elif name == "model.norm.weight":
            # A tied head multiplies by the small embeddings: the final norm brings the logits back up.
            gain = LOGIT_STD / (embedding_std * math.sqrt(config.hidden_size)) if tied else 1.0
            weight.copy_(normal(weight.shape, 0.1 * gain, mean=gain))
        elif name.endswith("norm.weight"):
            weight.copy_(normal(weight.shape, 0.1, mean=1.0))
        elif name.endswith(".bias"):
            weight.copy_(normal(weight.shape, 0.1))
        else:
            gain = QK_GAIN if ".q_proj." in name or ".k_proj." in name else 1.0
            weight.copy_(normal(weight.shape, gain / math.sqrt(weight.shape[1])))


@torch.no_grad()
def assert_discriminates(model) -> None:
    """Fail if the tiny model would make a weak oracle: attention near uniform, greedy tokens copying
    the input, or a greedy continuation stuck on a few tokens."""
    num_queries = 40
    token_ids = torch.randint(0, 256, (4, num_queries), generator=torch.Generator().manual_seed(1))
    out = model(token_ids, output_attentions=True)
    for layer, attention in enumerate(out.attentions):      # [B, H, T, T]
        last_query = attention[:, :, -1, :]                  # [B, H, T]
        entropy = -(last_query * last_query.clamp_min(1e-30).log()).sum(-1).mean().item()
        assert entropy < 0.6 * math.log(num_queries), (
            f"layer {layer}: last-query attention entropy {entropy:.2f} is near uniform "
            f"({math.log(num_queries):.2f}); attention must be sharp")
    greedy = out.logits.argmax(-1)                           # [B, T]
    copied = (greedy == token_ids).float().mean().item()
    assert copied < 0.1, f"the greedy token equals the input token at {copied:.0%} of positions"
    assert greedy.unique().numel() > 50, "greedy predictions concentrate on a few tokens"
    sequence = token_ids[0, :10].tolist()
    for _ in range(32):
        sequence.append(int(model(torch.tensor([sequence])).logits[0, -1].argmax()))
    continuation = sequence[10:]
    assert len(set(continuation)) >= 12, f"greedy continuation {continuation} barely varies"


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """tiny_model_factory(name, **overrides) -> Path of a HF model directory (cached per session)."""
    cache: dict[str, Path] = {}

    def make(name: str = "llama-gqa4", **overrides) -> Path:
        key = json.dumps([name, overrides], sort_keys=True, default=str)
        if key not in cache and TINY_MODEL_CACHE is None:
            cache[key] = write_tiny_model(tmp_path_factory.mktemp(name), name, **overrides)
        elif key not in cache:
            digest = hashlib.sha256((key + Path(__file__).read_text()).encode()).hexdigest()[:16]
            path = Path(TINY_MODEL_CACHE) / f"{name}-{digest}"
            if not path.is_dir():   # written aside, then renamed: a half-written model is never found
                written = write_tiny_model(tmp_path_factory.mktemp(name), name, **overrides)
                path.parent.mkdir(parents=True, exist_ok=True)
                aside = path.with_name(path.name + f".{os.getpid()}")
                shutil.copytree(written, aside)
                try:
                    os.replace(aside, path)
                except OSError:     # a process beside this one wrote it first (planted-bug runs go two at a time)
                    if not path.is_dir():
                        raise
                    shutil.rmtree(aside)
            cache[key] = path
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory) -> Path:
    return tiny_model_factory("llama-gqa4")


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """The quantized kernels' outputs (quant_linear_triton._output) start as NaN, so that an element no
    program writes fails the comparison."""
    from nanovllm.ops import quant_linear_triton as kernels

    make = kernels._output
    monkeypatch.setattr(kernels, "_output", lambda *args: make(*args).fill_(float("nan")))


@pytest.fixture(scope="session")
def tiny_qwen3(tiny_model_factory) -> Path:
    return tiny_model_factory("qwen3")


class PagedSequence:
    """Runs one sequence through a model over a paged KV cache, as the engine would, without the engine.

    The block table is deliberately scattered (not contiguous, not increasing)
    so a test passes only if every read and write goes through it.
    """

    def __init__(self, model, block_size: int = 8, num_blocks: int = 32, seed: int = 0,
                 kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                 block_table: list[int] | None = None):
        """A cache of its own, or (kv_caches, block_table): blocks of a cache that other sequences share."""
        config = model.config
        param = next(model.parameters())
        generator = torch.Generator().manual_seed(seed)
        self.model = model
        self.block_size = block_size
        self.block_table = block_table or torch.randperm(num_blocks, generator=generator).tolist()
        shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        self.kv_caches = kv_caches or [(torch.zeros(shape, dtype=param.dtype, device=param.device),
                                        torch.zeros(shape, dtype=param.dtype, device=param.device))
                                       for _ in range(config.num_hidden_layers)]
        self.num_computed_tokens = 0

    @torch.no_grad()
    def step(self, token_ids: list[int]) -> torch.Tensor:
        """Feed the next chunk of tokens; -> float32 logits [len(token_ids), V] of every fed position."""
        from nanovllm.ops.attention import AttentionMetadata

        device = next(self.model.parameters()).device
        start, num_new = self.num_computed_tokens, len(token_ids)
        seq_len = start + num_new
        positions = torch.arange(start, seq_len)
        slots = [self.block_table[p // self.block_size] * self.block_size + p % self.block_size
                 for p in positions.tolist()]
        metadata = AttentionMetadata(
            query_start_loc=torch.tensor([0, num_new], dtype=torch.int32, device=device),
            seq_lens=torch.tensor([seq_len], dtype=torch.int32, device=device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=torch.tensor([self.block_table], dtype=torch.int32, device=device),
            max_query_len=num_new,
            max_seq_len=seq_len,
        )
        hidden = self.model(torch.tensor(token_ids, device=device), positions.to(device), metadata,
                            self.kv_caches)
        self.num_computed_tokens = seq_len
        return self.model.compute_logits(hidden).float()

    def greedy(self, prompt: list[int], num_steps: int) -> list[int]:
        """Prefill `prompt`, then decode `num_steps` argmax tokens one at a time."""
        token = int(self.step(prompt)[-1].argmax())
        out = [token]
        while len(out) < num_steps:
            token = int(self.step([token])[-1].argmax())
            out.append(token)
        return out


@torch.no_grad()
def decode_together(sequences: list[PagedSequence], token_ids: list[int]) -> torch.Tensor:
    """One decode step of several sequences over one shared cache, batched as the engine batches
    them (a key mask when their lengths differ); -> float32 logits [B, V]."""
    from nanovllm.ops.attention import AttentionMetadata

    model = sequences[0].model
    device = next(model.parameters()).device
    block_size = sequences[0].block_size
    positions = [s.num_computed_tokens for s in sequences]
    seq_lens = [p + 1 for p in positions]
    slots = [s.block_table[p // block_size] * block_size + p % block_size for s, p in zip(sequences, positions)]
    width = max(len(s.block_table) for s in sequences)
    block_tables = [s.block_table + [-1] * (width - len(s.block_table)) for s in sequences]
    metadata = AttentionMetadata(
        query_start_loc=torch.arange(len(sequences) + 1, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_tables=torch.tensor(block_tables, dtype=torch.int32, device=device),
        max_query_len=1,
        max_seq_len=max(seq_lens),
    )
    hidden = model(torch.tensor(token_ids, device=device), torch.tensor(positions, device=device), metadata,
                   sequences[0].kv_caches)
    for sequence in sequences:
        sequence.num_computed_tokens += 1
    return model.compute_logits(hidden).float()


# English prose written for the project (tests/data/quality_text.txt), 2,350 tokens of the embedded
# tokenizer: the text the quantization quality guard measures perplexity on.
QUALITY_TEXT = Path(__file__).parent / "data" / "quality_text.txt"


def quality_tokens(num_predictions: int = 2000) -> list[int]:
    """The first num_predictions + 1 tokens of QUALITY_TEXT under the embedded model's tokenizer."""
    from nanovllm.tokenizer import Tokenizer

    token_ids = Tokenizer.load(None).encode(QUALITY_TEXT.read_text())[:num_predictions + 1]
    if len(token_ids) != num_predictions + 1:
        raise ValueError(f"{QUALITY_TEXT.name} has {len(token_ids)} tokens; {num_predictions + 1} are needed")
    return token_ids


def prompt_logits(model, token_ids: list[int], kv_dtype: torch.dtype) -> torch.Tensor:
    """One prefill of token_ids through `model` (a fresh paged cache of kv_dtype) -> float32 logits
    [T, V] of every position."""
    from nanovllm.ops.attention import AttentionMetadata

    config = model.config
    num_tokens, block_size = len(token_ids), 16
    num_blocks = -(-num_tokens // block_size)
    # One pool tensor with a (k, v) view per layer, as the model runner allocates it (the fused CPU
    # forward, llama_numba.py, runs on such a pool only).
    pool = torch.zeros(config.num_hidden_layers, 2, num_blocks, block_size, config.num_key_value_heads,
                       config.head_dim, dtype=kv_dtype)
    kv_caches = [(layer[0], layer[1]) for layer in pool]
    metadata = AttentionMetadata(
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32),
        seq_lens=torch.tensor([num_tokens], dtype=torch.int32),
        slot_mapping=torch.arange(num_tokens),
        block_tables=torch.arange(num_blocks, dtype=torch.int32)[None],
        max_query_len=num_tokens, max_seq_len=num_tokens)
    with torch.inference_mode():
        hidden = model(torch.tensor(token_ids), torch.arange(num_tokens), metadata, kv_caches)   # [T, H]
        return model.compute_logits(hidden).float()


def perplexity(logits: torch.Tensor, token_ids: list[int]) -> float:
    """exp(mean negative log-likelihood of token t + 1 under logits [T, V] at position t)."""
    next_ids = torch.tensor(token_ids[1:])[:, None]
    return math.exp(-logits[:-1].log_softmax(-1).gather(1, next_ids).mean().item())


def assert_logits_close(ours: torch.Tensor, reference: torch.Tensor, rel: float = 1e-5) -> None:
    """Max abs difference below `rel` times the reference's largest logit magnitude.

    1e-5 is measured, not guessed: on the tiny models, correct float32 code stays within 4e-6 of
    transformers (transformers' own float32 logits are 1e-6 to 3e-6 from its float64 ones), while a
    wrong RoPE constant or a mask off by one key moves them by 1e-3 or more."""
    ours, reference = ours.float().cpu(), reference.float().cpu()
    assert ours.shape == reference.shape
    scale = reference.abs().max().item()
    diff = (ours - reference).abs().max().item()
    assert diff < rel * scale, f"max abs diff {diff:.3g} exceeds {rel} x logit scale {scale:.3g}"


# HuggingFace name (after `model.layers.N.`) -> llama.cpp name, written out here independently of the loader.
_GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def _llama_cpp_permute(weight, num_heads: int):
    """What llama.cpp's converter does to q/k rows of llama models: within each head, the rows of the
    first half and of the second half are interleaved (row i -> 2i, row i + D/2 -> 2i + 1)."""
    rows = weight.shape[0]
    head_dim = rows // num_heads
    out = weight.copy()
    for h in range(num_heads):
        for i in range(head_dim // 2):
            out[h * head_dim + 2 * i] = weight[h * head_dim + i]
            out[h * head_dim + 2 * i + 1] = weight[h * head_dim + head_dim // 2 + i]
    return out


def _llama3_rope_divisors(scaling: dict, head_dim: int, theta: float):
    """llama.cpp's `rope_freqs` tensor for Llama 3 scaling: what each RoPE frequency is divided by."""
    import math

    import numpy as np

    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    divisors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old_context / high:
            divisors.append(1.0)
        elif wavelen > old_context / low:
            divisors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(divisors, dtype=np.float32)


def quantize_k_blocks(weight, qtype: str):
    """weight [N, K] float32 (K a multiple of 256) -> GGUF Q4_K, Q5_K or Q6_K blocks [N, K / 256 *
    block bytes] uint8, by round-to-nearest (the gguf package quantizes none of them; its dequantize
    is the oracle of what the bytes mean). Q4_K (Q5_K): per 32, [min, max] (widened to hold 0) onto
    0..15 (0..31), the 8 scales and mins in 6 bits under fp16 d and dmin; Q6_K: per 16, a symmetric
    int8 scale under fp16 d."""
    import numpy as np

    rows, cols = weight.shape
    blocks = weight.astype(np.float32).reshape(-1, 256)                                   # [B, 256]
    if qtype in ("Q4_K", "Q5_K"):
        top = 15 if qtype == "Q4_K" else 31
        groups = blocks.reshape(-1, 8, 32)
        low, high = np.minimum(groups.min(-1), 0), np.maximum(groups.max(-1), 0)         # [B, 8]
        d = ((high - low).max(-1) / top / 63).astype(np.float16)                         # [B]
        dmin = ((-low).max(-1) / 63).astype(np.float16)
        sc = np.clip(np.ceil((high - low) / top / np.maximum(d.astype(np.float32), 1e-30)[:, None]), 1, 63)
        m = np.clip(np.ceil(-low / np.maximum(dmin.astype(np.float32), 1e-30)[:, None]), 0, 63)
        scale, offset = d.astype(np.float32)[:, None] * sc, dmin.astype(np.float32)[:, None] * m
        q = np.clip(np.round((groups + offset[..., None]) / np.maximum(scale, 1e-30)[..., None]), 0, top)
        sc, m, q = sc.astype(np.uint8), m.astype(np.uint8), q.astype(np.uint8).reshape(-1, 4, 2, 32)
        packed = np.concatenate([(sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6), (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6),
                                 (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)], axis=1)    # [B, 12]
        qs = ((q[:, :, 0] & 15) | ((q[:, :, 1] & 15) << 4)).reshape(-1, 128)   # byte l of a 32: weights l, l + 32
        head = [d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), packed]
        if qtype == "Q5_K":       # bit j of byte l: the fifth bit of weight 32 j + l
            fifth = (q.reshape(-1, 8, 32) >> 4).astype(np.uint16) << np.arange(8, dtype=np.uint16).reshape(1, 8, 1)
            head.append(fifth.sum(1).astype(np.uint8))                                    # [B, 32]
        out = np.concatenate(head + [qs], 1)
    elif qtype == "Q6_K":
        groups = blocks.reshape(-1, 16, 16)
        scale = np.abs(groups).max(-1) / 31                                              # [B, 16]
        d = (scale.max(-1) / 127).astype(np.float16)
        sc = np.clip(np.ceil(scale / np.maximum(d.astype(np.float32), 1e-30)[:, None]), 1, 127)
        q = np.clip(np.round(groups / (d.astype(np.float32)[:, None] * sc)[..., None]), -32, 31) + 32
        q = q.astype(np.uint8).reshape(-1, 2, 4, 32)            # [B, half, quarter, l]: weight 128 h + 32 j + l
        low = q & 15
        ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)  # [B, 2, 64]
        qh = (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)
        out = np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.astype(np.int8).view(np.uint8),
                              d.view(np.uint8).reshape(-1, 2)], axis=1)
    else:
        raise ValueError(qtype)
    return np.ascontiguousarray(out).reshape(rows, -1)


def write_tiny_gguf(hf_dir: Path, out: Path, qtype="F32") -> Path:
    """Convert a tiny HF model directory to GGUF as llama.cpp would; 2-D weights stored as `qtype`
    (a type name, or a function of the GGUF tensor name giving one). As llama.cpp does, a weight whose
    rows are not whole superblocks of 256 falls back from Q4_K / Q5_K / Q6_K to Q8_0."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    config = json.loads((hf_dir / "config.json").read_text())
    arch = config["model_type"]
    num_heads, num_kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // num_heads
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(num_heads)
    writer.add_head_count_kv(num_kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    theta = float(config.get("rope_theta") or rope["rope_theta"])
    writer.add_rope_freq_base(theta)
    if rope.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_rope_divisors(rope, head_dim, theta))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    qtype_of = qtype if callable(qtype) else lambda _: qtype
    for name, weight in load_file(str(hf_dir / "model.safetensors")).items():
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        if name.startswith("model.layers."):
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            module, suffix = rest.rsplit(".", 1)
            gguf_name = f"blk.{layer}.{_GGUF_LAYER_NAMES[module]}.{suffix}"
        else:
            gguf_name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                         "lm_head.weight": "output.weight"}[name]
        weight = weight.astype(np.float32)
        if arch == "llama" and ".attn_q." in gguf_name:
            weight = _llama_cpp_permute(weight, num_heads)
        if arch == "llama" and ".attn_k." in gguf_name:
            weight = _llama_cpp_permute(weight, num_kv_heads)
        quant = gguf.GGMLQuantizationType[qtype_of(gguf_name)]
        if quant.name in ("Q4_K", "Q5_K", "Q6_K") and weight.shape[-1] % 256:
            quant = gguf.GGMLQuantizationType.Q8_0
        if weight.ndim == 2 and quant.name in ("Q4_K", "Q5_K", "Q6_K"):
            writer.add_tensor(gguf_name, quantize_k_blocks(weight, quant.name), raw_dtype=quant)
        elif weight.ndim == 2 and quant != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, gguf.quants.quantize(weight, quant), raw_dtype=quant)
        else:
            writer.add_tensor(gguf_name, weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


# ---- engines over weights loaded once --------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_llama_loaded(tiny_llama):
    """(path, model, tokenizer) of the tiny Llama, loaded once for every engine the tests build."""
    from nanovllm.model.loader import load_model
    from nanovllm.tokenizer import Tokenizer
    model, _ = load_model(str(tiny_llama))
    return str(tiny_llama), model, Tokenizer.load(str(tiny_llama))


def engine_over(loaded, **engine_args):
    """An LLMEngine over already-loaded (path, model, tokenizer): no weights read per engine; on the
    model's device and dtype unless given (a machine with a GPU would default to it)."""
    from nanovllm.config import EngineConfig
    from nanovllm.engine.engine import LLMEngine
    path, model, tokenizer = loaded
    param = next(model.parameters())
    engine_args.setdefault("device", param.device.type)
    engine_args.setdefault("dtype", str(param.dtype).removeprefix("torch."))
    return LLMEngine(EngineConfig(model=path, **engine_args), model=model, tokenizer=tokenizer)


@pytest.fixture
def make_engine(tiny_llama_loaded):
    """make_engine(**engine_args) -> an engine over the tiny Llama (weights loaded once), max_model_len 128
    unless given (test files with other defaults define their own)."""
    def make(**engine_args):
        engine_args.setdefault("max_model_len", 128)
        return engine_over(tiny_llama_loaded, **engine_args)

    return make


@pytest.fixture(scope="module")
def make_app(tiny_llama_loaded):
    """make_app(**server_args) -> the server's app over a new engine on the tiny Llama (weights loaded
    once), max_model_len 128, served as "m" unless given."""
    from nanovllm.server.app import ServerConfig, build_app

    def make(**server_args):
        server_args.setdefault("served_model_name", "m")
        return build_app(server_config=ServerConfig(**server_args),
                         engine=engine_over(tiny_llama_loaded, max_model_len=128))

    return make


def assert_same_fp8_rows(rows, plain: torch.Tensor) -> None:
    """rows, the Fp8Rows a kernel wrote beside its 16-bit output plain, hold the bits that quantizing
    plain gives: quantize_fp8_rows_triton's codes and scales."""
    from nanovllm.ops.quant_linear_triton import quantize_fp8_rows_triton
    assert rows.shape == plain.shape and rows.dtype == plain.dtype
    expected = quantize_fp8_rows_triton(plain)
    assert torch.equal(rows.scale, expected.scale)
    assert torch.equal(rows.codes.view(torch.uint8), expected.codes.view(torch.uint8))


class PoisonedTorch:
    """torch, except that `empty` fills floating-point buffers with NaN, so an element a
    kernel forgets to write shows up (monkeypatched into the kernel modules by tests)."""

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs) -> torch.Tensor:
        buffer = torch.empty(*args, **kwargs)
        if buffer.is_floating_point():
            buffer.fill_(float("nan"))
        return buffer


# ---- a live server in this process -----------------------------------------------------------

def serving(app, **uvicorn_settings):
    """A context manager: `app` under uvicorn on a free loopback port in a background thread, yielding
    (host, port); real sockets without a subprocess (the model is already loaded)."""
    import socket
    import threading
    import time
    from contextlib import contextmanager

    import uvicorn

    @contextmanager
    def run():
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                               **uvicorn_settings))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the test server did not start"
            time.sleep(0.05)
        try:
            yield "127.0.0.1", port
        finally:
            server.should_exit = True
            thread.join(timeout=30)

    return run()
