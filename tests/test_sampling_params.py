"""SamplingParams: vLLM's names and defaults, and a clear ValueError for every impossible value."""
import pytest

from nanovllm.sampling_params import MAX_LOGPROBS, MAX_N, SamplingParams, SamplingType


def test_defaults_are_vllms():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.seed, p.max_tokens, p.min_tokens, p.logprobs) == (None, 16, 0, None)
    assert (p.ignore_eos, p.skip_special_tokens, p.include_stop_str_in_output) == (False, True, False)
    assert p.stop == [] and p.stop_token_ids == []


def test_a_single_stop_string_becomes_a_list():
    assert SamplingParams(stop="x").stop == ["x"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]


def test_temperature_zero_and_below_epsilon_are_greedy():
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(temperature=1e-7).sampling_type == SamplingType.GREEDY
    assert SamplingParams(temperature=0.5).sampling_type == SamplingType.RANDOM
    assert not SamplingParams().is_greedy


def test_integers_are_accepted_where_floats_are_expected():
    p = SamplingParams(temperature=1, top_p=1, repetition_penalty=2)
    assert isinstance(p.temperature, float) and p.repetition_penalty == 2.0


def test_edge_values_that_are_possible_are_accepted():
    SamplingParams(top_k=-1)
    SamplingParams(top_p=1e-3, min_p=1.0, presence_penalty=-2, frequency_penalty=2)
    SamplingParams(max_tokens=None, min_tokens=1000)
    SamplingParams(max_tokens=5, min_tokens=5, logprobs=0)
    SamplingParams(logprobs=MAX_LOGPROBS, seed=-3)
    SamplingParams(seed=2**64 - 1, top_k=2**63 - 1, n=MAX_N, stop_token_ids=[2**63 - 1])


@pytest.mark.parametrize("kwargs, words", [
    ({"temperature": -1.0}, ["temperature", ">= 0", "greedy", "-1.0"]),
    ({"top_p": 0.0}, ["top_p", "(0, 1]"]),
    ({"top_p": 1.5}, ["top_p", "(0, 1]", "1.5"]),
    ({"top_k": -2}, ["top_k", "-2"]),
    ({"min_p": -0.1}, ["min_p", "[0, 1]"]),
    ({"min_p": 1.1}, ["min_p", "[0, 1]"]),
    ({"n": 0}, ["n must be between 1 and", "got 0"]),
    ({"n": MAX_N + 1}, ["n must be between 1 and", str(MAX_N)]),
    ({"max_tokens": 0}, ["max_tokens", "between 1 and"]),
    ({"min_tokens": -1}, ["min_tokens", "between 0 and"]),
    # Each of these overflowed int64 when the sampling batch was built, failing every request batched with it.
    ({"top_k": 2**63}, ["top_k", str(2**63 - 1)]),
    ({"min_tokens": 2**63, "max_tokens": None}, ["min_tokens", str(2**63 - 1)]),
    ({"max_tokens": 2**63}, ["max_tokens", str(2**63 - 1)]),
    ({"stop_token_ids": [2**63]}, ["stop_token_ids", "token ids"]),
    ({"seed": 2**64}, ["seed", "64-bit", str(2**64 - 1)]),
    ({"seed": -2**63 - 1}, ["seed", "64-bit"]),
    ({"max_tokens": 4, "min_tokens": 5}, ["min_tokens (5)", "max_tokens (4)"]),
    ({"logprobs": -1}, ["logprobs", "between 0 and"]),
    ({"logprobs": MAX_LOGPROBS + 1}, ["logprobs", str(MAX_LOGPROBS)]),
    ({"repetition_penalty": 0.0}, ["repetition_penalty", "> 0"]),
    ({"presence_penalty": 2.5}, ["presence_penalty", "[-2, 2]"]),
    ({"frequency_penalty": -3}, ["frequency_penalty", "[-2, 2]"]),
    ({"temperature": float("nan")}, ["temperature", "finite"]),
    ({"top_p": float("inf")}, ["top_p", "finite"]),
    ({"stop": [""]}, ["stop strings must not be empty"]),
])
def test_impossible_value_raises_a_sentence_naming_it(kwargs, words):
    with pytest.raises(ValueError) as error:
        SamplingParams(**kwargs)
    for word in words:
        assert word in str(error.value)


@pytest.mark.parametrize("kwargs, words", [
    ({"temperature": "0.5"}, ["temperature must be a number", "str"]),
    ({"top_p": None}, ["top_p must be a number"]),
    ({"top_k": 1.5}, ["top_k must be an integer"]),
    ({"n": True}, ["n must be an integer", "bool"]),
    ({"max_tokens": "16"}, ["max_tokens must be an integer"]),
    ({"seed": 1.0}, ["seed must be an integer"]),
    ({"stop": [1]}, ["stop must be a string or a list of strings"]),
    ({"stop": 5}, ["stop must be a string or a list of strings"]),
    ({"stop_token_ids": ["a"]}, ["stop_token_ids"]),
    ({"stop_token_ids": [-1]}, ["stop_token_ids", "token ids"]),
    ({"ignore_eos": "yes"}, ["ignore_eos must be True or False"]),
    ({"skip_special_tokens": 1}, ["skip_special_tokens must be True or False"]),
])
def test_wrong_type_raises_a_sentence_naming_it(kwargs, words):
    with pytest.raises(ValueError) as error:
        SamplingParams(**kwargs)
    for word in words:
        assert word in str(error.value)
