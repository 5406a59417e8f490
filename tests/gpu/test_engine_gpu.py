"""The whole engine on a CUDA GPU: Triton kernels, CUDA graphs for decode, the KV
cache sized by a profiling step. Greedy tokens must equal transformers' on the same
weights (float32 on both sides, so the comparison is exact enough to be strict), and
a decode replayed from a CUDA graph must give what the eager path gives.
Run on a CUDA machine: `python3 -m pytest -q -m gpu tests/gpu`.
"""
from __future__ import annotations

import gc

import pytest
import torch

from nanovllm import LLM, SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPTS = [[5, 17, 99, 3], list(range(40, 77)), [250] * 9, list(range(1, 130, 3))]
GREEDY_32 = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
SMALL_POOL = dict(num_kv_blocks=512)   # so that several engines fit on the card at once


def release_gpu_memory() -> None:
    gc.collect()
    torch.cuda.empty_cache()


@pytest.fixture(autouse=True)
def fresh_gpu_memory():
    yield
    release_gpu_memory()


def hf_greedy(path, prompt: list[int], max_tokens: int) -> list[int]:
    """transformers' argmax, one full forward per token (EOS is just another token here)."""
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_tokens):
            ids.append(int(model(torch.tensor([ids], device="cuda")).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("name", ["llama-gqa4", "qwen3", "llama-mha-hd80"])
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_greedy_tokens_equal_transformers_on_gpu(tiny_model_factory, name, enforce_eager):
    path = tiny_model_factory(name)
    llm = LLM(str(path), device="cuda", dtype="float32", enforce_eager=enforce_eager, max_num_seqs=8,
              **SMALL_POOL)
    assert (llm.engine.runner.decode_graphs is None) == enforce_eager
    outputs = llm.generate(PROMPTS, GREEDY_32, use_tqdm=False)
    for prompt, output in zip(PROMPTS, outputs):
        assert output.outputs[0].token_ids == hf_greedy(path, prompt, 32)


def test_graph_replay_with_padding_rows_matches_eager(tiny_model_factory):
    """13 sequences run in the graph of 16; their tokens and log-probabilities equal the eager engine's."""
    path = tiny_model_factory("llama-gqa4")
    prompts = [list(range(3 + i, 20 + 3 * i)) for i in range(13)]
    params = SamplingParams(temperature=0.8, seed=7, max_tokens=24, ignore_eos=True, logprobs=2)
    graphed = LLM(str(path), device="cuda", dtype="float32", max_num_seqs=16, **SMALL_POOL)
    eager = LLM(str(path), device="cuda", dtype="float32", max_num_seqs=16, enforce_eager=True, **SMALL_POOL)
    assert 16 in graphed.engine.runner.decode_graphs.graphs
    got = [o.outputs[0] for o in graphed.generate(prompts, params, use_tqdm=False)]
    want = [o.outputs[0] for o in eager.generate(prompts, params, use_tqdm=False)]
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    for g, w in zip(got, want):
        assert g.logprobs == [pytest.approx(step, abs=1e-4) for step in w.logprobs]


def test_sampling_inside_the_graph_matches_the_eager_sampler(tiny_model_factory):
    """Decode graphs sample greedy and temperature rows together in the graph; a step with a row that
    needs the full sampler (min_tokens not reached, top log-probabilities) samples again from the
    graph's logits. Tokens and log-probabilities equal the eager engine's, and once those rows are
    done the steps sample in the graph alone."""
    path = tiny_model_factory("llama-gqa4")
    prompts = [list(range(3 + i, 20 + 3 * i)) for i in range(6)]
    params = [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=1, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=1.2, seed=2, max_tokens=16, min_tokens=8, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=10, logprobs=2, ignore_eos=True),
              SamplingParams(temperature=0.5, seed=5, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=28, ignore_eos=True)]
    graphed = LLM(str(path), device="cuda", dtype="float32", max_num_seqs=8, **SMALL_POOL)
    eager = LLM(str(path), device="cuda", dtype="float32", max_num_seqs=8, enforce_eager=True, **SMALL_POOL)
    runner, calls = graphed.engine.runner, {"launch": 0, "sampler": 0}
    launch, sample = runner.launch, runner.sampler.sample

    def counting_launch(batch):
        calls["launch"] += 1
        return launch(batch)

    def counting_sample(*args, **kwargs):
        calls["sampler"] += 1
        return sample(*args, **kwargs)
    runner.launch, runner.sampler.sample = counting_launch, counting_sample
    got = graphed.generate(prompts, params, use_tqdm=False)
    want = eager.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    for g, w in zip(got, want):
        assert g.outputs[0].cumulative_logprob == pytest.approx(w.outputs[0].cumulative_logprob, abs=1e-4)
    assert got[3].outputs[0].logprobs == [pytest.approx(step, abs=1e-4) for step in want[3].outputs[0].logprobs]
    assert calls["sampler"] < calls["launch"] - 10     # the plain steps never reached the eager sampler


def test_grammar_rows_sample_after_the_graph_on_its_settings_as_the_eager_engine_does(tiny_model_factory):
    """A decode step whose rows are plain but for some rows' grammars samples again from the graph's
    logits once the masks are applied, with the temperatures and keys the graph read (no sampling
    settings built on the host): tokens and log-probabilities equal the eager engine's, constrained
    rows and the rest alike, and those steps never build the batch's sampling settings."""
    pytest.importorskip("xgrammar")
    path = tiny_model_factory("llama-gqa4")
    prompts = [list(range(3 + i, 20 + 3 * i)) for i in range(8)]
    regex = {"regex": "[a-z]{4,12}( [a-z]{2,9}){1,4}"}
    params = [SamplingParams(temperature=[0.0, 0.8, 1.1][i % 3], seed=i, max_tokens=24 + i, ignore_eos=True,
                             structured_outputs=regex if i % 2 else None) for i in range(8)]
    graphed = LLM(str(path), device="cuda", dtype="float32", max_num_seqs=8, **SMALL_POOL)
    eager = LLM(str(path), device="cuda", dtype="float32", max_num_seqs=8, enforce_eager=True, **SMALL_POOL)
    runner, calls = graphed.engine.runner, {"launch": 0, "settings built": 0}
    launch, prepare_sampling = runner.launch, runner.prepare_sampling

    def counting_launch(batch):
        calls["launch"] += 1
        return launch(batch)

    def counting_prepare_sampling(*args, **kwargs):
        calls["settings built"] += 1
        return prepare_sampling(*args, **kwargs)
    runner.launch, runner.prepare_sampling = counting_launch, counting_prepare_sampling
    got = graphed.generate(prompts, params, use_tqdm=False)
    want = eager.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    for g, w in zip(got, want):
        assert g.outputs[0].cumulative_logprob == pytest.approx(w.outputs[0].cumulative_logprob, abs=1e-4)
    assert calls["settings built"] < calls["launch"] - 10   # the decode steps took the graph's settings


def test_a_prompt_near_max_model_len_decodes_through_the_graph(tiny_model_factory):
    """The graphs' block tables are max_model_len wide, so the longest context still fits."""
    path = tiny_model_factory("qwen3")
    llm = LLM(str(path), device="cuda", dtype="float32", max_model_len=256, max_num_seqs=4, **SMALL_POOL)
    prompt = [(7 * i) % 300 for i in range(250)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    graphed = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert len(graphed.token_ids) == 6 and graphed.finish_reason == "length"
    eager = LLM(str(path), device="cuda", dtype="float32", max_model_len=256, max_num_seqs=4,
                enforce_eager=True, **SMALL_POOL)
    assert eager.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids == graphed.token_ids


def test_kv_cache_is_sized_from_gpu_memory_utilization(tiny_model_factory):
    """The pool takes what the utilization allows after weights and a profiled step's activations."""
    path = tiny_model_factory("llama-gqa4")
    total = torch.cuda.mem_get_info()[1]
    kv_bytes = {}
    for utilization in (0.2, 0.4):
        llm = LLM(str(path), device="cuda", gpu_memory_utilization=utilization, enforce_eager=True)
        kv_cache = llm.engine.runner.kv_cache
        kv_bytes[utilization] = kv_cache.numel() * kv_cache.element_size()
        assert torch.cuda.memory_allocated() <= utilization * total
        del llm, kv_cache
        release_gpu_memory()
    assert kv_bytes[0.4] - kv_bytes[0.2] == pytest.approx(0.2 * total, rel=0.02)


def test_bfloat16_engine_generates_on_gpu(tiny_model_factory):
    path = tiny_model_factory("qwen3")
    llm = LLM(str(path), device="cuda", max_num_seqs=32, **SMALL_POOL)
    assert llm.engine.config.dtype == "bfloat16"
    outputs = llm.generate(PROMPTS * 8, SamplingParams(temperature=0.6, max_tokens=16, ignore_eos=True),
                           use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 16 for o in outputs)


@pytest.mark.parametrize("engine_args", [{}, dict(max_num_batched_tokens=32)])   # all decodes in graphs; mixed steps
def test_async_scheduling_gives_the_outputs_of_sync_on_gpu(tiny_model_factory, engine_args):
    """Step n+1 reads step n's tokens on the device (graph inputs, eager inputs): same outputs as sync."""
    path = tiny_model_factory("qwen3")
    prompts = PROMPTS * 3 + [list(range(3 + i, 20 + 3 * i)) for i in range(13)]
    choices = [SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
               SamplingParams(temperature=0.8, seed=7, max_tokens=33, ignore_eos=True, logprobs=2),
               SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[5, 17, 99, 250]),
               SamplingParams(temperature=1.0, top_p=0.9, seed=3, max_tokens=21, n=2, ignore_eos=True),
               SamplingParams(temperature=0.7, seed=1, max_tokens=25, ignore_eos=True, repetition_penalty=1.3)]
    params = [choices[i % len(choices)] for i in range(len(prompts))]
    runs = {}
    for async_scheduling in (False, True):
        llm = LLM(str(path), device="cuda", dtype="float32", max_num_seqs=32, async_scheduling=async_scheduling,
                  **SMALL_POOL, **engine_args)
        assert llm.engine.runner.decode_graphs is not None
        outputs = llm.generate(prompts, params, use_tqdm=False)
        runs[async_scheduling] = [[(c.token_ids, c.finish_reason, c.logprobs) for c in o.outputs] for o in outputs]
        assert llm.engine.get_stats().kv_usage.used_blocks == 0
        del llm
        release_gpu_memory()
    # Tokens exactly; log-probabilities to float32 noise: the two orders batch the same tokens differently
    # (a token may be computed in a graph in one and in a mixed eager step in the other).
    strip = lambda run: [[(tokens, reason) for tokens, reason, _ in o] for o in run]   # noqa: E731
    assert strip(runs[True]) == strip(runs[False])
    for got, want in zip(runs[True], runs[False]):
        for (_, _, got_logprobs), (_, _, want_logprobs) in zip(got, want):
            for got_step, want_step in zip(got_logprobs or [], want_logprobs or []):
                assert got_step.keys() == want_step.keys()
                assert list(got_step.values()) == pytest.approx(list(want_step.values()), rel=1e-3, abs=1e-3)


def test_steps_with_prefill_chunks_replay_graphs_that_give_the_eager_outputs(tiny_model_factory):
    """Prompts chunked by a 48-token budget while others decode: every step with a prefill chunk replays
    a mixed graph (padded to its token bucket, sequences padded to max_num_seqs) and gives the tokens and
    log-probabilities of the eager forward (float32: the same kernels, so equal to float32 noise)."""
    path = tiny_model_factory("llama-gqa4")
    prompts = PROMPTS + [list(range(3 + i, 20 + 7 * i)) for i in range(9)]
    params = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=1),
              SamplingParams(temperature=0.8, seed=5, max_tokens=17, ignore_eos=True, logprobs=1)]
    runs = {}
    for enforce_eager in (False, True):
        llm = LLM(str(path), device="cuda", dtype="float32", max_num_seqs=16, max_num_batched_tokens=48,
                  enforce_eager=enforce_eager, **SMALL_POOL)
        replays = []
        if not enforce_eager:
            graphs = llm.engine.runner.mixed_graphs
            assert graphs is not None and graphs.sizes == [48]
            replay = graphs.replay
            graphs.replay = lambda *args: replays.append(args[0].shape[0]) or replay(*args)
        outputs = llm.generate(prompts, [params[i % 2] for i in range(len(prompts))], use_tqdm=False)
        runs[enforce_eager] = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outputs]
        if not enforce_eager:
            assert len(replays) >= 5 and min(replays) < 48   # several mixed steps, some padded
        del llm
        release_gpu_memory()
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(runs[False], runs[True]):
        assert tokens == want_tokens
        for got, want in zip(logprobs, want_logprobs):
            assert got.keys() == want.keys()
            assert list(got.values()) == pytest.approx(list(want.values()), rel=1e-4, abs=1e-4)


def test_mixed_graph_buckets():
    from nanovllm.runner.cuda_graph import token_buckets
    assert token_buckets(8192) == [64, 128, 256, 512, 1024, 2048, 4096, 8192]
    assert token_buckets(48) == [48] and token_buckets(100) == [64, 100]
