"""Sequence: the one record of a request's progress.

A request with `n` samples is `n` sequences sharing a request id and a prompt.
Each sequence is a growing list of token ids (prompt, then output) and a
counter, `num_computed_tokens`: how many of those tokens already have their K
and V in the cache. Every step the scheduler picks a chunk of the tokens not
yet computed; the runner computes them; when the chunk reaches the end of the
known tokens, the model's logits give the next token, which is appended. So a
prefill is "many tokens not yet computed" and a decode is "one": the same state,
and no prefill/decode mode anywhere.

With async scheduling (engine.py) a step is scheduled before the previous
step's tokens reach the host: a sampled token first enters `token_ids` as a
placeholder (PENDING, -1; `num_pending` counts them, at most 2) that the
runner fills on the device from the previous step's sampled tensor, and that
`fill_token` replaces with the real id once it arrives.

The KV of token i lives in block `block_table[i // block_size]`, slot
`i % block_size`. Preemption frees the blocks and resets `num_computed_tokens`
to 0: the sequence keeps its tokens and recomputes their KV when it runs again.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nanovllm.sampling_params import SamplingParams

PENDING = -1   # a sampled token whose id has not reached the host yet

if TYPE_CHECKING:
    from nanovllm.structured.grammar import GrammarState
    from nanovllm.tokenizer import IncrementalDetokenizer


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"                  # waiting again, to recompute its KV
    FINISHED_STOPPED = "finished_stopped"    # EOS, a stop token or a stop string
    FINISHED_LENGTH = "finished_length"      # max_tokens or max_model_len
    FINISHED_ABORTED = "finished_aborted"
    FINISHED_ERROR = "finished_error"        # the step that ran it failed

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
    SequenceStatus.FINISHED_ERROR: "error",
}


@dataclass(slots=True, eq=False)
class Sequence:
    seq_id: int                              # unique in the engine
    request_id: str
    index: int                               # which of the request's n samples
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    seed: int                                # this sample's RNG seed (drawn by the engine if the request gave none)
    max_tokens: int                          # sampling_params.max_tokens, resolved against max_model_len
    arrival_time: float
    prompt: str | None = None                # the prompt text, when it was given as text
    detokenizer: IncrementalDetokenizer | None = None
    detokenize_at_finish: bool = False       # nobody reads the text before the end: decode it once then
    grammar: GrammarState | None = None      # structured outputs: its matcher (nanovllm/structured)
    # The state the scheduler advances.
    token_ids: list[int] = field(default_factory=list)      # prompt + output
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0             # tokens whose K/V are in the cache
    num_cached_tokens: int = 0               # of the prompt, found in the prefix cache at first admission
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # chain hash of each full block of token_ids
    num_hashed_blocks: int = 0               # full computed blocks already offered to the prefix cache
    reads_own_tokens: bool = False           # its sampling reads its earlier tokens (penalties): see engine.py
    num_pending: int = 0                     # PENDING placeholders at the end of token_ids
    pending_row: int = -1                    # where the newest one is: its row in the last launched step's samples
    # What the request sees.
    output_text: str = ""
    stop_reason: str | int | None = None     # the stop string or stop token id that ended it
    logprobs: list[dict[int, float]] | None = None   # per output token: sampled + top-k, when asked
    cumulative_logprob: float = 0.0
    error: str | None = None
    error_in_request: bool = False           # the request's own parameters or inputs failed (a client error)
    # Prompt log-probabilities (SamplingParams.prompt_logprobs; the first sample of a request only): entry i is
    # token i's given tokens 0..i-1 with the top-k alternatives, None for token 0; filled as prefill chunks run.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    prompt_logprobs_sent: bool = False       # delta outputs: they went out once, with the first token
    num_sent_tokens: int = 0                 # delta outputs: output tokens and text characters already reported
    num_sent_chars: int = 0
    # Timing (time.time() seconds).
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    finish_time: float | None = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        self.reads_own_tokens = self.sampling_params.has_penalties   # read every step: kept as a plain field
        if self.sampling_params.logprobs is not None:
            self.logprobs = []
        if self.sampling_params.prompt_logprobs is not None and self.index == 0:
            self.prompt_logprobs = [None]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.finish_reason

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Whether some prompt token's log-probability is still to be computed (so its prefix is recomputed,
        not taken from the prefix cache, which holds K and V but no logits)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_token_ids)

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose ids the host knows (all but the pending placeholders)."""
        return len(self.token_ids) - self.num_pending

    @property
    def known_output_token_ids(self) -> list[int]:
        return self.output_token_ids[:len(self.output_token_ids) - self.num_pending]

    def add_placeholder(self, row: int) -> int:
        """Reserve the next token (sampled at `row` of the step just launched); -> its output index."""
        self.token_ids.append(PENDING)
        self.output_token_ids.append(PENDING)
        self.num_pending += 1
        self.pending_row = row
        return len(self.output_token_ids) - 1

    def drop_placeholders(self) -> None:
        """Forget tokens still pending (the sequence ended before they arrived)."""
        if self.num_pending:
            del self.token_ids[-self.num_pending:]
            del self.output_token_ids[-self.num_pending:]
            self.num_pending = 0

    def fill_token(self, output_index: int, token_id: int, logprob: float,
                   top_logprobs: dict[int, float] | None, now: float) -> None:
        """The placeholder at output_index (the oldest pending one) gets its sampled id."""
        self.output_token_ids[output_index] = token_id
        self.token_ids[self.num_prompt_tokens + output_index] = token_id
        self.num_pending -= 1
        self.cumulative_logprob += logprob
        if self.logprobs is not None:
            entry = dict(top_logprobs) if top_logprobs else {}
            entry[token_id] = logprob
            self.logprobs.append(entry)
        if self.first_token_time is None:
            self.first_token_time = now
        self.token_times.append(now)
