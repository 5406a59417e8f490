"""The sampler draws from the distribution vLLM's semantics define, checked against an independent
numpy implementation of those semantics, never against the sampler itself.

The reference (`reference_probs`, float64 numpy) applies, in vLLM's order: repetition penalty on
prompt and output tokens, frequency and presence penalties on output tokens, temperature, top-k (ties
at the k-th value stay), top-p over the renormalised top-k distribution (the smallest prefix whose
mass reaches top_p), then min-p relative to the most likely token, and renormalises.

The sampler sees one batch of a realistic 32k vocabulary in which rows of different settings sit side
by side (top-p-only rows beside top-k rows, penalised beside plain, a greedy row among them). Each
row has its own seed, or one seed at successive output lengths, so the rows of one setting are
independent draws; a chi-square test over the tokens with enough expected draws (the rest pooled)
compares their counts with the reference, and any token the reference excludes must never be drawn.
The draws are deterministic (counter-based random numbers), so a pass is a pass every time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from nanovllm.runner.sampler import Sampler, SamplingBatch
from nanovllm.sampling_params import SamplingParams

VOCAB_SIZE = 32_000
ROWS_PER_SETTING = 300      # 32k-wide rows cost ~5 ms of CPU each
CHUNK_ROWS = 480            # rows per sampler call: bounds the [rows, V] int64 hash buffers to ~120 MB
MIN_EXPECTED = 5.0          # tokens expected fewer times than this are pooled into one bin


def realistic_logits(seed: int = 0) -> np.ndarray:
    """[V] float32: a long Gaussian tail under a few dozen likely tokens (top token ~15%)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, VOCAB_SIZE)
    logits[rng.choice(VOCAB_SIZE, 40, replace=False)] += rng.uniform(6.0, 11.0, 40)
    return logits.astype(np.float32)


LOGITS = realistic_logits()
LIKELY = np.argsort(-LOGITS)[:12].tolist()          # the tokens penalties are made to bite on
PROMPT = LIKELY[0:3] + [7, 11]
OUTPUT = [LIKELY[1]] * 3 + [LIKELY[3], LIKELY[4], LIKELY[4], 19]


@dataclass
class Setting:
    name: str
    params: SamplingParams
    prompt: list[int] = field(default_factory=list)
    output: list[int] = field(default_factory=list)


SETTINGS = [
    Setting("t1", SamplingParams(temperature=1.0)),
    Setting("t0.5-top_k5", SamplingParams(temperature=0.5, top_k=5)),
    Setting("t1.3-top_p0.8", SamplingParams(temperature=1.3, top_p=0.8)),               # top-p only
    Setting("t1.5-top_k30-top_p0.7", SamplingParams(temperature=1.5, top_k=30, top_p=0.7)),   # renormalised
    Setting("t0.8-min_p0.05", SamplingParams(temperature=0.8, min_p=0.05)),
    Setting("t1.2-all-filters", SamplingParams(temperature=1.2, top_k=25, top_p=0.9, min_p=0.02)),
    Setting("t0.7-penalties", SamplingParams(temperature=0.7, repetition_penalty=1.4, frequency_penalty=0.4,
                                             presence_penalty=0.9), PROMPT, OUTPUT),
    Setting("t1.1-presence-frequency", SamplingParams(temperature=1.1, presence_penalty=0.7, frequency_penalty=-0.2),
            PROMPT, OUTPUT),                                   # mild: the penalised tokens stay likely
    Setting("t2-penalties-top_p0.9", SamplingParams(temperature=2.0, top_p=0.9, repetition_penalty=0.8,
                                                    frequency_penalty=-0.3, presence_penalty=0.5), PROMPT, OUTPUT),
]


def reference_probs(logits: np.ndarray, params: SamplingParams, prompt: list[int],
                    output: list[int]) -> np.ndarray:
    """vLLM's sampling distribution for one row, in float64 numpy; [V], zeros where excluded."""
    x = logits.astype(np.float64).copy()
    counts = np.bincount(np.asarray(output, dtype=np.int64), minlength=x.size).astype(np.float64)
    if params.repetition_penalty != 1.0:
        seen = counts > 0
        seen[np.asarray(prompt, dtype=np.int64)] = True
        x[seen] = np.where(x[seen] > 0, x[seen] / params.repetition_penalty, x[seen] * params.repetition_penalty)
    x -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    x /= params.temperature
    keep = np.ones(x.size, dtype=bool)
    if params.top_k > 0:
        keep &= x >= np.sort(x)[::-1][params.top_k - 1]
    if params.top_p < 1.0:
        order = np.argsort(-np.where(keep, x, -np.inf), kind="stable")
        kept_probs = np.exp(x[order] - x[order[0]]) * keep[order]
        kept_probs /= kept_probs.sum()
        mass_before = np.cumsum(kept_probs) - kept_probs
        keep[order[mass_before >= params.top_p]] = False
    if params.min_p > 0.0:
        keep &= np.exp(x - x.max()) >= params.min_p
    probs = np.where(keep, np.exp(x - x.max()), 0.0)
    return probs / probs.sum()


def chi_square_p_value(statistic: float, dof: int) -> float:
    """Upper tail of chi-square(dof) by the Wilson-Hilferty normal approximation (no scipy needed)."""
    z = ((statistic / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def assert_draws_follow(tokens: np.ndarray, probs: np.ndarray, what: str) -> None:
    """tokens [N] drawn; probs [V] the reference. No excluded token, and a chi-square p-value above 1e-4."""
    excluded = tokens[probs[tokens] == 0.0]
    assert excluded.size == 0, f"{what}: drew tokens the reference excludes: {sorted(set(excluded.tolist()))[:10]}"
    num_draws = tokens.size
    counts = np.bincount(tokens, minlength=probs.size)
    expected = probs * num_draws
    own_bin = expected >= MIN_EXPECTED
    observed_bins = np.append(counts[own_bin], counts[~own_bin].sum())
    expected_bins = np.append(expected[own_bin], expected[~own_bin].sum())
    if expected_bins[-1] < MIN_EXPECTED:     # too little mass to pool on its own: fold it into the last bin
        observed_bins[-2] += observed_bins[-1]
        expected_bins[-2] += expected_bins[-1]
        observed_bins, expected_bins = observed_bins[:-1], expected_bins[:-1]
    assert expected_bins.size >= 3, f"{what}: too few bins for a test"
    statistic = float(((observed_bins - expected_bins) ** 2 / expected_bins).sum())
    p_value = chi_square_p_value(statistic, expected_bins.size - 1)
    assert p_value > 1e-4, (f"{what}: chi-square {statistic:.1f} over {expected_bins.size} bins "
                            f"(p = {p_value:.2g}); the draws do not follow vLLM's distribution")


def draw_mixed_batches(settings: list[Setting], rows_per_setting: int) -> dict[str, np.ndarray]:
    """Every setting's rows interleaved in batches of CHUNK_ROWS; -> name: tokens [rows_per_setting].
    Even draws get seed = draw index at output length 0; odd draws one seed at output length = index."""
    sampler = Sampler()
    num_settings = len(settings)
    total = num_settings * rows_per_setting
    logits = torch.from_numpy(LOGITS)
    drawn = np.empty(total, dtype=np.int64)
    for start in range(0, total, CHUNK_ROWS):
        rows = range(start, min(start + CHUNK_ROWS, total))
        chosen = [settings[row % num_settings] for row in rows]
        draw_index = [row // num_settings for row in rows]
        seeds = [i if i % 2 == 0 else 1234567 for i in draw_index]
        output_lens = [0 if i % 2 == 0 else i for i in draw_index]
        batch = SamplingBatch.build([s.params for s in chosen], seeds, output_lens, [s.prompt for s in chosen],
                                    [s.output for s in chosen], eos_token_ids=[], device="cpu")
        drawn[start:start + len(rows)] = sampler(logits[None, :].expand(len(rows), -1), batch).token_ids
    return {s.name: drawn[i::num_settings] for i, s in enumerate(settings)}


@pytest.fixture(scope="module")
def mixed_draws() -> dict[str, np.ndarray]:
    return draw_mixed_batches(SETTINGS + [Setting("greedy-penalties", SamplingParams(
        temperature=0.0, repetition_penalty=1.4, presence_penalty=0.9), PROMPT, OUTPUT)], ROWS_PER_SETTING)


@pytest.mark.parametrize("setting", SETTINGS, ids=[s.name for s in SETTINGS])
def test_each_setting_in_a_mixed_batch_draws_vllms_distribution(mixed_draws, setting):
    probs = reference_probs(LOGITS, setting.params, setting.prompt, setting.output)
    assert_draws_follow(mixed_draws[setting.name], probs, setting.name)


def test_a_greedy_row_among_random_rows_takes_the_penalised_argmax(mixed_draws):
    params = SamplingParams(temperature=1.0, repetition_penalty=1.4, presence_penalty=0.9)
    expected = int(np.argmax(reference_probs(LOGITS, params, PROMPT, OUTPUT)))
    assert expected != int(np.argmax(LOGITS)), "the penalties must move the argmax for this to test them"
    assert set(mixed_draws["greedy-penalties"].tolist()) == {expected}


PLAIN = [Setting(f"t{temperature}", SamplingParams(temperature=temperature)) for temperature in (0.6, 1.0, 1.7)]


def test_plain_temperature_rows_draw_the_tempered_softmax():
    """A batch with no filters and no penalties takes the fused pass: the same distribution."""
    drawn = draw_mixed_batches(PLAIN, ROWS_PER_SETTING)
    for setting in PLAIN:
        assert_draws_follow(drawn[setting.name], reference_probs(LOGITS, setting.params, [], []), setting.name)


def test_the_statistical_test_rejects_a_near_miss():
    """The test has power at this many draws: the right distribution passes, one 20% hotter fails."""
    probs = reference_probs(LOGITS, SamplingParams(temperature=1.0), [], [])
    hotter = reference_probs(LOGITS, SamplingParams(temperature=1.2), [], [])
    rng = np.random.default_rng(0)
    assert_draws_follow(rng.choice(VOCAB_SIZE, ROWS_PER_SETTING, p=probs), probs, "right")
    with pytest.raises(AssertionError, match="do not follow"):
        assert_draws_follow(rng.choice(VOCAB_SIZE, ROWS_PER_SETTING, p=hotter), probs, "hotter")


def test_the_reference_filters_are_not_vacuous():
    """Each filter removes tokens that the unfiltered distribution would draw, and keeps several."""
    plain = reference_probs(LOGITS, SamplingParams(temperature=1.0), [], [])
    for setting in SETTINGS[1:6]:
        probs = reference_probs(LOGITS, setting.params, [], [])
        kept = int((probs > 0).sum())
        tempered = reference_probs(LOGITS, SamplingParams(temperature=setting.params.temperature), [], [])
        assert 3 <= kept < VOCAB_SIZE, setting.name
        assert tempered[probs == 0].sum() > 0.01, f"{setting.name}: the filter removes too little mass to test"
        assert not np.allclose(probs, plain), setting.name
    # Top-p renormalises over the top-k tokens: over the whole vocabulary it would keep all 30 of them.
    both = reference_probs(LOGITS, SamplingParams(temperature=1.5, top_k=30, top_p=0.7), [], [])
    top_p_alone = reference_probs(LOGITS, SamplingParams(temperature=1.5, top_p=0.7), [], [])
    assert (both > 0).sum() < 30 < (top_p_alone > 0).sum()
