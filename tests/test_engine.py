"""LLMEngine on a tiny random model: streaming outputs, stop rules on real text, aborts, bad input,
failures inside a step, observers and counters, n > 1, seeded sampling, and the KV that the prefix
cache holds."""
from __future__ import annotations

import copy
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanovllm.config import EngineConfig
from nanovllm.engine.engine import LLMEngine, StepInfo
from nanovllm.model.quantize import quantize_model
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.tokenizer import Tokenizer

GREEDY = dict(temperature=0.0)


@pytest.fixture
def loaded(tiny_llama_loaded):
    return tiny_llama_loaded


def run_all(engine: LLMEngine) -> dict[str, list[RequestOutput]]:
    """Step until idle; every output per request id, in order."""
    outputs: dict[str, list[RequestOutput]] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            outputs.setdefault(output.request_id, []).append(output)
    return outputs


def test_streamed_outputs_grow_by_one_token_and_end_finished(make_engine):
    engine = make_engine()
    engine.add_request("a", "Hello there", SamplingParams(max_tokens=6, ignore_eos=True, **GREEDY))
    stream = run_all(engine)["a"]
    assert [len(out.outputs[0].token_ids) for out in stream] == [1, 2, 3, 4, 5, 6]
    assert [out.finished for out in stream] == [False] * 5 + [True]
    final = stream[-1]
    assert final.outputs[0].finish_reason == "length"
    assert final.prompt == "Hello there"
    assert final.prompt_token_ids == engine.tokenizer.encode("Hello there")
    # The text holds back a trailing incomplete UTF-8 character (the tiny model emits raw bytes).
    assert final.outputs[0].text == engine.tokenizer.decode(final.outputs[0].token_ids).rstrip("\ufffd")
    for out in stream:
        assert final.outputs[0].text.startswith(out.outputs[0].text)
    metrics = final.metrics
    assert metrics.arrival_time <= metrics.first_scheduled_time <= metrics.first_token_time <= metrics.finish_time
    assert len(metrics.token_times) == 6 and metrics.time_in_queue >= 0


def test_delta_streams_join_to_the_final_output_and_travel_as_columns_until_it(make_engine):
    requests = [("one", [5, 6, 7], SamplingParams(max_tokens=7, temperature=0.8, seed=1, ignore_eos=True)),
                ("two", [9, 8], SamplingParams(n=2, max_tokens=5, temperature=1.0, seed=2, ignore_eos=True)),
                ("lp", [1, 2, 3], SamplingParams(max_tokens=6, logprobs=2, temperature=0.8, seed=3, ignore_eos=True))]
    reference = make_engine()
    reference.add_requests(requests, stream=False)
    finals = {request_id: outputs[-1] for request_id, outputs in run_all(reference).items()}

    engine = make_engine()
    engine.add_requests(requests, stream=True, delta=True)
    joined: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        outputs, deltas = engine.step_with_deltas()
        assert all(output.finished for output in outputs), "only final outputs are whole objects"
        for output in deltas.outputs():
            assert not output.finished and output.metrics is None and output.prompt_token_ids == []
            assert [completion.index for completion in output.outputs] == list(range(len(output.outputs)))
        for output in deltas.outputs() + outputs:
            if output.request_id in joined:
                joined[output.request_id].merge(output)
            else:
                joined[output.request_id] = output
    for request_id, final in finals.items():
        stream = joined[request_id]
        assert stream.finished and stream.prompt_token_ids == final.prompt_token_ids
        assert stream.metrics.finish_time is not None
        for streamed, whole in zip(stream.outputs, final.outputs, strict=True):
            assert streamed.token_ids == whole.token_ids and streamed.text == whole.text
            assert streamed.logprobs == whole.logprobs and streamed.finish_reason == whole.finish_reason
            assert streamed.cumulative_logprob == pytest.approx(whole.cumulative_logprob)
    assert finals["two"].outputs[0].token_ids != finals["two"].outputs[1].token_ids, "the samples are told apart"


def test_requests_without_streaming_get_only_their_final_output(make_engine):
    engine = make_engine()
    engine.add_request("quiet", [5, 6, 7], SamplingParams(max_tokens=4, **GREEDY), stream=False)
    outputs = run_all(engine)["quiet"]
    assert len(outputs) == 1 and outputs[0].finished and outputs[0].prompt is None


class LetterTokenizer(Tokenizer):
    """Every token id is one printable character, so any output is text (random bytes often are not)."""
    vocab_size, bos_token_id, eos_token_ids, has_chat_template = 320, None, [257], False

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(ch) - 0x100 for ch in text]

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(0x100 + t) for t in token_ids)

    @property
    def all_special_ids(self) -> set[int]:
        return set()


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_cut_the_text_exactly_and_never_stream_past_it(loaded, include):
    path, model, _ = loaded
    engine = LLMEngine(EngineConfig(model=path, max_model_len=128), model=model, tokenizer=LetterTokenizer())
    prompt = [40, 41, 42, 43]
    engine.add_request("free", prompt, SamplingParams(max_tokens=12, ignore_eos=True, **GREEDY))
    free_text = run_all(engine)["free"][-1].outputs[0].text
    assert len(free_text) == 12
    stop = free_text[4:7]
    expected_end = free_text.index(stop) + (len(stop) if include else 0)
    engine.add_request("stopped", prompt, SamplingParams(max_tokens=12, ignore_eos=True, stop=[stop],
                                                         include_stop_str_in_output=include, **GREEDY))
    stream = run_all(engine)["stopped"]
    final = stream[-1].outputs[0]
    assert final.finish_reason == "stop" and final.stop_reason == stop
    assert final.text == free_text[:expected_end]
    for out in stream[:-1]:
        assert final.text.startswith(out.outputs[0].text) and stop not in out.outputs[0].text


def test_abort_frees_the_blocks_and_yields_a_final_abort_output(make_engine):
    engine = make_engine()
    engine.add_request("long", list(range(1, 60)), SamplingParams(max_tokens=50, **GREEDY))
    engine.add_request("other", [3, 4, 5], SamplingParams(max_tokens=3, ignore_eos=True, **GREEDY))
    engine.step()
    assert engine.get_stats().kv_usage.used_blocks > 0
    engine.abort_request("long")
    engine.abort_request("no-such-request")
    outputs = run_all(engine)
    [aborted] = outputs["long"]
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    assert outputs["other"][-1].outputs[0].finish_reason == "length"
    stats = engine.get_stats()
    assert stats.kv_usage.used_blocks == 0 and stats.num_running == stats.num_waiting == 0


@pytest.mark.parametrize("prompt, params, message", [
    (list(range(1, 200)), None, "max_model_len"),
    ("", None, "empty"),
    ([], None, "empty"),
    ([1, 2, 99999], None, "vocabulary"),
    ("hi", "greedy", "SamplingParams"),
])
def test_bad_requests_raise_before_anything_is_queued(make_engine, prompt, params, message):
    engine = make_engine()
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", prompt, params)
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("params, message", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(n=0), "n must be"),
])
def test_impossible_sampling_params_raise_with_a_sentence(params, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**params)


def test_a_batch_with_one_bad_request_queues_none_and_the_engine_keeps_serving(make_engine):
    engine = make_engine()
    good = ("good", "fine", SamplingParams(max_tokens=2, **GREEDY))
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_requests([good, ("bad", list(range(1, 300)), None)])
    assert not engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="unique"):
        engine.add_requests([good, good])
    engine.add_request(*good)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request(*good)
    assert run_all(engine)["good"][-1].finished


def test_a_request_that_outgrows_the_kv_pool_is_refused(make_engine):
    engine = make_engine(num_kv_blocks=4, block_size=16)
    with pytest.raises(ValueError, match="KV blocks"):
        engine.add_request("big", list(range(1, 60)), SamplingParams(max_tokens=20))
    engine.add_request("small", list(range(1, 30)), SamplingParams(max_tokens=20, **GREEDY))
    assert run_all(engine)["small"][-1].finished


def test_a_failing_step_ends_its_requests_with_an_error_and_others_go_on(make_engine, monkeypatch):
    engine = make_engine()
    engine.add_request("unlucky", [1, 2, 3], SamplingParams(max_tokens=3, **GREEDY))
    real_run = engine.runner.launch

    def failing_run(batch):
        raise RuntimeError("device on fire")

    monkeypatch.setattr(engine.runner, "launch", failing_run)
    [failed] = engine.step()
    assert failed.finished and failed.outputs[0].finish_reason == "error"
    assert "device on fire" in failed.error
    assert engine.get_stats().kv_usage.used_blocks == 0
    monkeypatch.setattr(engine.runner, "launch", real_run)
    engine.add_request("lucky", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True, **GREEDY))
    assert run_all(engine)["lucky"][-1].outputs[0].finish_reason == "length"


def test_step_observers_see_what_ran_and_the_pool(make_engine):
    engine = make_engine(max_num_batched_tokens=16)
    infos: list[StepInfo] = []
    engine.add_step_observer(infos.append)
    engine.add_request("a", list(range(1, 41)), SamplingParams(max_tokens=2, ignore_eos=True, **GREEDY))
    run_all(engine)
    assert [info.step for info in infos] == list(range(len(infos)))
    assert [(c.num_new_tokens, c.is_prefill) for info in infos for c in info.scheduled] == [
        (16, True), (16, True), (8, True), (1, False)]
    assert infos[-1].finished == ["a"]
    for info in infos:
        usage = info.kv_usage
        assert usage.used_slots + usage.fragmentation_slots + usage.free_slots == usage.total_slots
        assert info.run_time > 0
    engine.remove_step_observer(infos.append)


def test_stats_count_tokens_preemptions_and_prefix_hits(make_engine):
    engine = make_engine(num_kv_blocks=6, block_size=8)
    prompt = list(range(1, 20))
    params = SamplingParams(max_tokens=16, ignore_eos=True, **GREEDY)
    engine.add_requests([("a", prompt, params), ("b", prompt[:18], params)])
    run_all(engine)
    stats = engine.get_stats()
    assert stats.num_preemptions > 0
    assert stats.prefix_cache_hit_rate > 0
    assert stats.prompt_tokens_total == 37 and stats.generation_tokens_total == 32
    assert stats.num_requests_finished == 2
    assert stats.decode_tokens_total + stats.prefill_tokens_total >= 37 + 30


def test_n_samples_share_the_prompt_blocks_and_draw_different_tokens(make_engine):
    engine = make_engine()
    seen_tables = []
    engine.add_step_observer(lambda info: seen_tables.append(engine.scheduler.block_manager.block_tables()))
    engine.add_request("n", list(range(1, 40)), SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=7,
                                                               ignore_eos=True))
    final = run_all(engine)["n"][-1]
    assert [out.index for out in final.outputs] == [0, 1, 2]
    assert len({tuple(out.token_ids) for out in final.outputs}) > 1
    tables = next(t for t in seen_tables if len(t) == 3)
    first_blocks = {tuple(table[:2]) for table in tables.values()}
    assert len(first_blocks) == 1, "the prompt's two full blocks are shared by all three samples"


def test_seeded_sampling_is_the_same_alone_and_in_any_batch(make_engine):
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    engine = make_engine()
    engine.add_request("alone", [9, 8, 7], params)
    alone = run_all(engine)["alone"][-1].outputs[0].token_ids
    engine = make_engine(max_num_batched_tokens=8)
    engine.add_request("before", list(range(1, 30)), SamplingParams(temperature=1.0, max_tokens=12))
    engine.step()
    engine.add_request("crowded", [9, 8, 7], params)
    engine.add_request("after", [1, 2], SamplingParams(temperature=0.5, max_tokens=5))
    assert run_all(engine)["crowded"][-1].outputs[0].token_ids == alone


def test_logprobs_hold_the_sampled_token_and_sum_to_the_cumulative(make_engine):
    engine = make_engine()
    engine.add_request("lp", [1, 2, 3], SamplingParams(max_tokens=4, logprobs=3, ignore_eos=True, **GREEDY))
    out = run_all(engine)["lp"][-1].outputs[0]
    assert len(out.logprobs) == 4
    for token_id, entry in zip(out.token_ids, out.logprobs):
        assert token_id in entry and len(entry) == 3, "greedy: the sampled token is the top one"
        assert entry[token_id] == max(entry.values())
    assert out.cumulative_logprob == pytest.approx(sum(e[t] for t, e in zip(out.token_ids, out.logprobs)))


def test_max_tokens_none_generates_up_to_max_model_len(make_engine):
    engine = make_engine(max_model_len=24)
    engine.add_request("open", list(range(1, 11)), SamplingParams(max_tokens=None, ignore_eos=True, **GREEDY))
    out = run_all(engine)["open"][-1].outputs[0]
    assert len(out.token_ids) == 14 and out.finish_reason == "length"


def test_engine_config_errors_say_what_to_change(make_engine, loaded):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        make_engine(max_model_len=100_000)
    with pytest.raises(ValueError, match="naive policy reserves"):
        make_engine(kv_policy="naive", num_kv_blocks=4)
    with pytest.raises(TypeError, match="valid engine arguments are: model, tokenizer"):
        EngineConfig(max_num_seq=8)
    with pytest.raises(ValueError, match="unknown engine argument 'gpu_util'"):
        EngineConfig(gpu_util=0.5)
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        EngineConfig(block_size=0)
    with pytest.raises(ValueError, match="kv_policy"):
        EngineConfig(kv_policy="contiguous")
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(dtype="float64")
    path, model, tokenizer = loaded
    with pytest.raises(ValueError, match="make them agree"):
        LLMEngine(EngineConfig(model=path, dtype="bfloat16", device="cpu"), model=model, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="with float linear weights .* dtype='int4'; make them agree"):
        LLMEngine(EngineConfig(model=path, dtype="int4", device="cpu"), model=model, tokenizer=tokenizer)
    packed = quantize_model(copy.deepcopy(model), "int4")
    with pytest.raises(ValueError, match="with int4 linear weights .* dtype='int8'; make them agree"):
        LLMEngine(EngineConfig(model=path, dtype="int8", device="cpu"), model=packed, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="with int4 linear weights .* dtype='float32'; make them agree"):
        LLMEngine(EngineConfig(model=path, dtype="float32", device="cpu"), model=packed, tokenizer=tokenizer)
    assert LLMEngine(EngineConfig(model=path, dtype="int4", device="cpu"), model=packed, tokenizer=tokenizer)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            EngineConfig(device="cuda")


def test_step_observer_reports_a_one_token_prompt_as_prefill(tiny_llama):
    """A chunk is prefill or decode as scheduled, not as it looks after postprocess."""
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), num_kv_blocks=32))
    seen = []
    engine.add_step_observer(seen.append)
    engine.add_request("one", [42], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    assert [chunk.is_prefill for info in seen for chunk in info.scheduled] == [True, False, False]


# ---- the prefix cache holds the KV of the prefix its hash names -----------------------------

@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**16))
def test_every_cached_block_holds_the_kv_of_its_prefix(make_engine, tiny_llama_loaded, seed):
    """A random workload with shared prefixes, chunked prefill, arrivals mid-run and eviction from a
    small pool; afterwards each block in the prefix cache must hold the K and V that a fresh,
    engine-free computation of the prefix its hash stands for writes (a hash that forgets the parent
    block, or a block reused under a wrong hash, puts another prefix's KV there)."""
    from nanovllm.engine.block_manager import hash_block_tokens
    from conftest import PagedSequence

    rng = random.Random(seed)
    block_size = 4
    engine = make_engine(block_size=block_size, num_kv_blocks=40, max_num_batched_tokens=16, max_model_len=64)
    # Prompts open with 1-3 blocks drawn from three, so one block's tokens recur after different parents.
    blocks = [[rng.randrange(1, 256) for _ in range(block_size)] for _ in range(3)]
    prompts = [sum((rng.choice(blocks) for _ in range(rng.randrange(1, 4))), [])
               + [rng.randrange(1, 256) for _ in range(rng.randrange(1, 7))] for _ in range(8)]
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=rng.randrange(1, 7), ignore_eos=True)
              for i in range(len(prompts))]
    outputs: dict[str, list[int]] = {}
    for i, (prompt, param) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), prompt, param, stream=False)
        for _ in range(rng.randrange(3)):
            for output in engine.step():
                outputs[output.request_id] = output.outputs[0].token_ids
    while engine.has_unfinished_requests():
        for output in engine.step():
            outputs[output.request_id] = output.outputs[0].token_ids

    cached = engine.scheduler.block_manager.cached_block_map          # hash -> block id
    kv_cache = engine.runner.kv_cache                                 # [L, 2, N, bs, Hkv, D]
    checked = set()
    _, model, _ = tiny_llama_loaded
    for i, prompt in enumerate(prompts):
        tokens = prompt + outputs[str(i)]
        fresh = PagedSequence(model, block_size, num_blocks=-(-len(tokens) // block_size))
        fresh.step(tokens)
        parent = None
        for index in range(len(tokens) // block_size):
            parent = hash_block_tokens(parent, tokens[index * block_size:(index + 1) * block_size])
            if parent not in cached:
                continue
            for layer, (k_fresh, v_fresh) in enumerate(fresh.kv_caches):
                fresh_block = fresh.block_table[index]
                for kv, expected in ((0, k_fresh[fresh_block]), (1, v_fresh[fresh_block])):
                    torch.testing.assert_close(kv_cache[layer, kv, cached[parent]], expected, rtol=1e-5, atol=1e-5,
                                               msg=f"prompt {i} block {index} layer {layer}: another prefix's KV")
            checked.add(parent)
    assert checked, "the workload must leave shared blocks in the prefix cache"
    assert set(cached) <= checked, "every cached block belongs to some request's prefix"
