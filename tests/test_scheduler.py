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


def test_a_finished_waiting_sibling_is_never_released_and_no_longer_held():
    scheduler = make_scheduler()
    leader, sibling = make_request(scheduler, list(range(1, 10)), n=2, max_tokens=3)
    assert scheduler.num_held() == 1
    scheduler.finish(sibling, SequenceStatus.FINISHED_ABORTED)
    assert scheduler.num_held() == 0 and scheduler.leaders == {}
    step(scheduler)                                       # the leader computes its prompt
    assert sibling not in scheduler.waiting and sibling not in scheduler.running
    while scheduler.has_unfinished():
        step(scheduler)
    assert sibling.num_output_tokens == 0 and leader.num_output_tokens == 3


def test_decodes_and_prompt_chunks_are_counted_apart_even_a_one_token_chunk():
    scheduler = make_scheduler(max_num_batched_tokens=5)
    [a] = make_request(scheduler, [1, 2], request_id="a", max_tokens=5)
    [b] = make_request(scheduler, [3, 4], request_id="b", max_tokens=5)
    step(scheduler)                                       # a and b: their prompts, 4 tokens
    [c] = make_request(scheduler, [5, 6, 7, 8, 9], request_id="c", max_tokens=5)
    batch = step(scheduler)                               # a, b decode; c gets the 3 tokens left
    assert chunks(batch) == [(a.seq_id, 1), (b.seq_id, 1), (c.seq_id, 3)]
    assert batch.is_prefill == [False, False, True]
    assert (batch.num_decode_tokens, batch.num_prefill_tokens) == (2, 3)
    [d] = make_request(scheduler, [1, 9, 9, 9], request_id="d", max_tokens=5)
    batch = step(scheduler)                               # a, b, c decode... c: its last 2 prompt tokens
    assert chunks(batch) == [(a.seq_id, 1), (b.seq_id, 1), (c.seq_id, 2), (d.seq_id, 1)]
    assert batch.is_prefill == [False, False, True, True], "a one-token prompt chunk is no decode"
    assert (batch.num_decode_tokens, batch.num_prefill_tokens) == (2, 3)


def test_a_spent_budget_schedules_no_empty_chunk():
    scheduler = make_scheduler(max_num_batched_tokens=3)
    seqs = [make_request(scheduler, [1], request_id=str(i), max_tokens=9)[0] for i in range(3)]
    batch = step(scheduler)
    assert chunks(batch) == [(seq.seq_id, 1) for seq in seqs]
    scheduler.max_num_batched_tokens = 2                  # three running sequences, a budget of two
    batch = step(scheduler)
    assert chunks(batch) == [(seqs[0].seq_id, 1), (seqs[1].seq_id, 1)]


def test_the_newest_of_three_running_sequences_is_the_one_preempted():
    scheduler = make_scheduler(num_blocks=3, max_model_len=16)
    seqs = [make_request(scheduler, [1, 2, 3], arrival=i, request_id=str(i), max_tokens=8, ignore_eos=True)[0]
            for i in range(3)]
    step(scheduler)                                       # one block each: the pool is full
    batch = step(scheduler)                               # the 4th tokens fit; the 5th need new blocks
    batch = step(scheduler)
    assert batch.preempted == [seqs[2], seqs[1]] and scheduler.num_preemptions == 2
    assert seqs[0].status is SequenceStatus.RUNNING


def test_requests_that_just_fit_the_pool_or_max_model_len_are_accepted():
    scheduler = make_scheduler(num_blocks=4, max_model_len=32)   # 16 slots
    make_request(scheduler, list(range(1, 11)), max_tokens=7)    # 16 tokens computed, the 17th only sampled
    with pytest.raises(ValueError) as refused:
        make_request(scheduler, list(range(1, 11)), max_tokens=8)
    assert str(refused.value) == ("the request needs 5 KV blocks (17 tokens) but the pool has 4; lower "
                                  "max_tokens, shorten the prompt or give the engine more KV cache memory")
    at_the_limit = make_scheduler(num_blocks=4, max_model_len=16)
    [seq] = make_request(at_the_limit, list(range(1, 17)), max_tokens=10)   # one token, computed in 16 slots
    step(at_the_limit)
    assert seq.finish_reason == "length" and seq.num_output_tokens == 1
    with pytest.raises(ValueError, match="needs 5 KV blocks"):
        make_request(make_scheduler(num_blocks=4, max_model_len=17), list(range(1, 18)), max_tokens=10)


def test_samples_without_prefix_caching_share_every_full_block_of_the_prompt():
    scheduler = make_scheduler(caching=False)
    seqs = make_request(scheduler, list(range(1, 10)), n=2, max_tokens=4)   # 9 tokens: 2 full blocks
    step(scheduler)
    batch = step(scheduler)
    assert chunks(batch)[1:] == [(seqs[1].seq_id, 1)]
    assert seqs[1].block_table[:2] == seqs[0].block_table[:2]


def test_a_running_prompts_full_blocks_are_cached_for_the_next_request():
    scheduler = make_scheduler()
    [first] = make_request(scheduler, list(range(1, 10)), request_id="first", max_tokens=5)
    step(scheduler)
    assert first.num_cached_tokens == 0 and first.status is SequenceStatus.RUNNING
    [second] = make_request(scheduler, list(range(1, 10)), request_id="second", max_tokens=5)
    step(scheduler)
    assert second.num_cached_tokens == 8 and second.num_computed_tokens == 9


def test_tokens_arrive_into_placeholders_and_a_finished_sequence_drops_the_pending_ones():
    scheduler = make_scheduler()
    [seq] = make_request(scheduler, [1, 2, 3], max_tokens=5, ignore_eos=True)
    [other] = make_request(scheduler, [4], request_id="other", max_tokens=5, ignore_eos=True)
    first = scheduler.schedule()
    scheduler.advance(first)                              # launched; its tokens are on their way
    assert seq.token_ids == [1, 2, 3, -1] and seq.num_pending == 1 and seq.num_known_tokens == 3
    assert (seq.pending_row, other.pending_row) == (0, 1) and first.output_indices == [0, 0]
    second = scheduler.schedule()                         # scheduled before the first step's tokens arrive
    scheduler.advance(second)
    assert seq.output_token_ids == [-1, -1] and seq.num_pending == 2 and seq.known_output_token_ids == []
    scheduler.complete(first, SamplerOutput([7, 8], [-0.5, -1.0], None))
    assert seq.token_ids == [1, 2, 3, 7, -1] and seq.num_pending == 1
    scheduler.finish(seq, SequenceStatus.FINISHED_ABORTED)
    assert seq.token_ids == [1, 2, 3, 7] and seq.output_token_ids == [7] and seq.num_pending == 0
    assert scheduler.complete(second, SamplerOutput([9, 9], [-1.0, -1.0], None)) == []
    assert other.output_token_ids == [8, 9]


def test_a_sequence_whose_pending_token_is_its_last_is_not_scheduled_again():
    scheduler = make_scheduler()
    [long] = make_request(scheduler, [3], arrival=0, request_id="long", max_tokens=5)
    [short] = make_request(scheduler, [1, 2], arrival=1, request_id="short", max_tokens=1)
    [later] = make_request(scheduler, [4], arrival=2, request_id="later", max_tokens=5)
    scheduler.advance(scheduler.schedule())
    batch = scheduler.schedule()
    assert [seq for seq, _ in batch.scheduled] == [long, later]


def test_log_probabilities_add_up_and_each_entry_holds_the_top_ones_and_the_sampled_token():
    scheduler = make_scheduler()
    [seq] = make_request(scheduler, [1, 2], max_tokens=2, logprobs=1, ignore_eos=True)
    for token, logprob, top in [(7, -0.5, {3: -0.25}), (8, -1.5, None)]:
        batch = scheduler.schedule()
        finished = scheduler.postprocess(batch, SamplerOutput([token], [logprob], [top]))
    assert seq.logprobs == [{3: -0.25, 7: -0.5}, {8: -1.5}] and seq.cumulative_logprob == -2.0
    assert finished == [seq]


def test_a_sequence_records_when_it_was_scheduled_sampled_and_finished(monkeypatch):
    clock = iter(range(100, 200))
    monkeypatch.setattr("nanovllm.engine.scheduler.time.time", lambda: float(next(clock)))
    scheduler = make_scheduler(num_blocks=2, max_model_len=8)
    [seq] = make_request(scheduler, [1, 2, 3], max_tokens=3, ignore_eos=True)
    for _ in range(3):
        step(scheduler)                                   # schedule() then complete() read the clock
    assert seq.first_scheduled_time == 100.0 and seq.first_token_time == 101.0
    assert seq.token_times == [101.0, 103.0, 105.0] and seq.finish_time == 105.0
    [aborted] = make_request(scheduler, [1], max_tokens=3)
    scheduler.finish(aborted, SequenceStatus.FINISHED_ABORTED)   # no time given: finish() reads the clock
    assert aborted.finish_time == 106.0


def test_the_first_admission_alone_sets_the_scheduled_time_and_cached_tokens():
    scheduler = make_scheduler(num_blocks=4, max_model_len=16)
    [old] = make_request(scheduler, [1, 2, 3, 4, 5, 6, 7], arrival=0, request_id="old", max_tokens=8, ignore_eos=True)
    [new] = make_request(scheduler, [1, 2, 3, 4, 5], arrival=1, request_id="new", max_tokens=8, ignore_eos=True)
    step(scheduler)
    scheduled_at = new.first_scheduled_time
    assert new.num_cached_tokens == 0
    while new.status is not SequenceStatus.PREEMPTED:
        step(scheduler)
    while old.status is SequenceStatus.RUNNING:
        step(scheduler)
    step(scheduler)                                       # new again, finding old's blocks in the cache
    assert new.first_scheduled_time == scheduled_at and new.num_cached_tokens == 0


def test_finishing_decodes_the_whole_text_at_once_when_asked():
    class WholeText(CharDetokenizer):
        def whole_text(self, token_ids: list[int]) -> str:
            return "".join(chr(ord("a") + t) for t in token_ids)

    scheduler = make_scheduler()
    [seq] = make_request(scheduler, [1], detokenizer=WholeText, max_tokens=3, ignore_eos=True)
    seq.detokenize_at_finish = True
    for token in [1, 2, 3]:
        step(scheduler, token)
    assert seq.output_text == "bcd"


@pytest.mark.parametrize("stop, tokens, text, reason", [
    (["b"], [1, 5], "", "b"),                             # a stop string at the very start of the output
    (["x"], [23, 6, 7], "xgh", None),                     # seen before min_tokens: only a new one stops
    (["xy"], [23, 24, 6], "xyg", None),
])
def test_a_stop_string_counts_only_where_it_ends_in_the_new_text(stop, tokens, text, reason):
    scheduler = make_scheduler()
    min_tokens = 1 if reason == "b" else 3
    [seq] = make_request(scheduler, [1], detokenizer=CharDetokenizer, max_tokens=3, stop=stop,
                         min_tokens=min_tokens, ignore_eos=True)
    for token in tokens:
        step(scheduler, token)
        if seq.is_finished:
            break
    assert (seq.output_text, seq.stop_reason) == (text, reason)


@pytest.mark.parametrize("stop, text, reason", [
    (["x"], "ax", "x"),                                   # twice in the new text: the first
    (["xb", "x"], "axb", "xb"),                           # two at one position: the first listed
])
def test_stop_strings_in_one_tokens_text_cut_at_the_earliest_match(stop, text, reason):
    class Words(CharDetokenizer):
        def add_tokens(self, token_ids: list[int]) -> str:
            return "axbxc"

    scheduler = make_scheduler()
    [seq] = make_request(scheduler, [1], detokenizer=Words, max_tokens=3, stop=stop, include_stop_str_in_output=True)
    step(scheduler)
    assert seq.output_text == text and seq.stop_reason == reason


def test_placeholders_are_filled_in_order_after_the_prompt_and_dropped_from_the_end():
    seq = Sequence(seq_id=0, request_id="r", index=0, prompt_token_ids=[1, 2, 3], sampling_params=SamplingParams(),
                   seed=0, max_tokens=8, arrival_time=0.0)
    first, second = seq.add_placeholder(0), seq.add_placeholder(0)
    seq.fill_token(first, 7, -1.0, None, 0.0)
    seq.fill_token(second, 8, -1.0, None, 0.0)
    assert seq.token_ids == [1, 2, 3, 7, 8] and seq.output_token_ids == [7, 8]
    seq.add_placeholder(0)
    seq.drop_placeholders()
    assert seq.token_ids == [1, 2, 3, 7, 8] and seq.output_token_ids == [7, 8] and seq.num_pending == 0


def test_a_sequence_sets_up_its_log_probability_records_from_its_parameters():
    def make(index: int = 0, **params) -> Sequence:
        sampling = SamplingParams(**params)
        return Sequence(seq_id=0, request_id="r", index=index, prompt_token_ids=[1, 2], sampling_params=sampling,
                        seed=0, max_tokens=sampling.max_tokens, arrival_time=0.0)

    assert make().logprobs is None and make(logprobs=0).logprobs == []
    assert make(prompt_logprobs=1).prompt_logprobs == [None]
    assert make(index=1, prompt_logprobs=1).prompt_logprobs is None and make().prompt_logprobs is None
    assert make(presence_penalty=0.5).reads_own_tokens is True and make().reads_own_tokens is False


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
