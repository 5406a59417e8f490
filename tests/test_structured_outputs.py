"""Structured outputs on the embedded model: every sample obeys its constraint, checked by
oracles we did not write (jsonschema, Python's re), and the constraint of one row changes
nothing for the other rows of its batch."""
from __future__ import annotations

import json
import re

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.runner.sampler import Sampler, SamplingBatch
from nanovllm.structured import StructuredOutputsParams

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

# Nested objects, arrays, enums, required fields; one-letter keys and bounded values keep samples short
# (the 48 samples below are the costliest CPU test of structured outputs: a wrong mask shows in a few).
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "n": {"type": "string", "maxLength": 4},
        "r": {"enum": ["admin", "user", "guest"]},
        "h": {
            "type": "object",
            "properties": {"c": {"type": "string", "maxLength": 4},
                           "z": {"type": "integer", "minimum": 0, "maximum": 99}},
            "required": ["c", "z"],
        },
        "t": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 2},
    },
    "required": ["n", "r", "h", "t"],
}
PROMPT = "Here is a user record:"


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(max_num_seqs=48)


REGEX = r"[A-Z][a-z]{1,3}-[0-9]{2,3}"
CHOICES = ["red", "green", "dark blue", 'say "hi"']
NUM_SAMPLES = 16


@pytest.fixture(scope="module")
def samples(llm) -> dict[str, list]:
    """16 samples at temperature 1.0 under each of a JSON schema, a regex and a choice, in one batch."""
    constraints = {"json": {"json": PERSON_SCHEMA}, "regex": StructuredOutputsParams(regex=REGEX),
                   "choice": {"choice": CHOICES}}
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=80, structured_outputs=constraint)
              for constraint in constraints.values() for seed in range(NUM_SAMPLES)]
    outputs = llm.generate([PROMPT] * len(params), params, use_tqdm=False)
    return {kind: [o.outputs[0] for o in outputs[i * NUM_SAMPLES:(i + 1) * NUM_SAMPLES]]
            for i, kind in enumerate(constraints)}


def test_sixteen_samples_at_temperature_one_validate_against_the_json_schema(samples):
    for output in samples["json"]:
        assert output.finish_reason == "stop", output.text
        jsonschema.validate(json.loads(output.text), PERSON_SCHEMA)


def test_sixteen_samples_match_the_regex_in_full(samples):
    for output in samples["regex"]:
        assert output.finish_reason == "stop" and re.fullmatch(REGEX, output.text), output.text


def test_sixteen_samples_are_one_of_the_choices(samples):
    texts = [output.text for output in samples["choice"]]
    assert all(output.finish_reason == "stop" for output in samples["choice"])
    assert set(texts) <= set(CHOICES) and len(set(texts)) > 1, texts


def test_json_object_mode_starts_a_json_object(llm):
    params = SamplingParams(temperature=0, max_tokens=8, structured_outputs={"json_object": True})
    assert llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].text.startswith("{")


def test_unconstrained_rows_sample_the_same_tokens_beside_constrained_ones(llm):
    free = [SamplingParams(temperature=0, max_tokens=12), SamplingParams(temperature=1.0, seed=7, max_tokens=12)]
    alone = llm.generate([PROMPT, "Once upon a time"], free, use_tqdm=False)
    constrained = SamplingParams(temperature=1.0, seed=1, max_tokens=12, structured_outputs={"regex": "[0-9]+"})
    mixed = llm.generate([PROMPT, PROMPT, "Once upon a time", PROMPT],
                         [constrained, free[0], free[1], constrained], use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == alone[0].outputs[0].token_ids
    assert mixed[2].outputs[0].token_ids == alone[1].outputs[0].token_ids
    assert re.fullmatch("[0-9]+", mixed[0].outputs[0].text)


def test_a_constraint_that_does_not_compile_is_refused_before_anything_runs(llm):
    with pytest.raises(ValueError, match="regex does not compile"):
        llm.generate([PROMPT], SamplingParams(structured_outputs={"regex": "(unclosed"}), use_tqdm=False)
    with pytest.raises(ValueError, match="exactly one of"):
        SamplingParams(structured_outputs={"regex": "a", "choice": ["a"]})
    with pytest.raises(ValueError, match="not valid JSON"):
        SamplingParams(structured_outputs={"json": "{nope"})
    assert not llm.engine.has_unfinished_requests()


def test_logit_bias_of_100_forces_a_token_and_minus_100_forbids_one(llm):
    tokenizer = llm.get_tokenizer()
    forced = tokenizer.encode(" banana", add_special_tokens=False)[0]
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=4, logit_bias={str(forced): 100})
    assert llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids == [forced] * 4
    greedy = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    first = greedy[0].outputs[0].token_ids[0]
    banned = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1, logit_bias={first: -100}),
                          use_tqdm=False)
    assert banned[0].outputs[0].token_ids[0] != first
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([PROMPT], SamplingParams(logit_bias={10**7: 1.0}), use_tqdm=False)
    with pytest.raises(ValueError, match=r"\[-100, 100\]"):
        SamplingParams(logit_bias={1: 101})


def test_the_sampler_masks_only_the_constrained_rows_and_adds_the_bias_to_its_row():
    vocab_size = 70
    logits = torch.randn(3, vocab_size, generator=torch.Generator().manual_seed(0))
    bitmask = torch.zeros(1, 3, dtype=torch.int32)
    bitmask[0, 1] = 1 << 5                                  # row 2 may take token 37 only
    batch = SamplingBatch.build([SamplingParams(temperature=0, logit_bias={3: 50.0})] + [SamplingParams(temperature=0)] * 2,
                                [0, 0, 0], [0, 0, 0], [[1]] * 3, [[]] * 3, [0], "cpu")
    batch.bitmask, batch.bitmask_rows = bitmask, torch.tensor([2])
    tokens = Sampler()(logits.clone(), batch).token_ids
    assert tokens == [3, int(logits[1].argmax()), 37]


def test_with_async_scheduling_constrained_rows_sample_what_they_sample_without(llm, monkeypatch):
    # Each step's masks wait for the last step's tokens, and its sampling for its masks (DeferredSamples):
    # the same tokens either way, every one of them allowed.
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=16, structured_outputs={"regex": REGEX})
              for seed in range(6)] + [SamplingParams(temperature=1.0, seed=9, max_tokens=16)]
    prompts = [PROMPT] * 6 + ["Once upon a time"]
    plain = llm.generate(prompts, params, use_tqdm=False)
    monkeypatch.setattr(llm.engine.config, "async_scheduling", True)   # read by every step: the same engine
    overlapped = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in overlapped] == [o.outputs[0].token_ids for o in plain]
    for output in overlapped[:6]:
        assert re.fullmatch(REGEX, output.outputs[0].text), output.outputs[0].text


def test_a_masked_token_never_wins_the_race_even_where_its_exponential_rounds_to_zero(monkeypatch):
    import nanovllm.ops.sampling as sampling
    vocab_size = 2048
    scores = torch.full((1, vocab_size), float("-inf"))
    scores[0, 7] = 0.0                                   # the one token the mask allows
    uniform = torch.full((1, vocab_size), 0.5)
    uniform[0, 1500] = 1.0                               # CPU log rounds u just below 1 to log u = 0
    monkeypatch.setattr(sampling, "random_uniform", lambda keys, size: uniform.clone())
    assert sampling.exponential_race_torch(scores, torch.tensor([1])).tolist() == [7]


def test_a_stop_id_past_the_tokenizer_does_not_widen_the_mask_while_another_fits(llm):
    """Dummy weights of a big model beside a small tokenizer: the config's EOS ids lie past the
    tokenizer; the grammar ends on the tokenizer's own, and the mask stays the tokenizer's width
    (reaching the far ids made xgrammar sort every column between, ten times the work a step)."""
    from nanovllm.structured.grammar import GrammarCompiler
    tokenizer = llm.get_tokenizer()
    inside = list(llm.engine.eos_token_ids)
    far = tokenizer.vocab_size + 5000
    compiler = GrammarCompiler(tokenizer, far + 1000, inside + [far])
    assert compiler.vocab_size == tokenizer.vocab_size
    only_far = GrammarCompiler(tokenizer, far + 1000, [far])     # no stop id fits: the mask reaches it
    assert only_far.vocab_size == far + 1


def test_a_constrained_row_never_takes_a_padding_column_of_a_wider_lm_head(llm):
    from nanovllm.structured.grammar import GrammarCompiler
    tokenizer = llm.get_tokenizer()
    eos = llm.engine.eos_token_ids
    compiler = GrammarCompiler(tokenizer, tokenizer.vocab_size + 100, eos)   # logits 100 columns wider
    assert compiler.vocab_size == tokenizer.vocab_size                       # the mask covers the tokenizer's only
    state = compiler.new_state(StructuredOutputsParams(regex="[a-z]+"))
    logits = torch.zeros(2, tokenizer.vocab_size + 100)
    logits[:, tokenizer.vocab_size:] = 50.0                                  # the padding columns lead
    batch = SamplingBatch.build([SamplingParams(temperature=0)] * 2, [0, 0], [0, 0], [[1]] * 2, [[], []], eos,
                                "cpu", grammars=[None, state])
    free, constrained = Sampler()(logits, batch).token_ids
    assert free >= tokenizer.vocab_size
    assert re.fullmatch("[a-z]+", tokenizer.decode([constrained]).strip()), constrained


def test_the_batched_accept_gives_each_row_its_own_verdict(llm, monkeypatch):
    """40 rows take their tokens in one call: each row's matcher takes its own token, and the rows whose
    token the grammar rejects (every third) are the ones ended, through xgrammar's core as through its
    public call; a stop token accepted ends the grammar."""
    from nanovllm.structured import grammar
    tokenizer = llm.get_tokenizer()
    compiler = grammar.GrammarCompiler(tokenizer, tokenizer.vocab_size, llm.engine.eos_token_ids)
    digit, letter = tokenizer.encode("7", add_special_tokens=False)[0], tokenizer.encode("q", add_special_tokens=False)[0]
    tokens = [[letter if row % 3 == 0 else digit] for row in range(40)]
    verdicts = []
    for fast in (True, False):
        if not fast:   # xgrammar's internals missing: the public call
            monkeypatch.setattr(grammar, "accept_tokens", lambda matchers, token_ids: grammar._xgrammar()
                                .BatchGrammarMatcher.batch_accept_token(matchers, token_ids))
        filler = grammar.MaskFiller(compiler.vocab_size, compiler.stop_token_ids, threads=1)
        states = [compiler.new_matcher(StructuredOutputsParams(regex="[0-9]+").key) for _ in range(40)]
        filler.accept(states, tokens)
        host = filler.fill(states, torch.zeros(64, -(-compiler.vocab_size // 32), dtype=torch.int32))
        verdicts.append(([state.failed for state in states], host.clone()))
        stop = min(compiler.stop_token_ids)
        filler.accept(states[1:2], [[stop]])
        assert states[1].is_done and states[1].matcher.is_terminated() and not states[1].failed
    assert verdicts[0][0] == [row % 3 == 0 for row in range(40)]
    assert verdicts[0][0] == verdicts[1][0] and torch.equal(verdicts[0][1], verdicts[1][1])


def test_the_mask_never_allows_a_token_past_the_vocabulary_whatever_xgrammar_fills(llm, monkeypatch):
    """xgrammar may set the bits past the vocabulary in the last word of a row (a state that allows
    every token); the filled rows keep only the vocabulary's bits, so a padding column of a wider LM head
    stays out of reach."""
    from nanovllm.structured.grammar import GrammarCompiler, MaskFiller
    tokenizer = llm.get_tokenizer()
    vocab_size = tokenizer.vocab_size - 3                      # a vocabulary that ends inside a word
    compiler = GrammarCompiler(tokenizer, vocab_size, llm.engine.eos_token_ids)
    states = [compiler.new_matcher(StructuredOutputsParams(regex="[a-z]+").key) for _ in range(2)]
    filler = MaskFiller(compiler.vocab_size, compiler.stop_token_ids, threads=1)

    class EveryToken:   # xgrammar's batched fill, setting every bit of its rows
        def batch_fill_next_token_bitmask(self, matchers, bitmask, rows):
            bitmask[rows] = -1
    filler.batch_matcher = EveryToken()
    host = filler.fill(states, torch.zeros(4, -(-vocab_size // 32), dtype=torch.int32))
    allowed = [(word >> bit) & 1 for word in host[0].tolist() for bit in range(32)]
    assert allowed[:vocab_size] == [1] * vocab_size and not any(allowed[vocab_size:])
