"""Async scheduling (engine.py) changes when the host learns a token, never which token it is.

Every request must end with the same tokens, text, finish reason and logprobs whether each step is
completed before the next is scheduled (sync) or one step later (async): greedy and seeded sampling,
chunked prefill, preemption, n > 1, stop tokens and strings (which run one step too many), min_tokens,
penalties (which complete the step before theirs first), aborts while a step is in flight. On the CPU
the two orders run the same code without the overlap, so this is where their equality is checked.
"""
from __future__ import annotations

import pytest
import torch

from conftest import engine_over
from nanovllm.engine.engine import LLMEngine
from nanovllm.engine.sequence import PENDING
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams

PROMPTS = ["Hello there", "a", "The quick brown fox jumps over the lazy dog. " * 2, "0123456789" * 4, "xyz"]


def run(engine: LLMEngine, requests: list[tuple[str, str, SamplingParams]]) -> dict[str, RequestOutput]:
    """Step until idle; the final output per request id (checking every streamed one on the way)."""
    engine.add_requests(requests)
    final: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            for completion in output.outputs:
                assert PENDING not in completion.token_ids, "a placeholder leaked into an output"
            if output.finished:
                final[output.request_id] = output
    assert engine.scheduler.block_manager.usage().used_blocks == 0
    return final


class Close(float):
    """A log-probability that equals another within 1e-4. The two schedulers batch the rows of a step
    differently, and torch's float32 matrix products are not batch-invariant, so the same token's
    log-probability moves by about 1e-6 (rounding both to 4 places made them differ wherever a value
    sat on a rounding boundary)."""
    def __eq__(self, other) -> bool:
        return abs(self - other) <= 1e-4

    __hash__ = float.__hash__


def summary(outputs: dict[str, RequestOutput]) -> dict:
    return {rid: [(c.token_ids, c.text, c.finish_reason, c.stop_reason, c.logprobs, Close(c.cumulative_logprob))
                  for c in out.outputs] for rid, out in outputs.items()}


def both(loaded, requests, **engine_args) -> tuple[dict, dict, LLMEngine]:
    engine_args.setdefault("max_model_len", 160)
    sync = run(engine_over(loaded, async_scheduling=False, **engine_args), requests)
    engine = engine_over(loaded, async_scheduling=True, **engine_args)
    return summary(sync), summary(run(engine, requests)), engine


def requests_for(params: list[SamplingParams]) -> list[tuple[str, str, SamplingParams]]:
    return [(f"r{i}", PROMPTS[i % len(PROMPTS)], p) for i, p in enumerate(params)]


@pytest.mark.parametrize("engine_args", [
    {},
    dict(max_num_batched_tokens=16),                     # prompts in chunks between others' decodes
    dict(num_kv_blocks=30, block_size=4, max_num_batched_tokens=32),   # preemption and recomputation
    dict(enable_prefix_caching=False),
])
def test_greedy_and_seeded_sampling_give_the_same_outputs_sync_and_async(tiny_llama_loaded, engine_args):
    params = [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=7, max_tokens=17, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0.7, top_k=20, top_p=0.9, seed=3, max_tokens=9, ignore_eos=True),
              SamplingParams(temperature=1.0, min_p=0.05, seed=11, max_tokens=25, ignore_eos=True, n=2),
              SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)]
    sync, async_, engine = both(tiny_llama_loaded, requests_for(params), **engine_args)
    assert async_ == sync
    if "num_kv_blocks" in engine_args:
        assert engine.get_stats().num_preemptions > 0   # the case did preempt


def test_stop_tokens_strings_and_min_tokens_end_requests_at_the_same_token(tiny_llama_loaded):
    probe = run(engine_over(tiny_llama_loaded, max_model_len=128, async_scheduling=False),
                requests_for([SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)] * 3))
    tokens = [out.outputs[0].token_ids for out in probe.values()]
    texts = [out.outputs[0].text for out in probe.values()]
    params = [SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[tokens[0][5]]),
              SamplingParams(temperature=0.0, max_tokens=24, stop=[texts[1][4:7]]),
              SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[tokens[2][2]], min_tokens=8),
              SamplingParams(temperature=0.8, seed=5, max_tokens=24)]   # EOS may end it
    sync, async_, _ = both(tiny_llama_loaded, requests_for(params))
    assert async_ == sync
    assert [sync[rid][0][2] for rid in ("r0", "r1")] == ["stop", "stop"]   # the cases did stop early
    assert len(sync["r2"][0][0]) >= 8


def test_penalties_see_every_earlier_token_under_async_scheduling(tiny_llama_loaded):
    params = [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, repetition_penalty=1.5),
              SamplingParams(temperature=0.8, seed=1, max_tokens=20, ignore_eos=True, frequency_penalty=0.7,
                             presence_penalty=0.3),
              SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)]
    sync, async_, _ = both(tiny_llama_loaded, requests_for(params))
    assert async_ == sync


def test_an_abort_while_a_step_is_in_flight_ends_with_known_tokens_only(tiny_llama_loaded):
    engine = engine_over(tiny_llama_loaded, max_model_len=128, async_scheduling=True)
    greedy = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    engine.add_requests([("stay", "Hello there", greedy), ("leave", "Hello there", greedy)])
    for _ in range(6):
        engine.step()
    assert engine.in_flight is not None
    [leaver] = engine.requests["leave"]
    assert leaver.num_pending == 1                       # its newest token is still on the device
    engine.abort_request("leave")
    assert leaver.num_pending == 0 and PENDING not in leaver.token_ids
    outputs = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            outputs.setdefault(output.request_id, []).append(output)
    [aborted] = outputs["leave"]
    assert aborted.outputs[0].finish_reason == "abort" and PENDING not in aborted.outputs[0].token_ids
    alone = run(engine_over(tiny_llama_loaded, max_model_len=128, async_scheduling=False),
                [("stay", "Hello there", greedy)])
    assert outputs["stay"][-1].outputs[0].token_ids == alone["stay"].outputs[0].token_ids
    assert engine.scheduler.block_manager.usage().used_blocks == 0


def test_streamed_outputs_under_async_scheduling_grow_by_one_known_token(tiny_llama_loaded):
    engine = engine_over(tiny_llama_loaded, max_model_len=128, async_scheduling=True)
    engine.add_request("a", "Hello there", SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    stream = []
    while engine.has_unfinished_requests():
        stream += engine.step()
    assert [len(out.outputs[0].token_ids) for out in stream] == [1, 2, 3, 4, 5, 6]
    assert [out.finished for out in stream] == [False] * 5 + [True]


def test_async_scheduling_is_off_on_the_cpu_unless_asked_for():
    from nanovllm.config import EngineConfig

    assert EngineConfig(device="cpu").async_scheduling is False
    assert EngineConfig(device="cpu", tensor_parallel_size=2).async_scheduling is False
    assert EngineConfig(device="cpu", tensor_parallel_size=2, async_scheduling=True).async_scheduling is True


def test_async_scheduling_is_on_by_default_with_one_gpu_only(monkeypatch):
    """None (the default) means: on with one CUDA GPU, off on the CPU and with tensor parallelism."""
    import argparse

    from nanovllm.config import EngineConfig
    from nanovllm.engine_args import add_engine_args, engine_config_from_args

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)   # the config only asks
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert EngineConfig(device="cuda").async_scheduling is True
    assert EngineConfig(device="cuda", tensor_parallel_size=2).async_scheduling is False
    assert EngineConfig(device="cuda", async_scheduling=False).async_scheduling is False
    assert EngineConfig(device="cpu").async_scheduling is False
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    for flags, expected in (([], True), (["--no-async-scheduling"], False), (["--async-scheduling"], True)):
        assert engine_config_from_args(parser.parse_args(flags), device="cuda").async_scheduling is expected
    assert engine_config_from_args(parser.parse_args(["--async-scheduling"]), device="cpu").async_scheduling


def test_decode_graph_host_inputs_match_the_eager_inputs_step_after_step(tiny_llama_loaded):
    """The CUDA-graph path writes its inputs into host buffers it reuses (block-table rows are only
    rewritten, and copied, when a row's table changed): across finishing, shifting and preempted
    sequences they must hold what the eager path computes for the same batch, and a device copy made
    only on the steps that report a changed table must too."""
    from nanovllm.runner.cuda_graph import HostInputs

    engine = engine_over(tiny_llama_loaded, max_model_len=160, async_scheduling=True, num_kv_blocks=40,
                         block_size=4, max_num_batched_tokens=48)
    runner = engine.runner
    host = HostInputs(rows=64, width=40, block_size=4, pin_memory=False)
    device_tables = host.block_tables.clone()   # what the graphs would read: copied only when changed
    launch, checked = runner.launch, []

    def checking_launch(batch):
        if batch.num_prefill_tokens == 0:
            num_seqs = len(batch.scheduled)
            pending, tables_changed, sampling_kind = host.fill(batch, size=num_seqs + 3, sampling=True)
            if tables_changed:
                device_tables[:num_seqs] = host.block_tables[:num_seqs]
            input_ids, positions, metadata, _ = runner.prepare_inputs(batch)
            rows = host.rows
            known = rows.pending_rows[:num_seqs] < 0
            assert (pending == "none") == bool(known.all())
            assert torch.equal(rows.input_ids[:num_seqs][known], input_ids[known])
            assert torch.equal(rows.positions[:num_seqs], positions)
            assert torch.equal(rows.slot_mapping[:num_seqs], metadata.slot_mapping)
            assert torch.equal(rows.seq_lens[:num_seqs], metadata.seq_lens)
            assert torch.equal(rows.slot_mapping[num_seqs:num_seqs + 3], torch.tensor([-1] * 3))   # padding
            assert torch.equal(rows.pending_rows[num_seqs:num_seqs + 3], torch.tensor([-1] * 3))
            assert not rows.seq_lens[num_seqs:num_seqs + 3].any()
            for row, (seq, _) in enumerate(batch.scheduled):
                assert host.block_tables[row, :len(seq.block_table)].tolist() == seq.block_table
                assert device_tables[row, :len(seq.block_table)].tolist() == seq.block_table
            # The sampling settings the graph's own sampling pass reads: the eager sampler's.
            sampling = runner.prepare_sampling(batch, with_grammar=False)
            seqs = [seq for seq, _ in batch.scheduled]
            greedy = torch.tensor([seq.sampling_params.is_greedy for seq in seqs])
            assert torch.equal(rows.temperature[:num_seqs] == 0, greedy)
            if sampling.stream_keys is not None:
                assert torch.equal(rows.keys[:num_seqs][~greedy], sampling.stream_keys[~greedy])
                assert torch.equal(rows.temperature[:num_seqs][~greedy], sampling.temperature[~greedy])
            past_min_tokens = [seq.num_output_tokens >= seq.sampling_params.min_tokens for seq in seqs]
            if all(seq.sampling_params.is_plain and past for seq, past in zip(seqs, past_min_tokens)):
                assert sampling_kind == "graph"
            elif all(seq.sampling_params.is_plain_or_masked and past for seq, past in zip(seqs, past_min_tokens)):
                assert sampling_kind == "masked" and any(seq.grammar is not None for seq in seqs)
            else:
                assert sampling_kind == "sampler"
            checked.append((pending, tables_changed, sampling_kind))
        return launch(batch)

    runner.launch = checking_launch
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=6 + 7 * i, ignore_eos=True) for i in range(6)]
    params[1] = SamplingParams(temperature=0.0, max_tokens=13, ignore_eos=True)                # greedy
    params[3] = SamplingParams(temperature=0.5, top_k=5, seed=3, max_tokens=27, ignore_eos=True)   # not plain
    params[4] = SamplingParams(temperature=0.9, seed=4, min_tokens=20, max_tokens=34, ignore_eos=True)
    params.append(SamplingParams(temperature=0.8, seed=6, max_tokens=37, ignore_eos=True,   # a grammar row
                                 structured_outputs={"regex": "[a-z]+"}))
    run(engine, requests_for(params))
    assert engine.get_stats().num_preemptions > 0
    assert {"all in order", "some"} <= {pending for pending, _, _ in checked}
    assert {True, False} == {changed for _, changed, _ in checked}   # most steps copy no table
    assert {"graph", "masked", "sampler"} == {sampling_kind for _, _, sampling_kind in checked}


def test_a_decode_graph_writes_its_host_inputs_before_the_deferred_sampling_and_copies_them_after(
        tiny_llama_loaded, monkeypatch):
    """With grammar rows, a step's sampling waits for its masks until the next launch queues it, before
    anything of that launch reaches the device (its inputs are the sampled tokens). A decode graph's
    host inputs are written first, while the masks may still be filling; its copies and replay come
    after. A stand-in for DecodeGraphs (the CPU has no CUDA graphs) records the order and runs the
    eager forward, whose inputs read the last step's samples: the tokens are the eager engine's."""
    pytest.importorskip("xgrammar")
    from nanovllm.runner.cuda_graph import DecodeStep
    from nanovllm.runner.sampler import DeferredSamples

    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=12, ignore_eos=True,
                             structured_outputs={"regex": "[a-z ]+"} if i % 2 else None) for i in range(4)]
    want = summary(run(engine_over(tiny_llama_loaded, async_scheduling=True, max_model_len=160),
                       requests_for(params)))
    engine = engine_over(tiny_llama_loaded, async_scheduling=True, max_model_len=160)
    runner, events = engine.runner, []

    class RecordingGraphs:
        def can_run(self, batch) -> bool:
            return batch.num_prefill_tokens == 0

        def prepare(self, batch) -> DecodeStep:
            events.append("prepare")
            self.batch = batch
            return DecodeStep(len(batch.scheduled), len(batch.scheduled), "some", False, "sampler")

        def run(self, step: DecodeStep) -> torch.Tensor:
            events.append("run")
            input_ids, positions, metadata, logits_indices = runner.prepare_inputs(self.batch)
            hidden = runner.model(input_ids, positions, metadata, runner.kv_caches)
            return runner.model.compute_logits(hidden[logits_indices])

    finish = DeferredSamples.finish

    def recording_finish(self):
        if self._queue_sampling is not None:
            events.append("finish")
        return finish(self)
    monkeypatch.setattr(DeferredSamples, "finish", recording_finish)
    runner.decode_graphs = RecordingGraphs()
    assert summary(run(engine, requests_for(params))) == want
    assert events.count("run") >= 10 and " ".join(events).count("prepare finish run") == events.count("run")


@pytest.mark.parametrize("rows", [1, 7, 256])
def test_step_rows_pack_every_input_into_one_tensor_without_overlap(rows):
    """One copy moves a decode step's per-row inputs: each is a view of StepRows.flat, none overlaps
    another, and padding defaults (slot -1, no pending token) hold from the start."""
    from nanovllm.runner.cuda_graph import StepRows
    step = StepRows(rows, "cpu")
    views = [step.input_ids, step.positions, step.slot_mapping, step.pending_rows, step.keys, step.seq_lens,
             step.temperature]
    assert all(view.shape == (rows,) and view.untyped_storage().data_ptr() == step.flat.untyped_storage().data_ptr()
               for view in views)
    assert step.seq_lens.dtype == torch.int32 and step.temperature.dtype == torch.float32
    assert step.slot_mapping.dtype == torch.int64 and step.keys.dtype == torch.int64
    assert (step.slot_mapping == -1).all() and (step.pending_rows == -1).all() and not step.seq_lens.any()
    for value, view in enumerate(views, start=1):
        view.fill_(value)
    assert [view.unique().tolist() for view in views] == [[1], [2], [3], [4], [5], [6], [7]]
    assert step.flat.numel() * 8 == sum(view.numel() * view.element_size() for view in views)
