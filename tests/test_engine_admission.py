"""What LLMEngine checks and builds before a request runs, and what it tells observers and logs: the
tokenizer it picks for a model, the sequences a request becomes (ids, seeds, limits, detokenizers,
grammar matchers), the refusals of bad requests in whole sentences, the waiting count, a step's
StepInfo, and a step that fails before it launches.

Like tests/test_engine_outputs.py these run a few steps of engines over the tiny Llama loaded once, or
call the engine's functions directly, so that a mutation run over engine.py can afford them.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import shutil

import pytest
import torch

from nanovllm.config import EngineConfig
from nanovllm.engine.engine import LLMEngine, StepInfo, load_tokenizer
from nanovllm.model.loader import load_model_config
from nanovllm.sampling_params import SamplingParams
from nanovllm.tokenizer import HFTokenizer, TokenIdTokenizer
from test_engine import LetterTokenizer
from test_engine_outputs import run_all

GREEDY = dict(temperature=0.0)
ENGINE_LOGGER = "nanovllm.engine.engine"


# ---- the tokenizer ---------------------------------------------------------------------------


@pytest.fixture
def bare_model(tiny_llama, tmp_path):
    """A copy of the tiny Llama's directory without its tokenizer.json."""
    bare = tmp_path / "bare"
    shutil.copytree(tiny_llama, bare)
    (bare / "tokenizer.json").unlink()
    return bare


def odd_model_config(path: str, load_format: str = "auto"):
    """The model's config with a vocabulary, EOS and BOS of its own, to see that a stand-in takes them."""
    return dataclasses.replace(load_model_config(path, load_format), vocab_size=321, eos_token_ids=[5, 7],
                               bos_token_id=3)


def assert_ids_only_of(tokenizer, model_config) -> None:
    assert isinstance(tokenizer, TokenIdTokenizer)
    assert (tokenizer.vocab_size, tokenizer.eos_token_ids, tokenizer.bos_token_id) == (
        model_config.vocab_size, model_config.eos_token_ids, model_config.bos_token_id)


def test_skip_tokenizer_init_gives_an_ids_only_tokenizer_of_the_models_vocabulary_and_special_ids(tiny_llama):
    model_config = odd_model_config(str(tiny_llama))
    tokenizer = load_tokenizer(EngineConfig(model=str(tiny_llama), skip_tokenizer_init=True), model_config)
    assert_ids_only_of(tokenizer, model_config)


def test_dummy_weights_of_a_builtin_shape_get_an_ids_only_tokenizer_without_a_warning(caplog):
    model_config = odd_model_config("qwen3-0.6b", "dummy")
    with caplog.at_level(logging.WARNING, logger=ENGINE_LOGGER):
        tokenizer = load_tokenizer(EngineConfig(model="qwen3-0.6b", load_format="dummy"), model_config)
    assert_ids_only_of(tokenizer, model_config)
    assert not caplog.records


def test_a_model_directory_without_tokenizer_json_gets_an_ids_only_tokenizer_and_a_warning_saying_what_to_pass(
        bare_model, caplog):
    model_config = odd_model_config(str(bare_model))
    with caplog.at_level(logging.WARNING, logger=ENGINE_LOGGER):
        tokenizer = load_tokenizer(EngineConfig(model=str(bare_model)), model_config)
    assert_ids_only_of(tokenizer, model_config)
    assert [record.getMessage() for record in caplog.records] == [
        f"{bare_model} has no tokenizer.json: prompts must be token ids, outputs are decoded as <id>; "
        "pass tokenizer=PATH for text"]


def assert_the_tiny_llamas_tokenizer(tokenizer, tiny_llama_loaded) -> None:
    """The tiny Llama's own tokenizer (not, say, the embedded model's, which Tokenizer.load(None) gives)."""
    reference = tiny_llama_loaded[2]
    assert isinstance(tokenizer, HFTokenizer)
    assert tokenizer.eos_token_ids == reference.eos_token_ids
    assert tokenizer.encode("hello world") == reference.encode("hello world")


@pytest.mark.parametrize("load_format", ["auto", "dummy"])
def test_a_model_directory_with_tokenizer_json_brings_its_tokenizer_whatever_the_weights(
        tiny_llama, tiny_llama_loaded, load_format):
    tokenizer = load_tokenizer(EngineConfig(model=str(tiny_llama), load_format=load_format),
                               load_model_config(str(tiny_llama)))
    assert_the_tiny_llamas_tokenizer(tokenizer, tiny_llama_loaded)


def test_a_tokenizer_path_is_used_for_a_model_directory_that_has_none(tiny_llama, tiny_llama_loaded, bare_model):
    tokenizer = load_tokenizer(EngineConfig(model=str(bare_model), tokenizer=str(tiny_llama)),
                               load_model_config(str(bare_model)))
    assert_the_tiny_llamas_tokenizer(tokenizer, tiny_llama_loaded)


# ---- waiting, observers ----------------------------------------------------------------------


def test_the_waiting_count_includes_the_samples_held_back_while_their_prompt_is_prefilled(make_engine):
    engine = make_engine(max_num_batched_tokens=16)
    engine.add_request("n", list(range(1, 40)), SamplingParams(n=3, max_tokens=2, ignore_eos=True))
    assert engine.get_num_waiting() == engine.get_stats().num_waiting == 3
    engine.step()   # the leader's first chunk runs; its two siblings wait for the prompt's KV
    assert engine.get_num_waiting() == engine.get_stats().num_waiting == 2
    run_all(engine)
    assert engine.get_num_waiting() == 0


class DoublingClock:
    """time for the engine: perf_counter() returns 1, 2, 4, 8, ... so that each phase of a step lasts
    twice the one before it (a phase timed from the wrong end, or summed, breaks the ratios)."""

    def __init__(self):
        self.now = 0.5

    def perf_counter(self) -> float:
        self.now *= 2
        return self.now

    @staticmethod
    def time() -> float:
        return 0.0


def test_step_observers_see_each_chunks_request_and_sequence_the_preemptions_and_the_phase_times(
        make_engine, monkeypatch):
    monkeypatch.setattr("nanovllm.engine.engine.time", DoublingClock())
    engine = make_engine(num_kv_blocks=6, block_size=8)
    infos: list[StepInfo] = []
    engine.add_step_observer(infos.append)
    params = SamplingParams(max_tokens=16, ignore_eos=True, **GREEDY)
    engine.add_requests([("a", list(range(1, 20)), params), ("b", list(range(1, 19)), params)])
    run_all(engine)

    assert {(chunk.request_id, chunk.seq_id) for info in infos for chunk in info.scheduled} == {("a", 0), ("b", 1)}
    preempted = [request_id for info in infos for request_id in info.preempted]
    assert preempted and set(preempted) <= {"a", "b"}
    assert len(preempted) == engine.get_stats().num_preemptions
    for info in infos:
        assert info.num_prefill_tokens == sum(c.num_new_tokens for c in info.scheduled if c.is_prefill)
        assert info.num_decode_tokens == sum(c.num_new_tokens for c in info.scheduled if not c.is_prefill)
        assert info.schedule_time > 0
        assert (info.run_time, info.postprocess_time) == (2 * info.schedule_time, 4 * info.schedule_time)


def test_a_failing_step_observer_is_logged_and_the_others_still_see_every_step(make_engine, caplog):
    engine = make_engine()
    infos: list[StepInfo] = []

    def broken(info: StepInfo) -> None:
        raise RuntimeError("observer broke")

    engine.add_step_observer(broken)
    engine.add_step_observer(infos.append)
    engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True, **GREEDY))
    with caplog.at_level(logging.ERROR, logger=ENGINE_LOGGER):
        assert run_all(engine)["r"][-1].outputs[0].finish_reason == "length"
    assert len(infos) == 3
    assert [record.getMessage() for record in caplog.records] == ["a step observer failed; the engine goes on"] * 3
    assert all(str(record.exc_info[1]) == "observer broke" for record in caplog.records)


# ---- a step that fails before it launches ----------------------------------------------------


def fail_launches_with(engine: LLMEngine, monkeypatch, bad_ids: set[str]) -> RuntimeError:
    """Steps that schedule a request of bad_ids fail to launch; those requests' own sampling rows
    cannot be built (ValueError). Returns the launch's error."""
    launch_error = RuntimeError("the step could not launch")
    real_launch, real_prepare = engine.runner.launch, engine.runner.prepare_sampling

    def launch(batch):
        if any(seq.request_id in bad_ids for seq, _ in batch.scheduled):
            raise launch_error
        return real_launch(batch)

    def prepare_sampling(batch, **kwargs):
        bad = sorted({seq.request_id for seq in batch.sampling_seqs} & bad_ids)
        if bad:
            raise ValueError(f"row of {bad[0]} overflows")
        return real_prepare(batch, **kwargs)

    monkeypatch.setattr(engine.runner, "launch", launch)
    monkeypatch.setattr(engine.runner, "prepare_sampling", prepare_sampling)
    return launch_error


def test_a_request_whose_sampling_row_cannot_be_built_ends_alone_with_its_own_error_and_it_is_logged(
        make_engine, monkeypatch, caplog):
    engine = make_engine()
    launch_error = fail_launches_with(engine, monkeypatch, {"bad"})
    params = SamplingParams(max_tokens=3, ignore_eos=True, **GREEDY)
    engine.add_requests([("good", [1, 2, 3], params), ("bad", [4, 5, 6], params)])
    with caplog.at_level(logging.ERROR, logger=ENGINE_LOGGER):
        outputs = run_all(engine)
    [bad] = outputs["bad"]
    assert bad.finished and bad.outputs[0].finish_reason == "error"
    assert bad.error == "ValueError: row of bad overflows" and bad.error_in_request
    good = outputs["good"][-1]
    assert good.error is None and good.outputs[0].finish_reason == "length" and len(good.outputs[0].token_ids) == 3
    [record] = caplog.records
    assert record.getMessage() == ("a step failed on the sampling parameters of request(s) ['bad']; they end "
                                   "with an error, the others run next step")
    assert record.exc_info[1] is launch_error


@pytest.mark.parametrize("bad_ids", [set(), {"a", "b"}], ids=["no-faulty-rows", "every-row-faulty"])
def test_a_launch_failure_that_is_no_ones_own_or_everyones_ends_every_request_of_the_step(
        make_engine, monkeypatch, caplog, bad_ids):
    engine = make_engine()
    params = SamplingParams(max_tokens=3, ignore_eos=True, **GREEDY)
    engine.add_requests([("a", [1, 2, 3], params), ("b", [4, 5, 6], params)])
    launch_error = fail_launches_with(engine, monkeypatch, bad_ids)
    if not bad_ids:
        monkeypatch.setattr(engine.runner, "launch", lambda batch: (_ for _ in ()).throw(launch_error))
    with caplog.at_level(logging.ERROR, logger=ENGINE_LOGGER):
        outputs = run_all(engine)
    for request_id in ("a", "b"):
        [final] = outputs[request_id]
        assert final.outputs[0].finish_reason == "error" and not final.error_in_request
        assert final.error == "RuntimeError: the step could not launch"
    [record] = caplog.records
    assert record.getMessage() == "a step failed; its requests end with finish_reason 'error'"
    assert record.exc_info[1] is launch_error



def test_a_launch_failing_beside_a_constrained_request_waiting_on_its_masks_ends_only_the_faulty_one(
        make_engine, monkeypatch):
    """A step fails before it launches while a structured-outputs request's last sampling is still
    deferred (its newest token a placeholder, its masks in the grammar process). Telling whose fault
    it was builds each request's sampling row without grammar masks, so the constrained request is
    not blamed (it had ended with an AttributeError from the deferred samples) and runs on to a choice."""
    pytest.importorskip("xgrammar")
    from nanovllm.runner.sampler import DeferredSamples
    engine = make_engine(async_scheduling=True)    # as on a GPU: a step is completed after the next one launches
    choices = ["abcdefghijklmnop", "qrstuvwxyz"]
    engine.add_request("constrained", [1, 2, 3], SamplingParams(max_tokens=32, structured_outputs={"choice": choices},
                                                                 **GREEDY))
    outputs = {}
    for _ in range(2):
        for output in engine.step():
            outputs.setdefault(output.request_id, []).append(output)
    [seq] = engine.requests["constrained"]
    assert isinstance(engine.runner.last_samples, DeferredSamples) and seq.num_pending == 1
    fail_launches_with(engine, monkeypatch, {"bad"})
    engine.add_request("bad", [4, 5, 6], SamplingParams(max_tokens=3, **GREEDY))
    for request_id, more in run_all(engine).items():
        outputs.setdefault(request_id, []).extend(more)
    assert outputs["bad"][-1].error == "ValueError: row of bad overflows"
    final = outputs["constrained"][-1]
    assert final.error is None and final.outputs[0].text in choices and final.outputs[0].finish_reason == "stop"


# ---- grammar matchers and logit_bias ---------------------------------------------------------


def test_logit_bias_on_the_last_token_of_the_vocabulary_is_served_and_past_it_refused_in_a_sentence(make_engine):
    engine = make_engine()
    vocab_size = engine.model_config.vocab_size
    message = f"logit_bias names token {vocab_size}, outside the vocabulary [0, {vocab_size})"
    with pytest.raises(ValueError, match=re.escape(message)):
        engine.add_request("past", [1, 2], SamplingParams(logit_bias={1: 1.0, vocab_size: 1.0}))
    last = vocab_size - 1
    engine.add_request("last", [1, 2], SamplingParams(logit_bias={last: 100.0}, max_tokens=2, ignore_eos=True,
                                                      **GREEDY))
    assert run_all(engine)["last"][-1].outputs[0].token_ids == [last, last]


def test_each_sample_of_a_constrained_request_gets_its_own_matcher_and_ends_on_a_choice(make_engine):
    pytest.importorskip("xgrammar")
    engine = make_engine()
    choices = ["red", "green", "dark blue"]
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=16, structured_outputs={"choice": choices})
    engine.add_request("first", [1, 2, 3], params)
    compiler = engine.grammar_compiler
    engine.add_request("second", [4, 5, 6], params)
    assert engine.grammar_compiler is compiler, "one compiler serves every request"
    states = [seq.grammar for seqs in engine.requests.values() for seq in seqs]
    assert len({id(state) for state in states}) == 6
    for final in (outputs[-1] for outputs in run_all(engine).values()):
        for sample in final.outputs:
            assert sample.text in choices and sample.finish_reason == "stop"


# ---- refusals --------------------------------------------------------------------------------

# name -> (vocab_size -> (add_requests arguments, the whole sentence of the refusal))
REFUSALS = {
    "request-id-not-a-string": lambda v: (dict(request_id=7), "request_id must be a string, got int"),
    "params-not-sampling-params": lambda v: (dict(params="greedy"),
                                             "sampling params must be a SamplingParams, got str"),
    "empty-text": lambda v: (dict(prompt=""), "the prompt is empty; send at least one character"),
    "empty-ids": lambda v: (dict(prompt=[]), "the prompt is empty; send at least one token id"),
    "prompt-a-dict": lambda v: (dict(prompt={"text": "hi"}),
                                "a prompt is a string or a list of token ids, got dict"),
    "token-id-true": lambda v: (dict(prompt=[1, True]), f"prompt token id True is not in the vocabulary [0, {v})"),
    "token-id-float": lambda v: (dict(prompt=[1, 2.0]), f"prompt token id 2.0 is not in the vocabulary [0, {v})"),
    "token-id-negative": lambda v: (dict(prompt=[-1]), f"prompt token id -1 is not in the vocabulary [0, {v})"),
    "token-id-vocab-size": lambda v: (dict(prompt=[1, v]), f"prompt token id {v} is not in the vocabulary [0, {v})"),
    "stop-id-vocab-size": lambda v: (dict(params=SamplingParams(stop_token_ids=[2, v])),
                                     f"stop_token_ids [{v}] are not in the vocabulary [0, {v}); remove them"),
    "stop-without-detokenizing": lambda v: (
        dict(params=SamplingParams(stop=["x"]), detokenize=False),
        "stop strings are matched in the text: a request with them must be detokenized"),
    "stop-without-a-tokenizer": lambda v: (
        dict(params=SamplingParams(stop=["x"]), skip_tokenizer_init=True),
        "stop strings need the text, and skip_tokenizer_init makes none; use stop_token_ids instead"),
}


@pytest.mark.parametrize("refusal", REFUSALS.values(), ids=REFUSALS.keys())
def test_a_bad_request_is_refused_in_a_whole_sentence_and_nothing_is_queued(make_engine, tiny_llama, refusal):
    request_args, message = refusal(load_model_config(str(tiny_llama)).vocab_size)
    engine = make_engine(skip_tokenizer_init=request_args.get("skip_tokenizer_init", False))
    request = (request_args.get("request_id", "bad"), request_args.get("prompt", [1, 2, 3]), request_args.get("params"))
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        engine.add_requests([request], detokenize=request_args.get("detokenize", True))
    assert not engine.has_unfinished_requests() and engine.get_num_waiting() == 0


def test_an_id_still_running_is_refused_in_a_sentence_and_free_again_once_it_ends(make_engine):
    engine = make_engine()
    params = SamplingParams(max_tokens=2, ignore_eos=True, **GREEDY)
    engine.add_request("same", [1, 2, 3], params)
    message = "request id 'same' is already in use by an unfinished request; pick a unique id"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        engine.add_request("same", [4, 5], params)
    run_all(engine)
    engine.add_request("same", [4, 5], params)
    assert run_all(engine)["same"][-1].prompt_token_ids == [4, 5]


def test_token_ids_zero_and_the_last_of_the_vocabulary_are_a_valid_prompt(make_engine):
    engine = make_engine()
    last = engine.model_config.vocab_size - 1
    engine.add_request("edges", [0, last], SamplingParams(max_tokens=1, ignore_eos=True, **GREEDY))
    assert run_all(engine)["edges"][-1].prompt_token_ids == [0, last]


# ---- the sequences a request becomes ---------------------------------------------------------


def test_sequence_ids_count_up_from_zero_across_requests_and_their_samples(make_engine):
    engine = make_engine()
    seen: list[StepInfo] = []
    engine.add_step_observer(seen.append)
    params = dict(max_tokens=2, ignore_eos=True, **GREEDY)
    engine.add_request("a", [1, 2, 3], SamplingParams(**params))
    engine.add_request("b", [4, 5, 6], SamplingParams(n=3, **params))
    engine.add_request("c", [7, 8, 9], SamplingParams(**params))
    run_all(engine)
    assert {(chunk.request_id, chunk.seq_id) for info in seen for chunk in info.scheduled} == {
        ("a", 0), ("b", 1), ("b", 2), ("b", 3), ("c", 4)}


def test_the_first_sample_draws_with_the_requests_seed_and_each_other_sample_with_its_own(make_engine):
    params = dict(temperature=1.0, seed=21, max_tokens=8, ignore_eos=True)
    engine = make_engine()
    engine.add_request("one", [7, 8, 9], SamplingParams(**params))
    engine.add_request("three", [7, 8, 9], SamplingParams(n=3, **params))
    outputs = run_all(engine)
    [alone] = outputs["one"][-1].outputs
    first, second, third = outputs["three"][-1].outputs
    assert first.token_ids == alone.token_ids
    assert len({tuple(first.token_ids), tuple(second.token_ids), tuple(third.token_ids)}) == 3
    engine.add_request("again", [7, 8, 9], SamplingParams(n=3, **params))
    assert [seq.seed for seq in engine.requests["again"]] == [21, hash((21, 1)), hash((21, 2))]


def test_unseeded_requests_draw_the_same_tokens_in_engines_of_the_same_seed(make_engine):
    def draw(seed: int) -> list[int]:
        engine = make_engine(seed=seed)
        engine.add_request("r", [7, 8, 9], SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True))
        return run_all(engine)["r"][-1].outputs[0].token_ids

    assert draw(3) == draw(3)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_skip_special_tokens_decides_whether_a_special_token_shows_in_the_text(make_engine, tiny_llama_loaded,
                                                                                skip_special_tokens):
    tokenizer = tiny_llama_loaded[2]
    eos = tokenizer.eos_token_ids[0]
    engine = make_engine()
    engine.add_request("r", [1, 2, 3], SamplingParams(logit_bias={eos: 100.0}, ignore_eos=True, max_tokens=2,
                                                      skip_special_tokens=skip_special_tokens, **GREEDY))
    out = run_all(engine)["r"][-1].outputs[0]
    assert out.token_ids == [eos, eos]
    special_text = tokenizer.decode([eos, eos], skip_special_tokens=False)
    assert special_text and out.text == ("" if skip_special_tokens else special_text)


# ---- building the engine ---------------------------------------------------------------------


def weights_of(engine: LLMEngine) -> dict:
    return engine.runner.model.state_dict()


def module_types(engine: LLMEngine) -> set[str]:
    return {type(module).__name__ for module in engine.runner.model.modules()}


def test_an_engine_built_from_a_path_loads_the_checkpoint_in_the_dtype_format_and_quantization_asked(
        tiny_llama, tiny_llama_loaded):
    checkpoint = tiny_llama_loaded[1].state_dict()["lm_head.weight"]   # float32
    path = str(tiny_llama)
    bfloat16 = LLMEngine(EngineConfig(model=path, dtype="bfloat16", max_model_len=64))
    assert torch.equal(weights_of(bfloat16)["lm_head.weight"], checkpoint.to(torch.bfloat16))
    dummy = LLMEngine(EngineConfig(model=path, load_format="dummy", max_model_len=64))
    assert not torch.equal(weights_of(dummy)["lm_head.weight"], checkpoint), "dummy weights are not read"
    w4a16 = LLMEngine(EngineConfig(model=path, quantization="w4a16", max_model_len=64))
    assert "W4A16Linear" in module_types(w4a16)


def test_an_engine_in_a_cpu_weight_format_packs_the_checkpoints_linears(tiny_llama, tiny_llama_loaded):
    checkpoint = tiny_llama_loaded[1].state_dict()["embed_tokens.weight"]
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), dtype="int8", max_model_len=64))
    assert {"PackedLinear", "RefinedLMHead"} <= module_types(engine)
    assert torch.equal(weights_of(engine)["embed_tokens.weight"], checkpoint)
    dummy = LLMEngine(EngineConfig(model=str(tiny_llama), dtype="int8", load_format="dummy", max_model_len=64))
    assert "PackedLinear" in module_types(dummy)
    assert not torch.equal(weights_of(dummy)["embed_tokens.weight"], checkpoint), "dummy weights are not read"
    engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True, **GREEDY))
    assert len(run_all(engine)["r"][-1].outputs[0].token_ids) == 3


def test_an_engine_over_a_model_directory_without_a_tokenizer_stands_in_one_of_the_models_vocabulary(bare_model):
    engine = LLMEngine(EngineConfig(model=str(bare_model), max_model_len=64))
    assert isinstance(engine.tokenizer, TokenIdTokenizer) and engine.tokenizer.vocab_size == 320
    engine.add_request("ids", [1, 2, 3], SamplingParams(max_tokens=2, ignore_eos=True, **GREEDY))
    out = run_all(engine)["ids"][-1].outputs[0]
    assert out.text == "".join(f"<{token_id}>" for token_id in out.token_ids)


class OtherEosTokenizer(LetterTokenizer):
    """The tiny Llama's config names EOS 257; this tokenizer names 300."""
    eos_token_ids = [300]


def test_a_request_stops_at_the_tokenizers_eos_and_at_the_models_and_min_tokens_holds_back_both(tiny_llama_loaded):
    path, model, _ = tiny_llama_loaded
    engine = LLMEngine(EngineConfig(model=path, max_model_len=64), model=model, tokenizer=OtherEosTokenizer())
    assert engine.eos_token_ids == [257, 300]
    for eos in (257, 300):
        engine.add_request(f"to-{eos}", [1, 2, 3], SamplingParams(min_tokens=2, max_tokens=8,
                                                                  logit_bias={eos: 100.0}, **GREEDY))
    outputs = run_all(engine)
    for eos in (257, 300):
        out = outputs[f"to-{eos}"][-1].outputs[0]
        assert out.finish_reason == "stop" and len(out.token_ids) == 3 and out.token_ids[-1] == eos
        assert eos not in out.token_ids[:2]


def test_min_tokens_holds_back_the_stop_token_of_a_greedy_request_with_nothing_else_set(tiny_llama_loaded):
    # Such a request samples through the plain greedy pass (runner.prepare_sampling): its stop tokens
    # are suppressed all the same until min_tokens.
    path, model, _ = tiny_llama_loaded
    engine = LLMEngine(EngineConfig(model=path, max_model_len=64), model=model)
    engine.add_request("probe", [1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True, **GREEDY))
    first = run_all(engine)["probe"][-1].outputs[0].token_ids[0]
    engine.add_request("held", [1, 2, 3], SamplingParams(max_tokens=8, min_tokens=3, stop_token_ids=[first],
                                                         ignore_eos=True, **GREEDY))
    out = run_all(engine)["held"][-1].outputs[0]
    assert len(out.token_ids) >= 3 and first not in out.token_ids[:3]


def test_the_naive_policy_serves_a_pool_of_exactly_the_blocks_one_sequence_reserves(make_engine):
    engine = make_engine(kv_policy="naive", max_model_len=64, block_size=16, num_kv_blocks=4)
    assert engine.scheduler.block_manager.num_reserved_blocks == 4
    engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True, **GREEDY))
    assert len(run_all(engine)["r"][-1].outputs[0].token_ids) == 4


def test_from_engine_args_builds_the_engine_its_arguments_describe(tiny_llama):
    engine = LLMEngine.from_engine_args(model=str(tiny_llama), max_model_len=48, block_size=8)
    assert (engine.config.model, engine.config.max_model_len, engine.config.block_size) == (str(tiny_llama), 48, 8)
