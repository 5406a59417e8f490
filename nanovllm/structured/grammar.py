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

Each step costs the host, per constrained row, one accepted token and one mask
fill; `MaskFiller` does both for the whole batch in batched xgrammar calls (the
fill on several threads). It runs in the grammar process (grammar_process.py),
which owns every sequence's matcher (`MatcherState`); the engine keeps for each
sequence a `GrammarState` that counts the tokens sent and mirrors what the
process reported. Measured with tools/structured_probe.py (128 rows under a JSON
schema, inside a string, one fill thread, 2-core CPU): about 8 us a row to accept,
and to fill ~15 us a row on the embedded model's 49,152 tokens, ~190 us on a
128,256-token vocabulary.
"""
from __future__ import annotations

import json
import logging
import os
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
PENDING = -1       # a sampled token not on the host yet (engine/sequence.py's placeholder)


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
        # The tokens a grammar sorts: the tokenizer's, not the logits' width. An LM head may be wider
        # (padded, or a small tokenizer on a big model); its extra columns are no token, and xgrammar
        # would reject each of them one by one every step (49,152 tokens padded to 128,256: ~30x the
        # fill time). The mask leaves them out, and a token past it is never allowed (ops/bitmask.py).
        # A stop id past the tokenizer's tokens (a model config's EOS that its tokenizer lacks: dummy
        # weights beside a borrowed tokenizer) is left out while another stop id fits: widening the
        # mask to reach it would bring the extra columns back.
        tokens = len(hf_tokenizer)
        stops = [token_id for token_id in stop_token_ids if token_id < tokens] or list(stop_token_ids)
        if len(stops) < len(stop_token_ids):
            logger.warning("stop token ids %s lie past the tokenizer's %d tokens; grammars end on %s",
                           sorted(set(stop_token_ids) - set(stops)), tokens, stops)
        vocab_size = min(vocab_size, max(tokens, max(stops, default=0) + 1))
        info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size, stop_token_ids=stops)
        self._setup(info, vocab_size, stops)

    def _setup(self, info: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        self.vocab_size = vocab_size                        # the tokens a grammar sorts: ceil(V / 32) words a mask row
        self.stop_token_ids = frozenset(stop_token_ids)
        self.tokenizer_info = info
        self._compiler = _xgrammar().GrammarCompiler(info, max_threads=2)
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()

    def spec(self) -> tuple[str, int, list[int]]:
        """What another process needs to make the same compiler (`from_spec`): plain text and ints."""
        return self.tokenizer_info.serialize_json(), self.vocab_size, sorted(self.stop_token_ids)

    @classmethod
    def from_spec(cls, spec: tuple[str, int, list[int]]) -> "GrammarCompiler":
        info_json, vocab_size, stop_token_ids = spec
        compiler = cls.__new__(cls)
        compiler._setup(_xgrammar().TokenizerInfo.deserialize_json(info_json), vocab_size, stop_token_ids)
        return compiler

    def new_state(self, params: StructuredOutputsParams) -> GrammarState:
        """One sequence's grammar (compiling the constraint now if it is not cached, so that a bad one
        raises here); its matcher is made in the grammar process."""
        self.compile(params.key)
        return GrammarState(self, params.key)

    def new_matcher(self, key: tuple[str, str]) -> MatcherState:
        """A fresh matcher of the grammar of `key` (StructuredOutputsParams.key)."""
        return MatcherState(self.compile(key), self.stop_token_ids)

    def compile(self, key: tuple[str, str]) -> Any:
        """The constraint of StructuredOutputsParams.key -> an xgrammar CompiledGrammar; ValueError (saying
        what is wrong) if it does not compile."""
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
                compiled = self._compiler.compile_grammar(choice_grammar(json.loads(text)))
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
    """One sequence's place in its grammar, as the engine keeps it. The matcher itself lives in the
    grammar process (grammar_process.py) under `slot`; this side counts the output tokens sent to it
    and mirrors what it reported back."""

    __slots__ = ("compiler", "key", "slot", "num_accepted", "failed", "terminated", "__weakref__")

    def __init__(self, compiler: GrammarCompiler, key: tuple[str, str]):
        self.compiler = compiler       # the compiler whose tokenizer the grammar sorts
        self.key = key                 # StructuredOutputsParams.key: the grammar process compiles it again
        self.slot: int | None = None   # the matcher's id in the grammar process (given at its first step)
        self.num_accepted = 0          # output tokens sent to the matcher
        self.failed = False            # a token the grammar rejects was appended: only a stop token may follow
        self.terminated = False        # the matcher took a stop token

    def unseen_tokens(self, output_token_ids: list[int]) -> list[int]:
        """A copy of the output tokens the matcher has not taken yet (placeholders, PENDING, included)."""
        return output_token_ids[self.num_accepted:]

    @property
    def is_done(self) -> bool:
        """The grammar accepted a whole output (or a rejected token ended it): only a stop token may follow."""
        return self.failed or self.terminated


class MatcherState:
    """A matcher and what it has told: the grammar process keeps one per constrained sequence."""

    __slots__ = ("matcher", "stop_token_ids", "failed", "terminated")

    def __init__(self, compiled_grammar: Any, stop_token_ids: frozenset[int]):
        self.matcher = _xgrammar().GrammarMatcher(compiled_grammar)
        self.stop_token_ids = stop_token_ids   # the grammar's stop tokens
        self.failed = False       # it refused a token: only a stop token may follow
        self.terminated = False   # it took a stop token (kept here: see accept_tokens)

    @property
    def is_done(self) -> bool:
        return self.failed or self.terminated


def fill_threads() -> int:
    """Threads for the batched mask fill: half the cores this process may run on, at most 16
    (xgrammar's own default halves std::thread::hardware_concurrency(), which may count cores
    outside the process's CPU set)."""
    return max(1, min(len(os.sched_getaffinity(0)) // 2, 16))


class MaskFiller:
    """The grammar process's step: matchers take their new tokens, then fill their mask rows.

        host    [max_rows, W] int32    row r <- the tokens the r-th matcher allows next

    W = ceil(vocab_size / 32). `accept` feeds every row its tokens in one batched xgrammar call
    per token position; `fill` fills the rows of the matchers still running with xgrammar's batch
    fill on several threads, gives the rows whose grammar is done the stop-tokens-only row, and
    clears the bits past the vocabulary in the last word.
    """

    def __init__(self, vocab_size: int, stop_token_ids: list[int] | frozenset[int], threads: int | None = None):
        self.vocab_size, width = vocab_size, -(-vocab_size // 32)
        self.threads = threads or fill_threads()
        self.batch_matcher = _xgrammar().BatchGrammarMatcher(max_threads=self.threads)
        self.stop_row = torch.zeros(width, dtype=torch.int32)                                    # [W]
        for token_id in stop_token_ids:
            if token_id < vocab_size:
                self.stop_row[token_id // 32] |= _bit(token_id % 32)
        # The bits of the last word's tokens: xgrammar may set the bits past the vocabulary (a state
        # that allows every token), which would let a row take a padding column of the LM head.
        self.last_word = sum(_bit(index) for index in range(vocab_size - 32 * (width - 1)))

    def accept(self, states: list[MatcherState], tokens: list[list[int]]) -> None:
        """states[r] takes tokens[r] in order (a matcher already done takes nothing); one xgrammar call
        per token position: one in the steady state, where each row brings one new token."""
        backlog = [(state, row_tokens) for state, row_tokens in zip(states, tokens) if row_tokens]
        position = 0
        while backlog:
            live = [(state, row_tokens[position]) for state, row_tokens in backlog if not state.is_done]
            if live:
                accepted = accept_tokens([state.matcher for state, _ in live], [token_id for _, token_id in live])
                for (state, token_id), ok in zip(live, accepted):
                    if not ok:
                        state.failed = True
                    elif token_id in state.stop_token_ids:
                        state.terminated = True   # xgrammar's matcher ends on an accepted stop token
            position += 1
            backlog = [(state, row_tokens) for state, row_tokens in backlog if len(row_tokens) > position]

    def fill(self, states: list[MatcherState], host: torch.Tensor) -> torch.Tensor:
        """Row r of host [max_rows, W] <- the tokens states[r] allows next; -> those rows [R, W]."""
        num_rows = len(states)
        if num_rows > host.shape[0]:
            raise ValueError(f"{num_rows} constrained rows in one step; the grammar masks hold {host.shape[0]}")
        rows = host[:num_rows]                                                                  # [R, W]
        live_matchers, live_rows, done_rows = [], [], []
        for row, state in enumerate(states):
            if state.is_done:
                done_rows.append(row)
            else:
                live_matchers.append(state.matcher)
                live_rows.append(row)
        if done_rows:   # one numpy write (a torch row assignment costs microseconds a row; an ended grammar's
            rows.numpy()[done_rows] = self.stop_row.numpy()   # row is written every step until its sequence ends)
        if live_matchers:
            self.batch_matcher.batch_fill_next_token_bitmask(live_matchers, host, live_rows)
            rows[:, -1] &= self.last_word
        return rows


def accept_tokens(matchers: list[Any], token_ids: list[int]) -> list[bool]:
    """matchers[r] takes token_ids[r] -> whether each took it, in one xgrammar call.

    xgrammar's public batch_accept_token reads its verdicts back one foreign-function call each, and
    each call lets go of the GIL and must take it back (on the host of an H200, 2.1 us a token alone,
    over a millisecond beside another thread running Python). So the call goes to xgrammar's core, and one
    `0 in verdicts` (one call) says whether any token was refused; only then are the verdicts read
    one by one. Where xgrammar's internals differ, the public call."""
    xgr = _xgrammar()
    try:
        from xgrammar.base import _core
        handles = [matcher._handle for matcher in matchers]
    except (ImportError, AttributeError):
        return xgr.BatchGrammarMatcher.batch_accept_token(matchers, token_ids)
    verdicts = _core.BatchGrammarMatcher.batch_accept_token(handles, token_ids, False)
    if 0 not in verdicts:
        return [True] * len(matchers)
    return [bool(verdict) for verdict in verdicts]


def _known(tokens: list[int], newest_token_id: int) -> list[int]:
    """tokens up to the first placeholder, a last placeholder first replaced by newest_token_id."""
    if tokens and tokens[-1] == PENDING and newest_token_id != PENDING:
        tokens = tokens[:-1] + [newest_token_id]
    return tokens[:tokens.index(PENDING)] if PENDING in tokens else tokens


def _bit(index: int) -> int:
    """The int32 with only bit `index` set (bit 31 is the sign bit)."""
    return (1 << index) - (1 << 32 if index == 31 else 0)
