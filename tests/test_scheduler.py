"""Scheduler: one token budget, chunked prefill, FCFS admission, preemption, stop rules, n > 1 sharing.

No model here: a fake runner answers each step with tokens, so every schedule can be checked exactly.
"""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.scheduler import Batch, Scheduler
from nanovllm.engine.sequence import Sequence, SequenceStatus
from nanovllm.runner.sampler import SamplerOutput
from nanovllm.sampling_params import SamplingParams

EOS = 0
BLOCK_SIZE = 4


def make_scheduler(num_blocks: int = 64, max_num_seqs: int = 8, max_num_batched_tokens: int = 32,
                   max_model_len: int = 64, caching: bool = True, policy: str = "paged") -> Scheduler:
    manager = BlockManager(num_blocks, BLOCK_SIZE, caching, policy, max_model_len)
    return Scheduler(manager, max_num_seqs, max_num_batched_tokens, max_model_len, eos_token_ids=[EOS])


_next_seq_id = iter(range(10**9))


def make_request(scheduler: Scheduler, prompt: list[int], arrival: float = 0.0, request_id: str = "r",
                 detokenizer=None, **params) -> list[Sequence]:
    sampling = SamplingParams(**params)
    seqs = []
    for index in range(sampling.n):
        seqs.append(Sequence(seq_id=next(_next_seq_id), request_id=request_id, index=index,
                             prompt_token_ids=list(prompt), sampling_params=sampling, seed=index,
                             max_tokens=sampling.max_tokens, arrival_time=arrival,
                             detokenizer=detokenizer() if detokenizer else None))
    scheduler.check_fits(seqs[0])
    scheduler.add_sequences(seqs)
    return seqs


def answer(batch: Batch, tokens: list[int] | int) -> SamplerOutput:
    """The fake runner: the given token(s) for every sequence that is due one."""
    n = len(batch.sampling_seqs)
    token_ids = [tokens] * n if isinstance(tokens, int) else list(tokens)
    return SamplerOutput(token_ids=token_ids, logprobs=[-1.0] * n, top_logprobs=None)


def step(scheduler: Scheduler, token: int = 5) -> Batch:
    batch = scheduler.schedule()
    scheduler.postprocess(batch, answer(batch, token))
    return batch


def chunks(batch: Batch) -> list[tuple[int, int]]:
    return [(seq.seq_id, num_new) for seq, num_new in batch.scheduled]


def test_a_long_prompt_is_prefilled_in_chunks_that_fit_the_budget():
    scheduler = make_scheduler(max_num_batched_tokens=16)
    [seq] = make_request(scheduler, list(range(1, 41)), max_tokens=3)
    sizes = []
    for _ in range(3):
        batch = step(scheduler)
        sizes.append(batch.scheduled[0][1])
        assert batch.sampling_seqs == ([seq] if sum(sizes) == 40 else [])
    assert sizes == [16, 16, 8]
    assert seq.output_token_ids == [5]
    assert seq.num_computed_tokens == 40


def test_decodes_go_first_and_prompts_share_the_rest_of_the_budget():
    scheduler = make_scheduler(max_num_batched_tokens=10)
    [a] = make_request(scheduler, [1, 2, 3], arrival=0, request_id="a", max_tokens=10)
    step(scheduler)                                       # a: prefill, first token
    [b] = make_request(scheduler, list(range(1, 13)), arrival=1, request_id="b", max_tokens=10)
    [c] = make_request(scheduler, [7, 7], arrival=2, request_id="c", max_tokens=10)
    batch = step(scheduler)
    assert chunks(batch) == [(a.seq_id, 1), (b.seq_id, 9)]
    assert (batch.num_decode_tokens, batch.num_prefill_tokens) == (1, 9)
    batch = step(scheduler)
    # a decodes, b finishes its prompt (3 left), c's whole prompt fits in what remains.
    assert chunks(batch) == [(a.seq_id, 1), (b.seq_id, 3), (c.seq_id, 2)]
    assert batch.sampling_seqs == [a, b, c]


def test_waiting_requests_are_admitted_first_come_first_served_up_to_max_num_seqs():
    scheduler = make_scheduler(max_num_seqs=2)
    seqs = [make_request(scheduler, [1, 2], arrival=i, request_id=str(i), max_tokens=5)[0] for i in range(3)]
    batch = step(scheduler)
    assert [seq for seq, _ in batch.scheduled] == seqs[:2]
    assert seqs[2].status is SequenceStatus.WAITING


def test_the_newest_running_sequence_is_preempted_and_recomputes_later():
    # 4 blocks of 4 slots: prompts of 7 and 5 tokens take 2 blocks each, then the pool is full.
    scheduler = make_scheduler(num_blocks=4, max_model_len=16)
    [old] = make_request(scheduler, [1, 2, 3, 4, 5, 6, 7], arrival=0, request_id="old", max_tokens=8, ignore_eos=True)
    [new] = make_request(scheduler, [9, 9, 9, 9, 9], arrival=1, request_id="new", max_tokens=8, ignore_eos=True)
    step(scheduler)                                       # old: 2 blocks, new: 2 blocks; pool full
    assert old.num_computed_tokens == 7 and new.num_computed_tokens == 5
    step(scheduler)                                       # old's 8th and new's 6th token fit their blocks
    batch = step(scheduler)                               # old's 9th needs a 3rd block: new must go
    assert batch.preempted == [new]
    assert new.status is SequenceStatus.PREEMPTED and new.block_table == [] and new.num_computed_tokens == 0
    assert scheduler.waiting[0] is new and scheduler.num_preemptions == 1
    assert new.output_token_ids == [5, 5], "a preempted sequence keeps its tokens"
    while not old.is_finished:
        step(scheduler)
    batch = step(scheduler)
    # new recomputes prompt + outputs (7 tokens) in one chunk, then samples its next token.
    assert chunks(batch) == [(new.seq_id, 7)] and batch.sampling_seqs == [new]


def test_a_sequence_alone_in_a_full_pool_is_never_starved():
    scheduler = make_scheduler(num_blocks=3, max_model_len=12)
    [seq] = make_request(scheduler, [1, 2, 3], max_tokens=9, ignore_eos=True)
    while not seq.is_finished:
        step(scheduler)
    assert seq.num_output_tokens == 9 and scheduler.num_preemptions == 0


def test_requests_that_could_never_fit_are_refused_before_queueing():
    scheduler = make_scheduler(num_blocks=4, max_model_len=32)
    with pytest.raises(ValueError, match="max_model_len is 32"):
        make_request(scheduler, list(range(1, 34)))
    with pytest.raises(ValueError, match="KV blocks"):
        make_request(scheduler, list(range(1, 10)), max_tokens=20)
    assert not scheduler.has_unfinished()
    make_request(scheduler, list(range(1, 10)), max_tokens=8)


def test_eos_stops_unless_ignored_and_min_tokens_defers_it():
    scheduler = make_scheduler()
    [plain] = make_request(scheduler, [1, 2], request_id="plain", max_tokens=5)
    [ignoring] = make_request(scheduler, [1, 2], request_id="ignoring", max_tokens=3, ignore_eos=True)
    step(scheduler, EOS)
    assert plain.status is SequenceStatus.FINISHED_STOPPED and plain.finish_reason == "stop"
    assert plain.output_token_ids == [EOS] and plain.block_table == []
    while not ignoring.is_finished:
        step(scheduler, EOS)
    assert ignoring.finish_reason == "length" and ignoring.num_output_tokens == 3


def test_stop_token_ids_stop_and_are_reported_as_the_stop_reason():
    scheduler = make_scheduler()
    [seq] = make_request(scheduler, [1, 2], max_tokens=5, stop_token_ids=[42], min_tokens=2)
    step(scheduler, 42)
    assert not seq.is_finished, "min_tokens=2: the first token cannot stop"
    step(scheduler, 42)
    assert seq.finish_reason == "stop" and seq.stop_reason == 42


def test_max_model_len_ends_a_sequence_with_length():
    scheduler = make_scheduler(max_model_len=8)
    [seq] = make_request(scheduler, [1, 2, 3, 4, 5, 6], max_tokens=100)
    while not seq.is_finished:
        step(scheduler)
    assert seq.num_tokens == 8 and seq.finish_reason == "length"


class CharDetokenizer:
    """Token id -> one character ('a' + id)."""

    def add_tokens(self, token_ids: list[int]) -> str:
        return "".join(chr(ord("a") + t) for t in token_ids)


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_cut_the_text_exactly(include):
    scheduler = make_scheduler()
    [seq] = make_request(scheduler, [1], detokenizer=CharDetokenizer, max_tokens=20, stop=["xyz", "cd"],
                         include_stop_str_in_output=include)
    for token in [1, 1, 23, 24, 2, 3, 4]:                  # b b x y c d e
        step(scheduler, token)
        if seq.is_finished:
            break
    assert seq.finish_reason == "stop" and seq.stop_reason == "cd"
    assert seq.output_text == ("bbxycd" if include else "bbxy")


def test_samples_of_one_request_share_the_prompt_blocks():
    for caching in (True, False):
        scheduler = make_scheduler(caching=caching)
        seqs = make_request(scheduler, list(range(1, 11)), n=3, max_tokens=4, ignore_eos=True)
        batch = step(scheduler)
        assert [seq for seq, _ in batch.scheduled] == [seqs[0]], "siblings wait for the prompt"
        batch = step(scheduler)
        # Siblings recompute only the prompt's last, partial block (tokens 8..9).
        assert chunks(batch)[1:] == [(seqs[1].seq_id, 2), (seqs[2].seq_id, 2)]
        tables = [seq.block_table for seq in seqs]
        assert tables[0][:2] == tables[1][:2] == tables[2][:2]
        assert len({table[2] for table in tables}) == 3
        assert scheduler.block_manager.blocks[tables[0][0]].ref_count == 3
        while scheduler.has_unfinished():
            step(scheduler)
        assert scheduler.block_manager.num_free_blocks == 64


def test_finishing_a_request_in_any_state_frees_its_blocks():
    scheduler = make_scheduler(max_num_seqs=1)
    running = make_request(scheduler, list(range(1, 10)), request_id="running", n=2, max_tokens=5)
    [waiting] = make_request(scheduler, [1, 2], request_id="waiting", max_tokens=5)
    step(scheduler)
    for seq in running + [waiting]:
        scheduler.finish(seq, SequenceStatus.FINISHED_ABORTED)
    assert not scheduler.has_unfinished()
    assert scheduler.block_manager.num_free_blocks == 64
    assert all(seq.finish_reason == "abort" for seq in running + [waiting])


# ---- property test -----------------------------------------------------------------------

def check_scheduler_invariants(scheduler: Scheduler, batch: Batch, live: list[Sequence]) -> None:
    manager = scheduler.block_manager
    assert sum(num_new for _, num_new in batch.scheduled) <= scheduler.max_num_batched_tokens
    assert len(scheduler.running) <= scheduler.max_num_seqs
    owners: dict[int, int] = {}
    for seq in live:
        if seq.status is SequenceStatus.RUNNING:
            assert len(seq.block_table) * BLOCK_SIZE >= seq.num_computed_tokens
        else:
            assert seq.block_table == [] and seq.num_computed_tokens == 0
        for block_id in seq.block_table:
            owners[block_id] = owners.get(block_id, 0) + 1
    for block in manager.blocks:
        assert block.ref_count >= 0
        assert block.ref_count == owners.get(block.block_id, 0), "reference count differs from the tables"
    for seq in live:
        for block_id in seq.block_table[seq.num_computed_tokens // BLOCK_SIZE:]:
            assert owners[block_id] == 1, "two live sequences own one writable slot"
    usage = manager.usage()
    assert usage.used_slots + usage.fragmentation_slots + usage.free_slots == usage.total_slots


request_strategy = st.tuples(
    st.integers(0, 30),                  # arrival step
    st.integers(1, 30),                  # prompt length
    st.integers(1, 12),                  # max_tokens
    st.integers(1, 3),                   # n
    st.sampled_from([None, 2, 5, 30]),   # abort at this step (None: never)
    st.integers(0, 3),                   # which shared prefix (0: none)
)


@settings(max_examples=60, deadline=None)
@given(requests=st.lists(request_strategy, min_size=1, max_size=12), num_blocks=st.integers(6, 24),
       budget=st.sampled_from([4, 16, 64]), max_num_seqs=st.integers(1, 6), caching=st.booleans(),
       naive=st.booleans(), seed=st.integers(0, 1000))
def test_random_workloads_finish_without_leaks_or_shared_writes(requests, num_blocks, budget, max_num_seqs,
                                                                 caching, naive, seed):
    max_model_len = 52
    if naive and -(-max_model_len // BLOCK_SIZE) > num_blocks:
        num_blocks = -(-max_model_len // BLOCK_SIZE)
    scheduler = make_scheduler(num_blocks, max_num_seqs, budget, max_model_len, caching,
                               "naive" if naive else "paged")
    rng = random.Random(seed)
    live: list[Sequence] = []
    by_request: dict[str, list[Sequence]] = {}
    pending = sorted(enumerate(requests), key=lambda item: item[1][0])
    for step_index in range(2000):
        while pending and pending[0][1][0] <= step_index:
            i, (_, prompt_len, max_tokens, n, _, prefix) = pending.pop(0)
            prompt = [100 + prefix] * (4 * prefix) + [rng.randrange(1, 90) for _ in range(prompt_len)]
            try:
                seqs = make_request(scheduler, prompt[:max_model_len], arrival=step_index, request_id=str(i),
                                    n=n, max_tokens=max_tokens)
            except ValueError:
                continue   # refused: would never fit this pool
            by_request[str(i)] = seqs
            live.extend(seqs)
        for i, (_, _, _, _, abort_at, _) in enumerate(requests):
            if abort_at == step_index and str(i) in by_request:
                for seq in by_request[str(i)]:
                    scheduler.finish(seq, SequenceStatus.FINISHED_ABORTED)
        batch = scheduler.schedule()
        tokens = [EOS if rng.random() < 0.05 else rng.randrange(1, 90) for _ in batch.sampling_seqs]
        scheduler.postprocess(batch, answer(batch, tokens))
        live = [seq for seq in live if not seq.is_finished]
        check_scheduler_invariants(scheduler, batch, live)
        if not pending and not scheduler.has_unfinished():
            break
    assert not scheduler.has_unfinished(), "every request finishes"
    assert all(seq.is_finished for seqs in by_request.values() for seq in seqs)
    manager = scheduler.block_manager
    assert manager.num_free_blocks == num_blocks and manager.owners == {}, "no block leaks"
