"""SamplingParams: how one request turns logits into tokens, and when it stops.

The names and defaults are vLLM's (which follow OpenAI's API), so a request
written for vLLM means the same thing here:

- `temperature` 0 is greedy (argmax); otherwise logits are divided by it and a
  token is drawn from the softmax, restricted by `top_k` (keep the k most
  likely), `top_p` (keep the smallest set whose probability reaches p) and
  `min_p` (keep tokens at least min_p times as likely as the most likely one).
- penalties reshape the logits of tokens already seen: `repetition_penalty`
  (prompt and output, multiplicative), `frequency_penalty` (per occurrence in the
  output) and `presence_penalty` (once, if it occurs in the output).
- `max_tokens`, `min_tokens`, `stop`, `stop_token_ids` and `ignore_eos` decide
  when generation ends; `logprobs` asks for the top-k log-probabilities of each
  step.
- structured outputs, logit bias and prompt log-probabilities (their own block
  below): `structured_outputs` constrains the output to a JSON schema, any JSON
  object, a regex, a choice or a grammar (nanovllm/structured); `logit_bias`
  adds a number to given tokens' logits before sampling (OpenAI's, in
  [-100, 100]); `prompt_logprobs` asks for the log-probability of each prompt
  token given the ones before it, with the top-k alternatives.

Every impossible value raises a `ValueError` whose sentence says what to change,
when the object is made: before any work is queued.
"""
from __future__ import annotations

import enum
import math
import numbers
from dataclasses import dataclass
from typing import Any

from nanovllm.structured.params import StructuredOutputsParams

# Temperatures below this are treated as greedy: dividing by ~0 only amplifies noise.
_SAMPLING_EPS = 1e-5
# The most top log-probabilities a request may ask for per token (OpenAI's cap).
MAX_LOGPROBS = 20
# The most samples one request may ask for (each is a sequence with its own KV).
MAX_N = 1024
# Integers reach the sampler as int64 tensors; anything outside that range would overflow there.
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
# A seed is any 64-bit pattern, written signed (vLLM, torch) or unsigned; nothing wraps.
SEED_MIN, SEED_MAX = -2**63, 2**64 - 1


class SamplingType(enum.IntEnum):
    GREEDY = 0   # argmax of the (penalized) logits
    RANDOM = 1   # a draw from the processed distribution, from the request's seeded stream


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0          # 0 = greedy
    top_p: float = 1.0                # in (0, 1]; 1 = off
    top_k: int = 0                    # 0 or -1 = off
    min_p: float = 0.0                # in [0, 1]; 0 = off
    presence_penalty: float = 0.0     # in [-2, 2]
    frequency_penalty: float = 0.0    # in [-2, 2]
    repetition_penalty: float = 1.0   # > 0; 1 = off
    seed: int | None = None
    max_tokens: int | None = 16       # None = up to max_model_len (the engine resolves it)
    min_tokens: int = 0
    stop: str | list[str] | None = None          # normalized to list[str]
    stop_token_ids: list[int] | None = None      # normalized to list[int]
    ignore_eos: bool = False
    logprobs: int | None = None       # number of top log-probabilities per token
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Structured outputs, logit bias, prompt log-probabilities.
    structured_outputs: StructuredOutputsParams | None = None   # a dict with its fields is taken too
    logit_bias: dict[int, float] | None = None    # token id -> added to its logit, in [-100, 100]
    prompt_logprobs: int | None = None            # top-k per prompt position (0: the prompt token's only)

    def __post_init__(self) -> None:
        self.n = _int("n", self.n, 1, MAX_N, "the number of samples per prompt")
        self.temperature = _float("temperature", self.temperature)
        self.top_p = _float("top_p", self.top_p)
        self.top_k = _int("top_k", self.top_k, -1, INT64_MAX, "-1 or 0 turn it off")
        self.min_p = _float("min_p", self.min_p)
        self.presence_penalty = _float("presence_penalty", self.presence_penalty)
        self.frequency_penalty = _float("frequency_penalty", self.frequency_penalty)
        self.repetition_penalty = _float("repetition_penalty", self.repetition_penalty)
        self.seed = None if self.seed is None else _int("seed", self.seed, SEED_MIN, SEED_MAX, "a 64-bit integer")
        self.max_tokens = None if self.max_tokens is None else _int(
            "max_tokens", self.max_tokens, 1, INT64_MAX, "or None for up to max_model_len")
        self.min_tokens = _int("min_tokens", self.min_tokens, 0, INT64_MAX, "0 turns it off")
        self.logprobs = None if self.logprobs is None else _int(
            "logprobs", self.logprobs, 0, MAX_LOGPROBS, "the number of top tokens returned per step; None for none")
        self.stop = _stop_strings(self.stop)
        self.stop_token_ids = _stop_token_ids(self.stop_token_ids)
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        self._check_ranges()
        self._check_extras()

    def _check_extras(self) -> None:
        if self.structured_outputs is not None:
            self.structured_outputs = StructuredOutputsParams.coerce(self.structured_outputs)
        self.logit_bias = _logit_bias(self.logit_bias)
        if self.prompt_logprobs is not None:
            self.prompt_logprobs = _int("prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS,
                                        "the number of top tokens returned per prompt position; None for none")

    def _check_ranges(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 turns it off), got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1] (0 turns it off), got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2] (0 turns it off), got {value}")
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty must be > 0 (1 turns it off), got {self.repetition_penalty}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens}); "
                             "raise max_tokens or lower min_tokens")

    @property
    def sampling_type(self) -> SamplingType:
        return SamplingType.GREEDY if self.is_greedy else SamplingType.RANDOM

    @property
    def has_penalties(self) -> bool:
        """Whether sampling reads the sequence's earlier tokens (repetition, frequency, presence)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def is_plain(self) -> bool:
        """Whether a token needs nothing but the step's logits and the temperature: no penalty, no
        top-k / top-p / min-p filter, no top log-probabilities, no grammar, no logit bias (the fused sampling pass; a decode
        step samples inside its CUDA graph when every row is plain and past its min_tokens)."""
        return self.is_plain_or_masked and self.structured_outputs is None

    @property
    def is_plain_or_masked(self) -> bool:
        """`is_plain`, or would be but for a grammar: the fused sampling pass over the logits once its
        mask has set the tokens it forbids to -inf (a decode step's graph then keeps its logits,
        temperatures and random-stream keys for that pass, see runner/cuda_graph.py)."""
        return (not self.has_penalties and self.logprobs is None and self.logit_bias is None
                and (self.is_greedy or (self.top_k <= 0 and self.top_p >= 1.0 and self.min_p == 0.0)))

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _SAMPLING_EPS   # (read for every row of every step: kept to one comparison)


def _float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def _int(name: str, value: Any, low: int, high: int, meaning: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high} ({meaning}), got {value}")
    return int(value)


def _stop_strings(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
    if any(s == "" for s in stop):
        raise ValueError("stop strings must not be empty; remove the empty string from stop")
    return list(stop)


def _logit_bias(bias: Any) -> dict[int, float] | None:
    """{token id: bias}; keys may be strings of digits (as JSON object keys are), values in [-100, 100]."""
    if bias is None or bias == {}:
        return None
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must map token ids to numbers, got {type(bias).__name__}")
    normalized = {}
    for token, value in bias.items():
        try:
            token_id = int(token) if not isinstance(token, bool) else -1
        except (TypeError, ValueError):
            token_id = -1
        if token_id < 0:
            raise ValueError(f"logit_bias keys must be non-negative token ids, got {token!r}")
        value = _float(f"logit_bias[{token_id}]", value)
        if not -100.0 <= value <= 100.0:
            raise ValueError(f"logit_bias values must be in [-100, 100], got {value} for token {token_id}")
        normalized[token_id] = value
    return normalized


def _stop_token_ids(ids: Any) -> list[int]:
    if ids is None:
        return []
    if (not isinstance(ids, (list, tuple))
            or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) and 0 <= i <= INT64_MAX
                       for i in ids)):
        raise ValueError(f"stop_token_ids must be a list of token ids (integers from 0 up to the vocabulary "
                         f"size), got {ids!r}")
    return [int(i) for i in ids]
