"""What LLMEngine reports, step by step, checked exactly: one output per request per step whatever
its number of samples, metrics from a clock that ticks once a call, counters, the text a stream
holds back for its stop strings, delta streams that owe their prompt log-probabilities, outputs
that later steps leave alone, and a step whose tokens fail to arrive.

Each test builds its engine over the tiny Llama loaded once (conftest.make_engine) and runs a few
steps: together they take a second or two, so that a mutation run over engine.py can afford them.
"""
from __future__ import annotations

import itertools
import re

import pytest

from nanovllm.config import EngineConfig
from nanovllm.engine.engine import LLMEngine
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams
from test_engine import LetterTokenizer

GREEDY = dict(temperature=0.0)


@pytest.fixture
def letter_engine(tiny_llama_loaded):
    """An engine whose every token is one printable character: text length = token count."""
    path, model, _ = tiny_llama_loaded
    return LLMEngine(EngineConfig(model=path, max_model_len=128), model=model, tokenizer=LetterTokenizer())


def run_all(engine: LLMEngine, max_steps: int = 100) -> dict[str, list[RequestOutput]]:
    """Step until idle (failing after max_steps: a request that never ends); every output per request id."""
    outputs: dict[str, list[RequestOutput]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return outputs
        for output in engine.step():
            outputs.setdefault(output.request_id, []).append(output)
    raise AssertionError(f"requests still unfinished after {max_steps} steps: {sorted(engine.requests)}")


class TickingClock:
    """time.time() for the scheduler: 1.0, 2.0, 3.0, ... one tick per call."""

    def __init__(self):
        self.ticks = itertools.count(1)

    def time(self) -> float:
        return float(next(self.ticks))


def probe_two_samples(make_engine, params: SamplingParams) -> list[list[int]]:
    engine = make_engine()
    engine.add_request("probe", [7, 8, 9], params)
    return [out.token_ids for out in run_all(engine)["probe"][-1].outputs]


def early_stop_token(samples: list[list[int]]) -> tuple[int, int]:
    """(a token of sample 1 that sample 0 never draws and sample 1 draws first at position p, p)."""
    for position, token in enumerate(samples[1][:-2]):
        if token not in samples[0] and token not in samples[1][:position]:
            return token, position
    raise AssertionError(f"no early stop token in {samples}")


def test_samples_that_end_apart_give_one_output_a_step_and_the_last_ones_times(make_engine, monkeypatch):
    params = dict(n=2, max_tokens=8, temperature=1.0, seed=5, ignore_eos=True)
    samples = probe_two_samples(make_engine, SamplingParams(**params))
    stop, position = early_stop_token(samples)

    clock = TickingClock()
    monkeypatch.setattr("nanovllm.engine.scheduler.time", clock)
    engine = make_engine()
    engine.add_request("two", [7, 8, 9], SamplingParams(stop_token_ids=[stop], **params), arrival_time=0.5)
    stream = run_all(engine)["two"]
    assert len(stream) == 8, "one output a step, not one per sample"
    assert [out.finished for out in stream] == [False] * 7 + [True]
    for step, out in enumerate(stream, start=1):
        first, second = out.outputs
        assert first.token_ids == samples[0][:step]
        assert second.token_ids == samples[1][:min(step - 1, position + 1)]   # it waits a step for the prompt
        assert second.finish_reason == (None if step <= position + 1 else "stop")
        assert out.metrics.finish_time is None or out.finished
    final = stream[-1]
    assert final.outputs[1].stop_reason == stop and final.outputs[0].finish_reason == "length"
    metrics = final.metrics
    # schedule() ticks once a step (first at 1.0) and complete() once (its token time); finish() reads it.
    assert metrics.arrival_time == 0.5 and metrics.first_scheduled_time == 1.0
    assert metrics.token_times == [2.0 * step for step in range(1, 9)]
    assert metrics.first_token_time == 2.0
    assert metrics.last_token_time == 16.0, "the latest sample's last token"
    assert metrics.finish_time == 16.0, "the last sample to finish"
    assert final.num_cached_tokens == 0


def test_a_stream_holds_back_the_text_that_could_begin_its_longest_stop_string(letter_engine):
    letter_engine.add_request("held", [40, 41], SamplingParams(max_tokens=6, ignore_eos=True, stop=["\n", "\n\n\n"],
                                                               **GREEDY))
    stream = run_all(letter_engine)["held"]
    full = stream[-1].outputs[0].text
    assert len(full) == 6 and "\n" not in full
    assert [out.outputs[0].text for out in stream] == [full[:max(k - 2, 0)] for k in range(1, 6)] + [full]


def test_streamed_outputs_keep_their_own_copies_as_later_steps_run(make_engine):
    engine = make_engine()
    engine.add_request("lp", [1, 2, 3], SamplingParams(max_tokens=4, logprobs=1, ignore_eos=True, **GREEDY))
    stream = run_all(engine)["lp"]
    assert [len(out.outputs[0].logprobs) for out in stream] == [1, 2, 3, 4]
    assert [len(out.outputs[0].token_ids) for out in stream] == [1, 2, 3, 4]
    assert [len(out.metrics.token_times) for out in stream] == [1, 2, 3, 4]
    assert stream[0].metrics.last_token_time < stream[-1].metrics.last_token_time


def test_a_delta_stream_gets_its_prompt_logprobs_once_with_its_first_token(make_engine):
    reference = make_engine()
    reference.add_request("whole", "Hi!!", SamplingParams(max_tokens=4, prompt_logprobs=1, ignore_eos=True,
                                                                **GREEDY))
    whole = run_all(reference)["whole"]
    assert all(out.prompt_logprobs == whole[-1].prompt_logprobs for out in whole), "every whole output has them"
    assert all(out.prompt == "Hi!!" and out.prompt_token_ids == whole[-1].prompt_token_ids for out in whole)
    assert len(whole[-1].prompt_logprobs) == len(whole[-1].prompt_token_ids) == 4
    assert whole[-1].prompt_logprobs[0] is None

    engine = make_engine()
    engine.add_request("delta", "Hi!!", SamplingParams(max_tokens=4, prompt_logprobs=1, ignore_eos=True,
                                                             **GREEDY), delta=True)
    first_outputs, first_deltas = engine.step_with_deltas()
    assert not first_deltas.outputs()
    [first] = first_outputs
    assert not first.finished and first.prompt_logprobs == whole[-1].prompt_logprobs
    assert first.prompt is None and first.prompt_token_ids == [] and first.metrics.token_times == []
    assert first.outputs[0].token_ids == whole[0].outputs[0].token_ids
    later = []
    while engine.has_unfinished_requests():
        outputs, deltas = engine.step_with_deltas()
        later += outputs + deltas.outputs()
    assert [out.prompt_logprobs for out in later] == [None] * len(later)
    assert [out.outputs[0].token_ids for out in later] == [[token] for token in whole[-1].outputs[0].token_ids[1:]]
    final = later[-1]
    assert final.finished and final.prompt == "Hi!!" and final.prompt_token_ids == whole[-1].prompt_token_ids
    assert len(final.metrics.token_times) == 4


def test_a_delta_stream_that_ends_before_its_prompt_logprobs_are_sent_gets_them_in_its_final_output(make_engine):
    engine = make_engine(max_num_batched_tokens=8)
    engine.add_request("cut", list(range(1, 21)), SamplingParams(max_tokens=4, prompt_logprobs=1, **GREEDY),
                       delta=True)
    assert engine.step() == []            # the first chunk of the prompt: nothing to report yet
    engine.abort_request("cut")
    assert engine.has_unfinished_requests(), "the abort's final output is still to come"
    [final] = engine.step()
    assert final.finished and final.outputs[0].finish_reason == "abort"
    assert final.prompt_logprobs is not None and len(final.prompt_logprobs) == 9   # the chunk's and None first
    assert not engine.has_unfinished_requests()


def test_a_request_without_streaming_still_stops_at_its_stop_string(letter_engine):
    letter_engine.add_request("free", [40, 41], SamplingParams(max_tokens=8, ignore_eos=True, **GREEDY))
    free = run_all(letter_engine)["free"][-1].outputs[0].text
    stop = free[3:5]
    letter_engine.add_request("quiet", [40, 41], SamplingParams(max_tokens=8, ignore_eos=True, stop=[stop], **GREEDY),
                              stream=False, delta=True)
    [final] = run_all(letter_engine)["quiet"]
    assert final.finished and final.outputs[0].finish_reason == "stop"
    assert final.outputs[0].text == free[:free.index(stop)]
    assert final.prompt_token_ids == [40, 41] and len(final.metrics.token_times) == len(final.outputs[0].token_ids)


def test_quiet_and_streamed_requests_side_by_side_each_report_as_asked(make_engine):
    engine = make_engine()
    params = SamplingParams(max_tokens=3, ignore_eos=True, **GREEDY)
    engine.add_request("quiet", [1, 2], params, stream=False)
    engine.add_request("loud", [3, 4], params)
    outputs = run_all(engine)
    assert [out.finished for out in outputs["quiet"]] == [True]
    assert [out.finished for out in outputs["loud"]] == [False, False, True]


def test_counters_add_up_the_tokens_of_every_step(make_engine):
    engine = make_engine(max_num_batched_tokens=8)
    engine.add_request("a", list(range(1, 13)), SamplingParams(max_tokens=4, ignore_eos=True, **GREEDY))
    engine.add_request("b", [5, 6, 7], SamplingParams(n=2, max_tokens=2, temperature=1.0, seed=1, ignore_eos=True))
    run_all(engine)
    stats = engine.get_stats()
    assert stats.prompt_tokens_total == 12 + 3, "a request's prompt counts once, however many samples"
    assert stats.generation_tokens_total == 4 + 2 * 2
    # The samples of "b" compute its prompt each (no full block to share) and decode once each.
    assert stats.prefill_tokens_total == 12 + 2 * 3 and stats.decode_tokens_total == 3 + 2 * 1
    assert stats.num_requests_finished == 2
    assert stats.num_steps == engine.num_steps and stats.num_steps >= 5


def test_a_delta_stream_of_two_samples_ends_with_each_samples_index_and_stop_reason(make_engine):
    params = dict(n=2, max_tokens=8, temperature=1.0, seed=5, ignore_eos=True)
    samples = probe_two_samples(make_engine, SamplingParams(**params))
    stop, position = early_stop_token(samples)
    engine = make_engine()
    engine.add_request("two", [7, 8, 9], SamplingParams(stop_token_ids=[stop], **params), delta=True)
    stream = run_all(engine)["two"]
    assert all([completion.index for completion in out.outputs] == [0, 1] for out in stream)
    joined = stream[0]
    for out in stream[1:]:
        joined.merge(out)
    assert [completion.token_ids for completion in joined.outputs] == [samples[0], samples[1][:position + 1]]
    assert [completion.stop_reason for completion in joined.outputs] == [None, stop]


def test_delta_streams_under_async_scheduling_carry_known_tokens_only(make_engine):
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=3, logprobs=1, ignore_eos=True)
    finals = {}
    for async_scheduling in (False, True):
        engine = make_engine(async_scheduling=async_scheduling)
        engine.add_request("d", [4, 5, 6], params, delta=True)
        stream = run_all(engine)["d"]
        total = 0.0
        for out in stream:
            assert all(token >= 0 for token in out.outputs[0].token_ids), "a placeholder went out"
            assert len(out.outputs[0].logprobs) == len(out.outputs[0].token_ids)
            total += sum(entry[token] for token, entry in zip(out.outputs[0].token_ids, out.outputs[0].logprobs))
            assert out.outputs[0].cumulative_logprob == pytest.approx(total)
        joined = stream[0]
        for out in stream[1:]:
            joined.merge(out)
        finals[async_scheduling] = joined.outputs[0].token_ids
    assert finals[True] == finals[False] and len(finals[True]) == 6


def test_a_step_that_fails_after_an_abort_ends_every_other_request_of_it(make_engine):
    engine = make_engine(async_scheduling=True)
    for request_id in ("gone", "left", "right"):
        engine.add_request(request_id, [1, 2, 3], SamplingParams(max_tokens=4, **GREEDY))
    assert engine.step() == []                    # launched, not completed
    engine.abort_request("gone")
    engine.in_flight.samples = LostSamples()
    outputs = {out.request_id: out for out in engine.step()}
    assert outputs["gone"].outputs[0].finish_reason == "abort"
    for request_id in ("left", "right"):
        assert outputs[request_id].outputs[0].finish_reason == "error"
    assert not engine.has_unfinished_requests()


def test_requests_after_an_aborted_one_in_a_step_still_report(make_engine):
    engine = make_engine(async_scheduling=True)
    params = SamplingParams(max_tokens=4, ignore_eos=True, **GREEDY)
    engine.add_requests([("gone", [1, 2, 3], params), ("kept", [4, 5, 6], params)])
    assert engine.step() == []                    # launched, not completed
    engine.abort_request("gone")
    outputs = run_all(engine)
    assert [out.outputs[0].finish_reason for out in outputs["gone"]] == ["abort"]
    assert [len(out.outputs[0].token_ids) for out in outputs["kept"]] == [1, 2, 3, 4]


def test_requests_after_one_of_several_samples_in_a_step_still_report(make_engine):
    engine = make_engine()
    engine.add_request("pair", [1, 2, 3], SamplingParams(n=2, max_tokens=6, temperature=1.0, seed=1, ignore_eos=True))
    engine.step()
    engine.step()                                 # both samples are running now
    engine.add_request("late", [4, 5, 6], SamplingParams(max_tokens=3, ignore_eos=True, **GREEDY))
    assert [len(out.outputs[0].token_ids) for out in run_all(engine)["late"]] == [1, 2, 3]


def test_a_finished_requests_reporting_mode_is_forgotten_with_it(make_engine):
    engine = make_engine()
    params = SamplingParams(max_tokens=3, ignore_eos=True, **GREEDY)
    engine.add_request("x", [1, 2], params, stream=False)
    run_all(engine)
    engine.add_request("y", [1, 2], params, delta=True)
    run_all(engine)
    engine.add_request("y", [1, 2], params)          # the id again, now a whole stream
    stream = run_all(engine)["y"]
    assert [len(out.outputs[0].token_ids) for out in stream] == [1, 2, 3]
    assert all(out.prompt_token_ids == [1, 2] for out in stream)


def test_outputs_count_the_prompt_tokens_found_in_the_prefix_cache(make_engine):
    engine = make_engine(enable_prefix_caching=True, block_size=16)
    params = SamplingParams(max_tokens=2, ignore_eos=True, **GREEDY)
    for request_id, cached in (("cold", 0), ("warm", 16)):
        engine.add_request(request_id, list(range(1, 21)), params)
        assert run_all(engine)[request_id][-1].num_cached_tokens == cached


def test_a_request_aborted_before_it_ran_ends_with_empty_metrics(make_engine):
    engine = make_engine()
    engine.add_request("never", [1, 2, 3], SamplingParams(max_tokens=3))
    engine.abort_request("never")
    [final] = engine.step()
    assert final.finished and final.outputs[0].finish_reason == "abort" and final.outputs[0].token_ids == []
    metrics = final.metrics
    assert metrics.first_scheduled_time is metrics.first_token_time is metrics.last_token_time is None
    assert metrics.finish_time is not None and metrics.token_times == []


def test_a_step_that_fails_to_launch_still_returns_the_aborts_before_it(make_engine, monkeypatch):
    engine = make_engine()
    params = SamplingParams(max_tokens=3, **GREEDY)
    engine.add_requests([("gone", [1, 2], params), ("doomed", [3, 4], params)])
    engine.abort_request("gone")

    def failing_launch(batch):
        raise RuntimeError("device on fire")

    monkeypatch.setattr(engine.runner, "launch", failing_launch)
    outputs = {out.request_id: out.outputs[0].finish_reason for out in engine.step()}
    assert outputs == {"gone": "abort", "doomed": "error"}


def test_under_async_scheduling_a_step_with_penalties_waits_for_the_tokens_before_it(make_engine):
    engine = make_engine(async_scheduling=True)
    pending_at_launch = []
    real_launch = engine.runner.launch

    def launch(batch):
        pending_at_launch.append({seq.request_id: seq.num_pending for seq in batch.sampling_seqs})
        return real_launch(batch)

    engine.runner.launch = launch
    engine.add_request("penalised", [1, 2, 3], SamplingParams(max_tokens=4, repetition_penalty=1.3, ignore_eos=True,
                                                              **GREEDY), delta=True)
    engine.add_request("plain", [4, 5, 6], SamplingParams(max_tokens=4, ignore_eos=True, **GREEDY))
    outputs = run_all(engine)
    assert [pending["penalised"] for pending in pending_at_launch] == [0, 0, 0, 0]
    assert sum(len(out.outputs[0].token_ids) for out in outputs["penalised"]) == 4


def test_requests_added_without_detokenizing_carry_token_ids_and_no_text(make_engine):
    engine = make_engine()
    engine.add_requests([("ids", "Hello", SamplingParams(max_tokens=3, ignore_eos=True, **GREEDY))], detokenize=False)
    final = run_all(engine)["ids"][-1].outputs[0]
    assert len(final.token_ids) == 3 and final.text == ""


def test_a_repeated_id_in_one_call_is_refused_in_a_sentence(make_engine):
    engine = make_engine()
    request = ("twice", [1, 2], None)
    sentence = "request ids must be unique; the same id appears twice in one call"
    with pytest.raises(ValueError, match=f"^{re.escape(sentence)}$"):   # the whole message
        engine.add_requests([request, request])


class LostSamples:
    def result(self):
        raise RuntimeError("the device went away")


def test_a_step_whose_tokens_never_arrive_ends_its_requests_with_the_error(make_engine, monkeypatch, caplog):
    engine = make_engine()
    engine.add_request("doomed", [1, 2, 3], SamplingParams(max_tokens=3, **GREEDY))
    real_launch = engine.runner.launch
    monkeypatch.setattr(engine.runner, "launch", lambda batch: (real_launch(batch), LostSamples())[1])
    [failed] = engine.step()
    assert failed.finished and failed.outputs[0].finish_reason == "error"
    assert failed.error == "RuntimeError: the device went away" and not failed.error_in_request
    assert engine.get_stats().kv_usage.used_blocks == 0 and not engine.has_unfinished_requests()
    assert "a step failed; its requests end with finish_reason 'error'" in caplog.messages
