"""The batched Sampler: seeded draws independent of the batch, filters that never leak,
penalties and min_tokens that change exactly what they should, raw-distribution logprobs."""
import math

import pytest
import torch

from nanovllm.runner.sampler import (Sampler, SamplerOutput, SamplingBatch, apply_penalties, random_uniform,
                                     stream_keys)
from nanovllm.sampling_params import SamplingParams

sampler = Sampler()


def sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int] | None = None,
           output_lens: list[int] | None = None, prompts: list[list[int]] | None = None,
           outputs: list[list[int]] | None = None, eos: list[int] = (), device: str = "cpu"):
    rows = len(params)
    batch = SamplingBatch.build(params, seeds if seeds is not None else list(range(rows)),
                                output_lens if output_lens is not None else [0] * rows,
                                prompts if prompts is not None else [[] for _ in range(rows)],
                                outputs if outputs is not None else [[] for _ in range(rows)],
                                list(eos), device)
    return sampler(logits.to(device), batch)


def draws(logits_row: torch.Tensor, params: SamplingParams, num_draws: int, output_len: int = 0) -> list[int]:
    """One token per seed 0..num_draws-1 for the same logits: num_draws independent draws, one batch."""
    logits = logits_row[None, :].expand(num_draws, -1).contiguous()
    return sample(logits, [params] * num_draws, seeds=list(range(num_draws)),
                  output_lens=[output_len] * num_draws).token_ids


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# chi-square critical values at p = 0.001 (the draws are deterministic: a pass is a pass every time)
CHI2_CRITICAL_0_001 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}


# --- the random stream -------------------------------------------------------------------

def _mix32_reference(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x735A2D97) & 0xFFFFFFFF
    return x ^ (x >> 15)


def _uniform_reference(seed: int, output_len: int, token_id: int) -> float:
    seed &= (1 << 64) - 1
    key = _mix32_reference((seed & 0xFFFFFFFF) ^ 0x9E3779B9)
    key = _mix32_reference(key ^ (seed >> 32))
    key = _mix32_reference(key ^ output_len)
    bits = _mix32_reference(key ^ _mix32_reference(token_id ^ 0x7F4A7C15))
    return min(((bits >> 8) + 0.5) / (1 << 24), 1 - 2 ** -24)   # the top value would round to 1 in float32


def test_random_stream_is_the_hash_computed_with_python_integers():
    seeds = [0, 1, 12345, 2**32 + 7, 2**63 - 1, -1, -(2**40), 2**70 + 3]
    output_lens = [0, 1, 7, 100, 2**31, 5, 3, 9]
    vocab_size = 37
    u = random_uniform(torch.from_numpy(stream_keys(seeds, output_lens)), vocab_size)
    expected = torch.tensor([[_uniform_reference(s, n, v) for v in range(vocab_size)]
                             for s, n in zip(seeds, output_lens)], dtype=torch.float32)
    assert torch.equal(u, expected)


def test_the_largest_random_number_stays_below_one_so_a_masked_token_never_wins():
    """Seed 376 at output length 0 hashes token 11727 to the top 24-bit value, whose centre rounds to 1
    in float32: log(-log 1) = -inf made a masked (-inf) token's race score NaN, and argmax took it."""
    keys = torch.from_numpy(stream_keys([376], [0]))
    assert float(random_uniform(keys, 32_000)[0, 11727]) == 1 - 2 ** -24
    logits = torch.zeros(1, 32_000)
    logits[0, :5] = 10.0                                   # top_k=5 keeps tokens 0..4 only
    assert sample(logits, [SamplingParams(temperature=1.0, top_k=5)], seeds=[376]).token_ids[0] < 5


def test_random_stream_is_uniform_in_the_open_unit_interval():
    u = random_uniform(torch.from_numpy(stream_keys(list(range(64)), [0] * 64)), 4096)
    assert 0.0 < float(u.min()) and float(u.max()) < 1.0
    counts = torch.histc(u, bins=16, min=0.0, max=1.0)
    assert chi_square(counts, torch.full((16,), 1 / 16)) < 37.70   # df 15, p = 0.001


# --- reproducibility ---------------------------------------------------------------------

CUDA = pytest.param("cuda", marks=[pytest.mark.gpu,
                                    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("target", [
    SamplingParams(temperature=0.9, top_k=200, top_p=0.95, seed=1234),
    SamplingParams(top_k=50, seed=1234),
    SamplingParams(min_p=0.01, seed=1234),
    SamplingParams(seed=1234, frequency_penalty=0.3),
])
def test_seeded_row_samples_the_same_alone_and_in_any_batch(target, device):
    torch.manual_seed(0)
    vocab_size = 500
    others = [SamplingParams(temperature=0), SamplingParams(top_k=3), SamplingParams(min_p=0.2),
              SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, logprobs=2),
              SamplingParams(temperature=1.5, top_p=0.5)]
    for output_len in range(8):
        row = torch.randn(vocab_size) * 2
        alone = sample(row[None], [target], seeds=[1234], output_lens=[output_len],
                       prompts=[[1, 2]], outputs=[list(range(output_len))], device=device).token_ids[0]
        for position in range(len(others) + 1):
            params = others[:position] + [target] + others[position:]
            logits = torch.randn(len(params), vocab_size) * 2
            logits[position] = row
            seeds = [7 + i for i in range(len(params))]
            seeds[position] = 1234
            lens = [3 * i for i in range(len(params))]
            lens[position] = output_len
            outputs = [list(range(n)) for n in lens]
            batched = sample(logits, params, seeds=seeds, output_lens=lens, prompts=[[1, 2]] * len(params),
                             outputs=outputs, device=device)
            assert batched.token_ids[position] == alone


def test_different_seeds_draw_different_tokens():
    tokens = draws(torch.zeros(1000), SamplingParams(), num_draws=64)
    assert len(set(tokens)) > 50


def test_output_len_advances_a_seeds_stream():
    logits = torch.zeros(8, 1000)
    tokens = sample(logits, [SamplingParams(seed=5)] * 8, seeds=[5] * 8, output_lens=list(range(8))).token_ids
    assert len(set(tokens)) >= 7
    again = sample(logits, [SamplingParams(seed=5)] * 8, seeds=[5] * 8, output_lens=list(range(8))).token_ids
    assert again == tokens


# --- greedy and temperature --------------------------------------------------------------

def test_greedy_takes_the_argmax():
    torch.manual_seed(1)
    logits = torch.randn(6, 300)
    out = sample(logits, [SamplingParams(temperature=0)] * 6)
    assert out.token_ids == logits.argmax(dim=-1).tolist()


def test_greedy_rows_take_the_argmax_in_a_batch_mixed_with_random_rows():
    torch.manual_seed(2)
    logits = torch.randn(6, 300)
    params = [SamplingParams(temperature=0), SamplingParams(top_k=5), SamplingParams(temperature=0),
              SamplingParams(), SamplingParams(top_p=0.3), SamplingParams(temperature=0)]
    out = sample(logits, params)
    for row in (0, 2, 5):
        assert out.token_ids[row] == int(logits[row].argmax())


def test_temperature_towards_zero_becomes_greedy():
    logits = torch.tensor([0.0, 1.0, 3.0, 2.5, -1.0])
    assert set(draws(logits, SamplingParams(temperature=1e-6), 200)) == {2}
    assert set(draws(logits, SamplingParams(temperature=0.02), 200)) == {2}
    assert len(set(draws(logits, SamplingParams(temperature=1.0), 200))) == 5


# --- top-k, top-p, min-p -----------------------------------------------------------------

LOGITS = torch.log(torch.tensor([0.05, 0.30, 0.02, 0.50, 0.08, 0.05]))   # sorted: 3, 1, 4, {0, 5}, 2


@pytest.mark.parametrize("params, allowed", [
    (SamplingParams(top_k=1), {3}),
    (SamplingParams(top_k=2), {3, 1}),
    (SamplingParams(top_k=3), {3, 1, 4}),
    (SamplingParams(top_p=0.45), {3}),
    (SamplingParams(top_p=0.75), {3, 1}),
    (SamplingParams(top_p=0.85), {3, 1, 4}),
    (SamplingParams(min_p=0.5), {3, 1}),
    (SamplingParams(min_p=0.15), {3, 1, 4}),
    (SamplingParams(min_p=0.7), {3}),
    (SamplingParams(top_k=3, top_p=0.75), {3, 1}),
    (SamplingParams(top_k=2, min_p=0.01), {3, 1}),
    (SamplingParams(top_p=0.85, min_p=0.2), {3, 1}),
])
def test_filters_never_pick_excluded_tokens_and_reach_every_kept_one(params, allowed):
    assert set(draws(LOGITS, params, 2000)) == allowed


@pytest.mark.parametrize("params, kept", [
    (SamplingParams(), [0, 1, 2, 3, 4, 5]),
    (SamplingParams(top_k=3), [3, 1, 4]),
    (SamplingParams(top_p=0.85), [3, 1, 4]),
    (SamplingParams(min_p=0.09), [3, 1, 4, 0, 5]),
    (SamplingParams(temperature=0.5, top_k=3), [3, 1, 4]),            # tempered: probabilities squared
    (SamplingParams(temperature=2.0, min_p=0.3), [3, 1, 4, 0, 5]),
])
def test_draws_follow_the_renormalized_distribution(params, kept):
    tokens = torch.tensor(draws(LOGITS, params, 20000))
    probs = (LOGITS / params.temperature).exp()[kept]
    probs = probs / probs.sum()
    counts = torch.stack([(tokens == t).sum() for t in kept]).float()
    assert counts.sum() == len(tokens)
    assert chi_square(counts, probs) < CHI2_CRITICAL_0_001[len(kept) - 1]


def test_a_seeds_successive_draws_follow_the_distribution_and_are_independent():
    num_seeds, steps = 500, 20
    logits = torch.zeros(num_seeds * steps, 2)
    seeds = [seed for seed in range(num_seeds) for _ in range(steps)]
    output_lens = list(range(steps)) * num_seeds
    tokens = torch.tensor(sample(logits, [SamplingParams()] * len(seeds), seeds=seeds,
                                 output_lens=output_lens).token_ids).view(num_seeds, steps)
    ones = tokens.sum()
    assert chi_square(torch.stack([tokens.numel() - ones, ones]).float(), torch.tensor([0.5, 0.5])) < 10.83
    pairs = 2 * tokens[:, :-1] + tokens[:, 1:]                            # consecutive (a, b) as 0..3
    counts = torch.stack([(pairs == k).sum() for k in range(4)]).float()
    assert chi_square(counts, torch.full((4,), 0.25)) < CHI2_CRITICAL_0_001[3]


def test_rows_with_a_filter_off_are_unaffected_by_rows_that_use_it():
    logits = LOGITS[None].expand(4000, -1).contiguous()
    params = [SamplingParams(top_k=1, top_p=0.3, min_p=0.9) if i % 2 else SamplingParams() for i in range(4000)]
    tokens = sample(logits, params, seeds=list(range(4000))).token_ids
    assert set(tokens[1::2]) == {3}
    assert set(tokens[0::2]) == set(range(6))
    kinds = [SamplingParams(top_k=1), SamplingParams(top_p=0.85), SamplingParams(top_k=5, top_p=0.75),
             SamplingParams(temperature=0)]
    tokens = sample(logits, kinds * 1000, seeds=list(range(4000))).token_ids
    assert [set(tokens[i::4]) for i in range(4)] == [{3}, {3, 1, 4}, {3, 1}, {3}]


def test_top_k_above_the_vocabulary_size_keeps_every_token():
    for params in (SamplingParams(top_k=50), SamplingParams(top_k=50, top_p=0.99)):
        assert set(draws(LOGITS, params, 2000)) == set(range(6))


def test_top_p_drops_the_token_whose_preceding_mass_equals_it_exactly():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    probs = torch.softmax(logits, dim=-1)
    top_p = float((torch.cumsum(probs, dim=-1) - probs)[2])       # the mass before token 2, as float32 computes it
    assert set(draws(logits, SamplingParams(top_p=top_p), 2000)) == {0, 1}


def test_min_p_of_one_keeps_only_the_most_likely_token():
    assert set(draws(LOGITS, SamplingParams(min_p=1.0), 500)) == {3}


# --- penalties and min_tokens ------------------------------------------------------------

def test_penalties_change_exactly_the_logits_of_seen_tokens():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5, 3.0]] * 4)
    params = [SamplingParams(temperature=0, repetition_penalty=2.0),
              SamplingParams(temperature=0, frequency_penalty=0.5),
              SamplingParams(temperature=0, presence_penalty=0.25),
              SamplingParams(temperature=0, repetition_penalty=2.0, presence_penalty=0.25)]
    prompts, outputs = [[0, 1], [0, 1], [0, 1], [0]], [[2, 2, 3], [2, 2, 3], [2, 2, 3], [5]]
    batch = SamplingBatch.build(params, [0] * 4, [3, 3, 3, 1], prompts, outputs, [], "cpu")
    penalized = apply_penalties(logits, batch)
    expected = torch.tensor([
        [1.0, -4.0, 0.5, -2.0, 0.5, 3.0],    # seen in prompt or output: positive / 2, negative * 2
        [2.0, -2.0, 0.0, -1.5, 0.5, 3.0],    # output counts 2 and 1, times 0.5
        [2.0, -2.0, 0.75, -1.25, 0.5, 3.0],  # each output token once, 0.25
        [1.0, -2.0, 1.0, -1.0, 0.5, 1.25],   # shorter lists: their padding is no token
    ])
    assert torch.allclose(penalized, expected)
    alone = SamplingBatch.build(params[:1], [0], [1], [[0]], [[5]], [], "cpu")   # every row's penalty is 2.0
    assert torch.equal(apply_penalties(logits[:1], alone), torch.tensor([[1.0, -2.0, 1.0, -1.0, 0.5, 1.5]]))


def test_penalties_steer_the_sampled_token():
    logits = torch.tensor([[5.0, 4.0, 0.0]] * 2)
    params = [SamplingParams(temperature=0, frequency_penalty=0.6), SamplingParams(temperature=0)]
    out = sample(logits, params, outputs=[[0, 0], [0, 0]])
    assert out.token_ids == [1, 0]
    out = sample(logits[:1], [SamplingParams(temperature=0, repetition_penalty=1.5)], prompts=[[0]])
    assert out.token_ids == [1]


def test_min_tokens_suppresses_eos_and_stop_token_ids_until_reached():
    eos = 4
    logits = torch.tensor([[0.0, 1.0, 2.0, 5.0, 9.0]] * 4)
    params = [SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[3]),
              SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[3]),
              SamplingParams(temperature=0, min_tokens=2, ignore_eos=True),
              SamplingParams(temperature=0)]
    out = sample(logits, params, output_lens=[1, 2, 0, 0], eos=[eos])
    assert out.token_ids == [2, eos, 3, eos]
    many = logits[:1].expand(500, -1).contiguous()
    random_rows = sample(many, [SamplingParams(min_tokens=1)] * 500, seeds=list(range(500)), eos=[eos]).token_ids
    assert eos not in random_rows and {2, 3} <= set(random_rows)


# --- logprobs ----------------------------------------------------------------------------

def test_logprobs_are_the_raw_log_softmax_of_the_sampled_tokens():
    torch.manual_seed(3)
    logits = torch.randn(4, 50) * 3
    params = [SamplingParams(temperature=0), SamplingParams(top_k=3),
              SamplingParams(repetition_penalty=1.5, temperature=0.5), SamplingParams(min_p=0.3)]
    out = sample(logits, params, outputs=[[1, 2]] * 4)
    log_softmax = torch.log_softmax(logits, dim=-1)
    expected = [float(log_softmax[row, token]) for row, token in enumerate(out.token_ids)]
    assert out.logprobs == pytest.approx(expected, abs=1e-5)
    assert out.top_logprobs is None


def test_top_logprobs_list_the_most_likely_tokens_plus_the_sampled_one():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]] * 3)
    params = [SamplingParams(temperature=0, logprobs=2, repetition_penalty=100.0), SamplingParams(temperature=0),
              SamplingParams(temperature=0, logprobs=0)]
    out = sample(logits, params, prompts=[[1], [], []])
    log_softmax = torch.log_softmax(logits[0], dim=-1)
    assert out.token_ids == [3, 1, 1]
    assert out.top_logprobs[0] == pytest.approx({1: float(log_softmax[1]), 3: float(log_softmax[3])})
    assert out.top_logprobs[1] == {}
    assert out.top_logprobs[2] == pytest.approx({1: float(log_softmax[1])})
    out = sample(logits[:1], [SamplingParams(temperature=0, logprobs=1, frequency_penalty=2.0)], outputs=[[1, 1]])
    assert out.token_ids == [3]
    assert set(out.top_logprobs[0]) == {1, 3}


def test_a_plain_batch_gives_top_logprobs_of_bfloat16_logits_in_float32():
    torch.manual_seed(4)
    logits = (torch.randn(3, 40) * 4).to(torch.bfloat16)
    params = [SamplingParams(temperature=0, logprobs=3), SamplingParams(), SamplingParams(temperature=0.7, logprobs=1)]
    out = sample(logits, params)
    log_softmax = torch.log_softmax(logits.float(), dim=-1)
    for row, num in ((0, 3), (2, 1)):
        values, ids = log_softmax[row].topk(num)
        expected = dict(zip(ids.tolist(), values.tolist())) | {out.token_ids[row]: float(log_softmax[row, out.token_ids[row]])}
        assert out.top_logprobs[row] == pytest.approx(expected, abs=1e-6)
    assert out.top_logprobs[1] == {}


def test_greedy_rows_of_a_plain_mixed_batch_take_the_argmax_whatever_the_seed():
    logits = LOGITS[None].expand(400, -1).contiguous()
    params = [SamplingParams(temperature=0) if i % 2 else SamplingParams() for i in range(400)]
    tokens = sample(logits, params, seeds=list(range(400))).token_ids
    assert set(tokens[1::2]) == {3} and set(tokens[0::2]) == set(range(6))


def test_logit_bias_is_added_to_its_own_rows_logits_only():
    logits = torch.tensor([[5.0, 0.0, 1.0, -2.0]] * 2)
    out = sample(logits.clone(), [SamplingParams(temperature=0, logit_bias={2: 4.5, 3: -1.0}),
                                  SamplingParams(temperature=0)])                   # the sampler writes in place
    biased = torch.log_softmax(logits[0] + torch.tensor([0.0, 0.0, 4.5, -1.0]), dim=-1)
    assert out.token_ids == [2, 0]
    assert out.logprobs == pytest.approx([float(biased[2]), float(torch.log_softmax(logits[1], dim=-1)[0])],
                                         abs=1e-6)


def test_a_grammar_bitmask_masks_its_own_rows_only():
    logits = torch.tensor([[5.0, 0.0, 1.0, 2.0]] * 3)
    params = [SamplingParams(temperature=0)] * 3
    batch = SamplingBatch.build(params, [0, 1, 2], [0] * 3, [[]] * 3, [[]] * 3, [], "cpu")
    batch.bitmask = torch.tensor([[0b0100], [0b1010]], dtype=torch.int32)   # row 0 allows token 2, row 2: 1 and 3
    batch.bitmask_rows = torch.tensor([0, 2])
    out = sampler(logits.clone(), batch)
    assert out.token_ids == [2, 0, 3]
    assert out.logprobs[1] == pytest.approx(float(torch.log_softmax(logits[1], dim=-1)[0]), abs=1e-6)


def test_build_asks_the_grammars_of_the_constrained_rows_for_their_bitmask():
    calls = []

    class FakeMasks:   # the runner's GrammarBitmask, as SamplingBatch.build uses it
        def build(self, states, output_token_ids, rows, newest_token_ids=None):
            calls.append((states, output_token_ids, rows))
            return torch.tensor([[0b1000]], dtype=torch.int32), torch.tensor(rows)   # token 3 only

    grammar = object()
    params = [SamplingParams(temperature=0)] * 3
    batch = SamplingBatch.build(params, [0] * 3, [1, 2, 1], [[]] * 3, [[5], [6, 7], [8]], [2], "cpu",
                                grammars=[None, grammar, None], grammar_masks=FakeMasks())
    assert calls == [([grammar], [[6, 7]], [1])]
    assert batch.bitmask.dtype == torch.int32 and batch.bitmask.tolist() == [[8]] and batch.bitmask_rows.tolist() == [1]
    assert sampler(torch.tensor([[3.0, 2.0, 1.0, 0.0]] * 3), batch).token_ids == [0, 3, 0]
    unconstrained = SamplingBatch.build(params, [0] * 3, [1, 2, 1], [[]] * 3, [[5], [6, 7], [8]], [2], "cpu",
                                        grammars=[None] * 3, grammar_masks=FakeMasks())
    assert unconstrained.bitmask is None and unconstrained.bitmask_rows is None and len(calls) == 1


def test_a_step_without_samples_has_an_empty_output():
    assert SamplerOutput.empty() == SamplerOutput(token_ids=[], logprobs=[], top_logprobs=None)


def test_plain_params_need_only_the_logits_and_the_temperature():
    assert SamplingParams(temperature=0).is_plain and SamplingParams(temperature=0.7, seed=3).is_plain
    assert SamplingParams(temperature=0, top_k=5, top_p=0.5).is_plain        # filters do nothing to an argmax
    for params in (SamplingParams(top_k=5), SamplingParams(top_p=0.9), SamplingParams(min_p=0.1),
                   SamplingParams(temperature=0, repetition_penalty=1.1), SamplingParams(presence_penalty=0.5),
                   SamplingParams(temperature=0, logprobs=2)):
        assert not params.is_plain


def test_a_grammar_alone_leaves_params_plain_but_for_their_mask():
    constrained = SamplingParams(temperature=0.7, seed=3, structured_outputs={"regex": "[a-z]+"})
    assert constrained.is_plain_or_masked and not constrained.is_plain
    assert SamplingParams(temperature=0.7).is_plain_or_masked
    for params in (SamplingParams(top_k=5, structured_outputs={"regex": "[a-z]+"}), SamplingParams(logprobs=1),
                   SamplingParams(temperature=0, presence_penalty=0.5), SamplingParams(logit_bias={3: 1.0})):
        assert not params.is_plain_or_masked


@pytest.mark.parametrize("temperatures", [[0.0, 0.7, 1.3, 0.0, 0.9], [0.0] * 5, [0.8, 1.0, 0.6, 1.2, 0.7]])
def test_plain_settings_from_device_buffers_sample_what_the_built_ones_do(temperatures):
    """SamplingBatch.plain (a decode graph's temperatures, 0 on greedy rows, and keys) and `build` over
    the same plain rows draw the same tokens with the same log-probabilities."""
    logits = torch.randn(5, 97, generator=torch.Generator().manual_seed(7)) * 3
    params = [SamplingParams(temperature=t, seed=row) for row, t in enumerate(temperatures)]
    seeds, output_lens = list(range(5)), [4, 0, 9, 2, 31]
    built = SamplingBatch.build(params, seeds, output_lens, [[]] * 5, [[]] * 5, [], "cpu")
    all_greedy = not any(temperatures)
    plain = SamplingBatch.plain(5, None if all_greedy else torch.tensor(temperatures),
                                None if all_greedy else torch.as_tensor(stream_keys(seeds, output_lens)),
                                all_random=all(temperatures))
    want, got = sampler(logits.clone(), built), sampler(logits.clone(), plain)
    assert got.token_ids == want.token_ids and got.logprobs == want.logprobs
    if not all_greedy:   # the random rows did draw: another key changes some token
        other = SamplingBatch.plain(5, torch.tensor(temperatures),
                                    torch.as_tensor(stream_keys([s + 1 for s in seeds], output_lens)), False)
        assert sampler(logits.clone(), other).token_ids != want.token_ids


def test_samples_land_in_the_given_buffers_and_each_step_keeps_its_own():
    """The runner's SampleBuffers are reused every step (the next step's pending tokens are read there);
    a step's DeviceSamples still give that step's tokens after a later step overwrote the buffers."""
    from nanovllm.runner.sampler import SampleBuffers
    buffers = SampleBuffers(6, "cpu")
    params = [SamplingParams(temperature=0)] * 3
    batch = SamplingBatch.build(params, [0] * 3, [0] * 3, [[]] * 3, [[]] * 3, [], "cpu")
    first = sampler.sample(torch.tensor([[0.0, 5.0, 1.0]] * 3), batch, buffers)
    assert buffers.token_ids[:3].tolist() == [1, 1, 1]
    second = sampler.sample(torch.tensor([[6.0, 5.0, 1.0]] * 3), batch, buffers)   # the plain path
    penalties = [SamplingParams(temperature=0, frequency_penalty=2.0, presence_penalty=2.0)] * 3
    mixed = SamplingBatch.build(penalties, [0] * 3, [0] * 3, [[]] * 3, [[0]] * 3, [], "cpu")
    third = sampler.sample(torch.tensor([[6.0, 5.0, 1.0]] * 3), mixed, buffers)    # the torch path
    assert buffers.token_ids[:3].tolist() == [1, 1, 1]
    assert first.result().token_ids == [1, 1, 1]
    assert second.result().token_ids == [0, 0, 0]
    out = third.result()
    assert out.token_ids == [1, 1, 1]
    expected = float(torch.log_softmax(torch.tensor([6.0, 5.0, 1.0]), dim=0)[1])   # raw logits
    assert out.logprobs == pytest.approx([expected] * 3, abs=1e-6)
    assert buffers.logprobs[:3].tolist() == pytest.approx([expected] * 3, abs=1e-6)


# --- devices -----------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_draws_the_same_tokens_as_the_cpu():
    torch.manual_seed(4)
    logits = torch.randn(64, 32000) * 2
    params = [SamplingParams(temperature=0), SamplingParams(top_k=40), SamplingParams(top_p=0.9),
              SamplingParams(min_p=0.05, repetition_penalty=1.2, min_tokens=3, logprobs=5)] * 16
    kwargs = dict(seeds=[i * 7919 for i in range(64)], output_lens=list(range(64)),
                  prompts=[[1, 2, 3]] * 64, outputs=[[4, 5]] * 64, eos=[2])
    keys = torch.from_numpy(stream_keys(kwargs["seeds"], kwargs["output_lens"]))
    assert torch.equal(random_uniform(keys.cuda(), 32000).cpu(), random_uniform(keys, 32000))
    cpu = sample(logits, params, **kwargs)
    cuda = sample(logits, params, device="cuda", **kwargs)
    assert cuda.token_ids == cpu.token_ids
    assert cuda.logprobs == pytest.approx(cpu.logprobs, abs=1e-4)
    assert math.isclose(sum(cuda.logprobs), sum(cpu.logprobs), abs_tol=1e-3)


@pytest.mark.parametrize("vocab_size", [49152, 4096, 5001, 300])
def test_first_argmax_is_argmax_with_ties_and_masked_rows(vocab_size):
    from nanovllm.ops.sampling import first_argmax
    gen = torch.Generator().manual_seed(vocab_size)
    x = torch.randint(-4, 5, (6, vocab_size), generator=gen).float()      # many ties at the maximum
    x[1] = float("-inf")                                                     # a row with nothing allowed
    x[2, : vocab_size // 2] = float("-inf")
    x[3, -1] = 100.0                                                         # the maximum in the last chunk
    x[4, 0] = 100.0
    assert torch.equal(first_argmax(x), x.argmax(dim=-1))
    y = torch.randn(16, vocab_size, generator=gen)
    assert torch.equal(first_argmax(y), y.argmax(dim=-1))
    for rows in (x, y):     # float32 goes to numpy's argmax; bfloat16 (ties aplenty) through chunk maxima
        half = rows.bfloat16()
        assert torch.equal(first_argmax(half), half.argmax(dim=-1))
        assert torch.equal(first_argmax(rows[:, ::3]), rows[:, ::3].argmax(dim=-1))   # a strided view


@pytest.mark.parametrize("size", [3, 65, 1000])
def test_host_values_become_the_tensor_torch_makes_of_them_long_lists_through_numpy(size):
    from nanovllm.runner.sampler import host_to_device
    ints, floats = [(7 * i) % 1000 - 300 for i in range(size)], [0.1 * i - 3.3 for i in range(size)]
    for values, dtype in ((ints, torch.int64), (ints, torch.int32), (floats, torch.float32),
                          ([i % 3 == 0 for i in range(size)], torch.bool), ([ints[:4]] * size, torch.int32)):
        got = host_to_device(values, dtype, "cpu")
        assert got.dtype == dtype and torch.equal(got, torch.tensor(values, dtype=dtype))
    with pytest.raises((OverflowError, ValueError)):     # an int beyond int64 is an error, never wrapped
        host_to_device(ints + [2 ** 63], torch.int64, "cpu")
