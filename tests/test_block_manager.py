"""BlockManager: paging, reference counts, the prefix cache's hash chain and LRU eviction, naive reservations."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanovllm.engine import block_manager as bm_module
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams

BLOCK_SIZE = 4


def make_seq(seq_id: int, token_ids: list[int]) -> Sequence:
    return Sequence(seq_id=seq_id, request_id=str(seq_id), index=0, prompt_token_ids=list(token_ids),
                    sampling_params=SamplingParams(), seed=0, max_tokens=16, arrival_time=float(seq_id))


def compute(manager: BlockManager, seq: Sequence, num_tokens: int) -> None:
    """What the scheduler and runner do for a chunk: allocate, compute, hash full blocks."""
    assert manager.allocate_slots(seq, num_tokens)
    seq.num_computed_tokens = num_tokens
    manager.cache_full_blocks(seq)


def admit(manager: BlockManager, seq: Sequence) -> int:
    """Admit seq with its cached prefix and compute the rest; returns the number of cached tokens."""
    shared = manager.find_cached_prefix(seq)
    assert manager.allocate_slots(seq, seq.num_tokens, shared)
    seq.num_computed_tokens = seq.num_tokens
    manager.cache_full_blocks(seq)
    return len(shared) * BLOCK_SIZE


def check_invariants(manager: BlockManager, live: list[Sequence]) -> None:
    """Reference counts match the block tables; free blocks are unowned; no writable block is shared."""
    owners: dict[int, int] = {}
    for seq in live:
        for block_id in seq.block_table:
            owners[block_id] = owners.get(block_id, 0) + 1
    free = set(manager.free_block_ids) | set(manager.cached_free_block_ids)
    assert len(free) == manager.num_free_blocks, "a block is listed free twice"
    for block in manager.blocks:
        assert block.ref_count >= 0
        assert block.ref_count == owners.get(block.block_id, 0)
        assert (block.ref_count == 0) == (block.block_id in free)
        if block.block_id in manager.cached_free_block_ids:
            assert manager.cached_block_map[block.block_hash] == block.block_id
    for seq in live:
        # Blocks this sequence will still write into (from its first uncomputed token on) are its own.
        for block_id in seq.block_table[seq.num_computed_tokens // BLOCK_SIZE:]:
            assert owners[block_id] == 1, f"seq {seq.seq_id} writes into shared block {block_id}"
    usage = manager.usage()
    assert usage.used_slots + usage.fragmentation_slots + usage.free_slots == usage.total_slots


def test_blocks_are_handed_out_as_the_sequence_grows():
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    seq = make_seq(0, list(range(5)))
    compute(manager, seq, 5)
    assert len(seq.block_table) == 2
    compute(manager, seq, 8)
    assert len(seq.block_table) == 2, "the last block had room for tokens 5..7"
    compute(manager, seq, 9)
    assert len(seq.block_table) == 3
    assert manager.num_free_blocks == 5
    manager.free(seq)
    assert manager.num_free_blocks == 8 and seq.block_table == []


def test_allocation_fails_without_change_when_the_pool_is_short():
    manager = BlockManager(num_blocks=2, block_size=BLOCK_SIZE)
    seq = make_seq(0, list(range(12)))
    assert not manager.allocate_slots(seq, 12)
    assert seq.block_table == [] and manager.num_free_blocks == 2


def test_identical_prefixes_share_full_blocks_with_reference_counts():
    manager = BlockManager(num_blocks=16, block_size=BLOCK_SIZE)
    system = list(range(100, 108))                      # two full blocks
    first, second = make_seq(0, system + [1, 2, 3]), make_seq(1, system + [7])
    assert admit(manager, first) == 0
    assert admit(manager, second) == 8
    assert first.block_table[:2] == second.block_table[:2]
    assert first.block_table[2] != second.block_table[2]
    assert [manager.blocks[b].ref_count for b in first.block_table] == [2, 2, 1]
    check_invariants(manager, [first, second])
    usage = manager.usage()
    assert usage.prefix_cache_hits == 0, "hits are counted only through record_prefix_lookup"


def test_prefix_lookup_leaves_the_last_token_to_compute():
    manager = BlockManager(num_blocks=16, block_size=BLOCK_SIZE)
    tokens = list(range(8))                             # exactly two full blocks
    admit(manager, make_seq(0, tokens))
    again = make_seq(1, tokens)
    assert len(manager.find_cached_prefix(again)) == 1, "the second block holds the last token: recompute it"


def test_freed_cached_blocks_are_found_again_until_evicted_least_recent_first():
    manager = BlockManager(num_blocks=4, block_size=BLOCK_SIZE)
    old, new = make_seq(0, list(range(0, 5))), make_seq(1, list(range(10, 15)))
    admit(manager, old)
    manager.free(old)
    admit(manager, new)
    manager.free(new)
    assert manager.usage().cached_free_blocks == 2
    # Needing three blocks takes the two never-hashed ones, then evicts the oldest cached one.
    filler = make_seq(2, list(range(50, 61)))
    assert manager.allocate_slots(filler, 11)
    assert manager.find_cached_prefix(make_seq(3, list(range(0, 5)))) == []
    assert len(manager.find_cached_prefix(make_seq(4, list(range(10, 15))))) == 1
    manager.free(filler)
    check_invariants(manager, [])


def test_hash_collisions_are_caught_by_comparing_token_ids(monkeypatch):
    monkeypatch.setattr(bm_module, "hash_block_tokens", lambda parent, token_ids: b"same")
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    admit(manager, make_seq(0, [1, 2, 3, 4, 5]))
    assert manager.find_cached_prefix(make_seq(1, [9, 9, 9, 9, 5])) == []
    assert len(manager.find_cached_prefix(make_seq(2, [1, 2, 3, 4, 5]))) == 1


def test_different_prefixes_with_an_identical_block_do_not_share_it():
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    admit(manager, make_seq(0, [1, 1, 1, 1, 7, 7, 7, 7, 0]))
    assert manager.find_cached_prefix(make_seq(1, [2, 2, 2, 2, 7, 7, 7, 7, 0])) == []


def test_prefix_caching_off_shares_nothing():
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    admit(manager, make_seq(0, list(range(9))))
    assert manager.find_cached_prefix(make_seq(1, list(range(9)))) == []
    assert manager.cached_block_map == {}


def test_naive_policy_reserves_max_model_len_and_reports_it_as_fragmentation():
    manager = BlockManager(num_blocks=10, block_size=BLOCK_SIZE, policy="naive", max_model_len=16)
    seq = make_seq(0, [1, 2, 3])
    compute(manager, seq, 3)
    assert len(seq.block_table) == 4
    usage = manager.usage()
    assert (usage.used_slots, usage.fragmentation_slots, usage.free_slots) == (3, 13, 24)
    paged = BlockManager(num_blocks=10, block_size=BLOCK_SIZE)
    compute(paged, make_seq(1, [1, 2, 3]), 3)
    assert paged.usage().fragmentation_slots == 1


def test_naive_policy_needs_max_model_len():
    message = "^the naive policy reserves max_model_len slots per sequence: pass max_model_len$"
    with pytest.raises(ValueError, match=message):
        BlockManager(num_blocks=4, block_size=BLOCK_SIZE, policy="naive")


def test_usage_counts_a_shared_block_once():
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    a, b = make_seq(0, list(range(6))), make_seq(1, list(range(6)))
    admit(manager, a)
    admit(manager, b)
    usage = manager.usage()
    # One shared full block (4) + two private last blocks holding 2 tokens each.
    assert usage.used_slots == 8 and usage.fragmentation_slots == 4
    assert usage.used_blocks == 3
    assert manager.block_tables() == {0: a.block_table, 1: b.block_table}


def test_shared_cached_blocks_count_against_the_free_pool_when_revived():
    """Blocks found in the prefix cache that no sequence holds are free blocks about to be taken
    back: a request fits only if its new blocks fit in what remains beside them."""
    manager = BlockManager(num_blocks=4, block_size=BLOCK_SIZE)
    prefix = list(range(8))                               # two full blocks, cached when freed
    first = make_seq(0, prefix + [99])
    admit(manager, first)
    manager.free(first)                                   # 2 cached free + 2 free blocks
    too_long = make_seq(1, prefix + list(range(50, 59)))  # 2 shared + 3 new blocks: one too many
    shared = manager.find_cached_prefix(too_long)
    assert len(shared) == 2
    assert not manager.allocate_slots(too_long, too_long.num_tokens, shared)
    assert manager.num_free_blocks == 4 and too_long.block_table == []
    fits = make_seq(2, prefix + list(range(50, 58)))      # 2 shared + 2 new blocks: exactly the pool
    assert manager.allocate_slots(fits, fits.num_tokens, manager.find_cached_prefix(fits))
    assert fits.block_table[:2] == shared and manager.num_free_blocks == 0
    check_invariants(manager, [fits])


def test_blocks_filled_by_decoding_are_cached_and_found_again():
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    seq = make_seq(0, [5, 6, 7, 8, 9])
    compute(manager, seq, 5)
    for token in [10, 11, 12, 13]:                        # decode to the end of the third block
        seq.token_ids.append(token)
        seq.output_token_ids.append(token)
        compute(manager, seq, seq.num_tokens)
    assert seq.num_hashed_blocks == 2
    full_blocks = seq.block_table[:2]
    manager.free(seq)
    again = make_seq(1, [5, 6, 7, 8, 9, 10, 11, 12, 13])
    assert manager.find_cached_prefix(again) == full_blocks


def test_a_preempted_sequence_rehashes_its_blocks_when_it_runs_again():
    manager = BlockManager(num_blocks=3, block_size=BLOCK_SIZE)
    seq = make_seq(0, list(range(9)))
    compute(manager, seq, 9)
    manager.free(seq)                                     # preempted: its blocks wait in the cache
    other = make_seq(1, list(range(100, 112)))
    compute(manager, other, 12)                           # evicts them all
    manager.free(other)
    assert manager.find_cached_prefix(make_seq(2, list(range(9)))) == []
    compute(manager, seq, 9)                              # recomputed from the start
    assert len(manager.find_cached_prefix(make_seq(3, list(range(9))))) == 2


def test_a_freed_sequence_leaves_the_block_map_and_freeing_twice_is_harmless():
    manager = BlockManager(num_blocks=4, block_size=BLOCK_SIZE)
    seq = make_seq(0, [1, 2, 3])
    compute(manager, seq, 3)
    assert manager.block_tables() == {0: seq.block_table}
    manager.free(seq)
    manager.free(seq)
    manager.free(make_seq(1, [4]))                        # never allocated
    assert manager.block_tables() == {} and manager.num_free_blocks == 4


def test_prefix_lookups_add_up_to_the_hit_rate():
    manager = BlockManager(num_blocks=4, block_size=BLOCK_SIZE)
    assert (manager.usage().prefix_cache_queries, manager.usage().prefix_cache_hits) == (0, 0)
    manager.record_prefix_lookup(10, 4)
    manager.record_prefix_lookup(6, 4)
    usage = manager.usage()
    assert (usage.prefix_cache_queries, usage.prefix_cache_hits) == (16, 8)
    assert usage.prefix_cache_hit_rate == 0.5
    off = BlockManager(num_blocks=4, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    off.record_prefix_lookup(10, 4)
    assert off.usage().prefix_cache_queries == 0


def test_the_paged_policy_reserves_nothing_and_a_bad_policy_is_named():
    manager = BlockManager(num_blocks=4, block_size=BLOCK_SIZE)
    assert manager.num_reserved_blocks == 0 and manager.num_blocks_for(0) == 0
    with pytest.raises(ValueError, match="policy must be 'paged' or 'naive', got 'lazy'"):
        BlockManager(num_blocks=4, block_size=BLOCK_SIZE, policy="lazy")


# ---- property test -----------------------------------------------------------------------

class PrefixKV:
    """A stand-in KV cache. The key and value a model writes at position p depend on every token up to
    p (attention mixes them in), so slot (block, offset) holds the tuple of those tokens: equal
    contents mean equal KV, and a block shared under a wrong hash shows a prefix of another sequence."""

    def __init__(self) -> None:
        self.slots: dict[tuple[int, int], tuple[int, ...]] = {}

    def compute(self, seq: Sequence, start: int, end: int) -> None:
        """seq computes positions start..end-1: write their KV into its blocks."""
        for position in range(start, end):
            slot = (seq.block_table[position // BLOCK_SIZE], position % BLOCK_SIZE)
            self.slots[slot] = tuple(seq.token_ids[:position + 1])

    def check(self, manager: BlockManager, live: list[Sequence]) -> None:
        """Every computed position of a live sequence reads the KV of its own prefix, whoever wrote it;
        every block in the prefix cache holds one prefix, ending in the tokens it was hashed with."""
        for seq in live:
            for position in range(seq.num_computed_tokens):
                slot = (seq.block_table[position // BLOCK_SIZE], position % BLOCK_SIZE)
                assert self.slots.get(slot) == tuple(seq.token_ids[:position + 1]), (
                    f"seq {seq.seq_id} position {position} reads the KV of another prefix")
        for block_id in manager.cached_block_map.values():
            last = self.slots[(block_id, BLOCK_SIZE - 1)]
            assert len(last) % BLOCK_SIZE == 0 and last[-BLOCK_SIZE:] == manager.blocks[block_id].token_ids
            for offset in range(BLOCK_SIZE - 1):
                assert self.slots[(block_id, offset)] == last[:len(last) - BLOCK_SIZE + offset + 1]


operations = st.lists(
    st.tuples(st.sampled_from(["add", "grow", "free"]), st.integers(0, 10**6), st.integers(1, 12)),
    min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops=operations, num_blocks=st.integers(3, 12), caching=st.booleans(), naive=st.booleans())
def test_random_allocations_never_leak_or_double_own_a_block(ops, num_blocks, caching, naive):
    """...and every block, shared or cached, holds the KV of the prefix that reads it."""
    manager = BlockManager(num_blocks, BLOCK_SIZE, caching, "naive" if naive else "paged", max_model_len=12)
    kv = PrefixKV()
    live: list[Sequence] = []
    next_id = 0
    for op, pick, size in ops:
        if op == "add":
            # Prompts drawn from a few shared prefixes, so the cache has something to find.
            prefix = [pick % 3] * (4 * (pick % 3))
            seq = make_seq(next_id, (prefix + [pick % 7] * size)[:12])
            next_id += 1
            shared = manager.find_cached_prefix(seq)
            if manager.allocate_slots(seq, seq.num_tokens, shared):
                kv.compute(seq, len(shared) * BLOCK_SIZE, seq.num_tokens)
                seq.num_computed_tokens = seq.num_tokens
                manager.cache_full_blocks(seq)
                live.append(seq)
        elif live and op == "grow":
            seq = live[pick % len(live)]
            if seq.num_tokens < 12:
                seq.token_ids.append(pick % 5)
                seq.output_token_ids.append(pick % 5)
                if manager.allocate_slots(seq, seq.num_tokens):
                    kv.compute(seq, seq.num_computed_tokens, seq.num_tokens)
                    seq.num_computed_tokens = seq.num_tokens
                    manager.cache_full_blocks(seq)
        elif live and op == "free":
            manager.free(live.pop(pick % len(live)))
        check_invariants(manager, live)
        kv.check(manager, live)
    for seq in live:
        manager.free(seq)
    check_invariants(manager, [])
    assert manager.num_free_blocks == num_blocks


@settings(max_examples=200, deadline=None)
@given(block_size=st.integers(1, 9), start=st.integers(0, 40), length=st.integers(1, 40), seed=st.integers(0, 99))
def test_the_runners_slots_are_the_block_table_formula(block_size, start, length, seed):
    """model_runner._slots (runs of a block's consecutive slots) against the formula slot =
    block_table[p // block_size] * block_size + p % block_size."""
    import random
    from nanovllm.runner.model_runner import _slots
    end = start + length
    table = random.Random(seed).sample(range(100), -(-end // block_size))
    want = [table[p // block_size] * block_size + p % block_size for p in range(start, end)]
    assert _slots(table, start, end, block_size) == want
