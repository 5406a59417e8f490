"""Grammars compiled against the tokenizer, and one matcher per constrained sequence.

A constraint (a JSON schema, a regex, ...) describes *text*; sampling picks
*tokens*. xgrammar bridges the two: it compiles the constraint into a pushdown
automaton over bytes and precomputes, for each of its states, which tokens of
the vocabulary can follow (most of them context-free, so the per-step work is
small). A compiled grammar is immutable and shared; a `GrammarMatcher` walks it
for one sequence, accepting each sampled token and answering "which tokens may
come next?" as a bitmask (ops/bitmask.py).

Compiling costs milliseconds (a nested JSON schema took ~4 ms on the embedded
model's 49,152-token vocabulary, a regex ~0.5 ms) and happens when a request is
added, never inside a step; `GrammarCompiler` caches the results by the
constraint's canonical text, so a schema sent a thousand times compiles once.

When the grammar has accepted a complete output, its mask allows only the stop
tokens (EOS), so the sequence ends with finish_reason "stop".
"""
from __future__ import annotations

import functools
import json
import logging
import re
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch

from nanovllm.structured.params import StructuredOutputsParams

if TYPE_CHECKING:
    from nanovllm.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

CACHE_SIZE = 256   # compiled grammars kept (least recently used dropped first)


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError:
        raise ValueError("structured outputs need the xgrammar package; install it with "
                         "`pip install 'nano-vllm[structured]'`") from None
    return xgrammar


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose language is exactly `choices` (JSON string escapes are EBNF's too)."""
    return "root ::= " + " | ".join(json.dumps(choice) for choice in choices)


class GrammarCompiler:
    """Compiles StructuredOutputsParams for one tokenizer; thread-safe, cached by constraint."""

    def __init__(self, tokenizer: "Tokenizer", vocab_size: int, stop_token_ids: list[int]):
        hf_tokenizer = getattr(tokenizer, "_hf", None)
        if hf_tokenizer is None:
            raise ValueError("structured outputs need a HuggingFace tokenizer (tokenizer.json); this model's "
                             "tokenizer has none")
        xgr = _xgrammar()
        self.vocab_size = vocab_size   # the logits' width (may exceed the tokenizer's vocabulary)
        info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=list(stop_token_ids))
        self._compiler = xgr.GrammarCompiler(info, max_threads=2)
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()

    def new_state(self, params: StructuredOutputsParams) -> "GrammarState":
        """A fresh matcher for one sequence (compiling the constraint if it is not cached)."""
        return GrammarState(self.compile(params), self.vocab_size)

    def compile(self, params: StructuredOutputsParams) -> Any:
        """-> an xgrammar CompiledGrammar; ValueError (saying what is wrong) if it does not compile."""
        key = params.key
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                return compiled
        kind, text = key
        try:
            if kind == "json":
                compiled = self._compiler.compile_json_schema(text, any_whitespace=False)
            elif kind == "json_object":
                compiled = self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            elif kind == "regex":
                compiled = self._compiler.compile_regex(text)
            elif kind == "choice":
                compiled = self._compiler.compile_grammar(choice_grammar(params.choice))
            else:
                compiled = self._compiler.compile_grammar(text)
        except (RuntimeError, ValueError, TypeError) as e:
            message = re.sub(r"^\[[^\]]*\] \S+: ", "", str(e)).strip()   # drop xgrammar's time and source line
            raise ValueError(f"the structured_outputs {kind} does not compile: {message}") from None
        with self._lock:
            self._cache[key] = compiled
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled


class GrammarState:
    """One sequence's place in its grammar: an xgrammar GrammarMatcher fed the sequence's output tokens."""

    __slots__ = ("matcher", "bitmask_width", "num_accepted", "failed")

    def __init__(self, compiled_grammar: Any, vocab_size: int):
        self.matcher = _xgrammar().GrammarMatcher(compiled_grammar)
        self.bitmask_width = -(-vocab_size // 32)   # int32 words of its bitmask row
        self.num_accepted = 0    # output tokens the matcher has taken
        self.failed = False      # a token the grammar rejects was appended: only a stop token may follow

    def catch_up(self, output_token_ids: list[int]) -> None:
        """Accept the output tokens the matcher has not seen yet (stops at a pending placeholder, -1)."""
        while self.num_accepted < len(output_token_ids):
            token_id = output_token_ids[self.num_accepted]
            if token_id < 0:
                return
            if not self.failed and not self.matcher.is_terminated() and not self.matcher.accept_token(token_id):
                logger.warning("a constrained sequence took token %d, which its grammar rejects; it is ended",
                               token_id)
                self.failed = True
            self.num_accepted += 1

    @property
    def is_done(self) -> bool:
        """The grammar accepted a whole output (or a rejected token ended it): only a stop token may follow."""
        return self.failed or self.matcher.is_terminated()


@functools.cache
def _batch_matcher() -> Any:
    """xgrammar's batch filler: the masks of many matchers in parallel, on half the host's cores."""
    return _xgrammar().BatchGrammarMatcher()


def grammar_bitmask(states: list[GrammarState], output_token_ids: list[list[int]],
                    stop_token_ids: list[int]) -> torch.Tensor:
    """Each state takes the output tokens it has not seen, then row r of the result (int32 [R, W] on the
    host) holds the tokens states[r] allows next."""
    bitmask = torch.zeros(len(states), states[0].bitmask_width, dtype=torch.int32)   # [R, W]
    live_matchers, live_rows = [], []
    for row, (state, token_ids) in enumerate(zip(states, output_token_ids)):
        state.catch_up(token_ids)
        if state.is_done:
            for token_id in stop_token_ids:
                bitmask[row, token_id // 32] |= _bit(token_id % 32)
        else:
            live_matchers.append(state.matcher)
            live_rows.append(row)
    if live_matchers:
        _batch_matcher().batch_fill_next_token_bitmask(live_matchers, bitmask, live_rows)
    return bitmask


def _bit(index: int) -> int:
    """The int32 with only bit `index` set (bit 31 is the sign bit)."""
    return (1 << index) - (1 << 32 if index == 31 else 0)
