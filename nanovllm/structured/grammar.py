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
fill; `GrammarBitmask` does both for the whole batch in batched xgrammar calls
(the fill on several threads), into buffers made once, on a thread of its own
while the engine does its other work (`start`, `finish`). Measured with
tools/structured_probe.py (128 rows under a JSON schema, inside a string, one
fill thread, 2-core CPU): about 8 us a row to accept, and to fill ~15 us a row
on the embedded model's 49,152 tokens, ~190 us on a 128,256-token vocabulary.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable

import torch

from nanovllm.structured.params import StructuredOutputsParams

if TYPE_CHECKING:
    from nanovllm.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

CACHE_SIZE = 256   # compiled grammars kept (least recently used dropped first)
PENDING = -1       # a sampled token not on the host yet (engine/sequence.py's placeholder)
# The mask thread lets go of the GIL in each xgrammar call and must take it back after; while the
# engine's thread runs Python it waits for the interpreter's switch interval (5 ms by default) to
# come round. A process that builds grammar masks switches at least this often.
SWITCH_INTERVAL_S = 0.0005


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
        self.vocab_size = min(vocab_size, max(tokens, max(stops, default=0) + 1))
        self.stop_token_ids = frozenset(stops)
        info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=self.vocab_size, stop_token_ids=stops)
        self._compiler = xgr.GrammarCompiler(info, max_threads=2)
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()

    def new_state(self, params: StructuredOutputsParams) -> "GrammarState":
        """A fresh matcher for one sequence (compiling the constraint if it is not cached)."""
        return GrammarState(self.compile(params), self.vocab_size, self.stop_token_ids)

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

    __slots__ = ("matcher", "vocab_size", "stop_token_ids", "num_accepted", "failed", "terminated")

    def __init__(self, compiled_grammar: Any, vocab_size: int, stop_token_ids: frozenset[int]):
        self.matcher = _xgrammar().GrammarMatcher(compiled_grammar)
        self.vocab_size = vocab_size                # the tokens its grammar sorts: a mask row of ceil(V / 32) words
        self.stop_token_ids = stop_token_ids        # the grammar's stop tokens
        self.num_accepted = 0    # output tokens the matcher has taken
        self.failed = False      # a token the grammar rejects was appended: only a stop token may follow
        self.terminated = False  # the matcher took a stop token (its is_terminated(), kept here: see accept_tokens)

    def unseen_tokens(self, output_token_ids: list[int]) -> list[int]:
        """A copy of the output tokens the matcher has not taken yet (placeholders, PENDING, included)."""
        return output_token_ids[self.num_accepted:]

    def reject(self, token_id: int) -> None:
        """The matcher refused token_id: the sequence may only stop now."""
        logger.warning("a constrained sequence took token %d, which its grammar rejects; it is ended", token_id)
        self.failed = True

    @property
    def is_done(self) -> bool:
        """The grammar accepted a whole output (or a rejected token ended it): only a stop token may follow."""
        return self.failed or self.terminated


def fill_threads() -> int:
    """Threads for the batched mask fill: half the cores this process may run on, at most 16
    (xgrammar's own default halves std::thread::hardware_concurrency(), which may count cores
    outside the process's CPU set)."""
    return max(1, min(len(os.sched_getaffinity(0)) // 2, 16))


class GrammarBitmask:
    """The masks of a step's constrained rows, built without allocating anything per step.

        host     [max_rows, W] int32    xgrammar fills row r for the r-th constrained row (pinned on CUDA)
        bitmask  [max_rows, W] int32    the same on the device: one asynchronous copy a step
        rows     [max_rows] int64       which row of the batch's logits each mask row masks (host and device)

    W = ceil(tokenizer vocabulary / 32). Each step the matchers take the tokens sampled since
    they last ran (`accept`, one batched call), xgrammar fills the rows of the matchers still
    running on several threads, rows whose grammar is done get the stop-tokens-only row (`fill`),
    and one copy takes them to the device (`to_device`). On a GPU the runner does this after
    queueing the step's forward, so the host fills the masks while the device computes. The host
    buffers are written again only once the last copy out of them is done (an event).
    """

    def __init__(self, max_rows: int, stop_token_ids: list[int], device: torch.device | str,
                 threads: int | None = None):
        self.max_rows = max_rows
        self.stop_token_ids = list(stop_token_ids)
        self.device = torch.device(device)
        self.threads = threads or fill_threads()
        self.batch_matcher = _xgrammar().BatchGrammarMatcher(max_threads=self.threads)
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-masks")   # see start
        if sys.getswitchinterval() > SWITCH_INTERVAL_S:
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.vocab_size = 0                     # the buffers are made by the first fill, W words a row
        self.copied: torch.cuda.Event | None = None   # the last copy out of the host buffers

    def _allocate(self, vocab_size: int) -> None:
        pin = self.device.type == "cuda"
        self.vocab_size, width = vocab_size, -(-vocab_size // 32)
        self.host = torch.zeros(self.max_rows, width, dtype=torch.int32, pin_memory=pin)        # [max_rows, W]
        self.host_rows = torch.zeros(self.max_rows, dtype=torch.int64, pin_memory=pin)          # [max_rows]
        self.bitmask = torch.zeros_like(self.host, device=self.device) if pin else self.host    # [max_rows, W]
        self.rows = torch.zeros_like(self.host_rows, device=self.device) if pin else self.host_rows
        self.stop_row = torch.zeros(width, dtype=torch.int32)                                    # [W]
        for token_id in self.stop_token_ids:
            if token_id < vocab_size:
                self.stop_row[token_id // 32] |= _bit(token_id % 32)
        # The bits of the last word's tokens: xgrammar may set the bits past the vocabulary (a state
        # that allows every token), which would let a row take a padding column of the LM head.
        self.last_word = sum(_bit(index) for index in range(vocab_size - 32 * (width - 1)))

    def build(self, states: list[GrammarState], output_token_ids: list[list[int]], rows: list[int],
              newest_token_ids: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """states[r] (the grammar of logits row rows[r]) takes its unseen tokens, then -> (bitmask [R, W]
        int32, rows [R] int64) on the device, their copy queued."""
        self.accept(states, [state.unseen_tokens(ids) for state, ids in zip(states, output_token_ids)],
                    newest_token_ids)
        self.fill(states)
        return self.to_device(rows)

    def start(self, states: list[GrammarState], output_token_ids: list[list[int]],
              newest_token_ids: Callable[[], list[int] | None]) -> Future:
        """`build`'s accept and fill on the mask thread, so that the host's other work goes on meanwhile
        (xgrammar lets go of the GIL while it fills); `finish` waits for them and queues the copy. The
        unseen tokens are read now (the engine appends to the lists meanwhile); newest_token_ids is
        called on the thread (it may wait for the device)."""
        unseen = [state.unseen_tokens(ids) for state, ids in zip(states, output_token_ids)]

        def accept_and_fill() -> None:
            self.accept(states, unseen, newest_token_ids())
            self.fill(states)
        return self.thread.submit(accept_and_fill)

    def finish(self, started: Future, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Wait for `start`'s work (raising what it raised) -> `to_device(rows)`."""
        started.result()
        return self.to_device(rows)

    def accept(self, states: list[GrammarState], unseen: list[list[int]],
               newest_token_ids: list[int] | None = None) -> None:
        """Each state takes its unseen tokens (GrammarState.unseen_tokens) up to the first placeholder;
        newest_token_ids[r], unless PENDING, is the id behind a last placeholder (a token the host has
        not written in yet). One xgrammar call per token position: one in the steady state, where each
        row brings one new token."""
        newest = newest_token_ids or [PENDING] * len(states)
        backlog = [(state, tokens) for state, tail, newest_id in zip(states, unseen, newest)
                   if (tokens := _known(tail, newest_id))]
        position = 0
        while backlog:
            live = [(state, tokens[position]) for state, tokens in backlog if not state.is_done]
            for state, _ in backlog:
                state.num_accepted += 1
            if live:
                accepted = accept_tokens([state.matcher for state, _ in live], [token_id for _, token_id in live])
                for (state, token_id), ok in zip(live, accepted):
                    if not ok:
                        state.reject(token_id)
                    elif token_id in state.stop_token_ids:
                        state.terminated = True   # xgrammar's matcher ends on an accepted stop token
            position += 1
            backlog = [(state, tokens) for state, tokens in backlog if len(tokens) > position]

    def fill(self, states: list[GrammarState]) -> torch.Tensor:
        """Row r of the host buffer <- the tokens states[r] allows next; -> those rows [R, W]."""
        num_rows, vocab_size = len(states), states[0].vocab_size
        if num_rows > self.max_rows:
            raise ValueError(f"{num_rows} constrained rows in one step; the grammar masks hold {self.max_rows}")
        if vocab_size != self.vocab_size:
            self._allocate(vocab_size)
        if self.copied is not None:
            self.copied.synchronize()   # the last step's copy out of the host buffers is done
        host = self.host[:num_rows]                                                             # [R, W]
        live_matchers, live_rows = [], []
        for row, state in enumerate(states):
            if state.is_done:
                host[row] = self.stop_row
            else:
                live_matchers.append(state.matcher)
                live_rows.append(row)
        if live_matchers:
            self.batch_matcher.batch_fill_next_token_bitmask(live_matchers, self.host, live_rows)
            host[:, -1] &= self.last_word
        return host

    def to_device(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Queue the copy of the filled rows and of the logits rows they mask -> (bitmask [R, W],
        rows [R]) on the device."""
        num_rows = len(rows)
        self.host_rows[:num_rows] = torch.as_tensor(rows, dtype=torch.int64)
        if self.device.type != "cuda":
            return self.host[:num_rows], self.host_rows[:num_rows]
        self.bitmask[:num_rows].copy_(self.host[:num_rows], non_blocking=True)
        self.rows[:num_rows].copy_(self.host_rows[:num_rows], non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()
        return self.bitmask[:num_rows], self.rows[:num_rows]


def accept_tokens(matchers: list[Any], token_ids: list[int]) -> list[bool]:
    """matchers[r] takes token_ids[r] -> whether each took it, in one xgrammar call.

    xgrammar's public batch_accept_token reads its verdicts back one foreign-function call each, and
    each call lets go of the GIL and must take it back: on the mask thread, beside the engine's busy
    thread, every one of them waits its turn (on the host of an H200, 2.1 us a token alone, over a
    millisecond beside a thread running Python). So the call goes to xgrammar's core, and one
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
