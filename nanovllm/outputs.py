"""What a request gets back, in vLLM's shape.

`RequestOutput` is one request's state at a moment: its prompt, one
`CompletionOutput` per sample (`n` of them), and whether it is finished. A
streaming caller receives one per step in which the request made progress;
each carries the full text so far (the new part is what the previous one did
not have), and the text of an unfinished output is always a prefix of the final
text (characters that might begin a stop string are held back until decided).

Copying a whole history every step costs O(length) a step, O(length^2) a
request. So a request added with `delta=True` (what the server does) gets
*delta* outputs instead: `text`, `token_ids` and `logprobs` hold only what is
new since its previous output, the prompt fields and `metrics.token_times` are
empty until the final output, which carries them whole (`prompt_logprobs` come
once, with the first token, so that an echoed prompt can lead a stream). Joining a request's
deltas in order (`RequestOutput.merge`) gives what the cumulative output would
have said.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int                                   # which of the request's n samples
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None             # sum of the sampled tokens' log-probabilities
    logprobs: list[dict[int, float]] | None      # per token: the sampled and top-k tokens' log-probabilities
    finish_reason: str | None = None             # "stop" | "length" | "abort" | "error" | None (running)
    stop_reason: str | int | None = None         # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def merge(self, later: CompletionOutput) -> None:
        """Append a later delta of the same sample to this one."""
        self.text += later.text
        self.token_ids = self.token_ids + later.token_ids
        if later.logprobs is not None:
            self.logprobs = (self.logprobs or []) + later.logprobs
        self.cumulative_logprob = later.cumulative_logprob
        self.finish_reason, self.stop_reason = later.finish_reason, later.stop_reason


@dataclass
class RequestMetrics:
    """time.time() seconds."""
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_time: float | None = None
    token_times: list[float] = field(default_factory=list)   # when each token of sample 0 was sampled

    @property
    def time_in_queue(self) -> float | None:
        """From arrival to the first step that ran the request."""
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0                   # prompt tokens found in the prefix cache
    error: str | None = None                     # why the request failed (finish_reason "error")
    # Per prompt token: its log-probability given the tokens before it, with the top-k alternatives
    # (None for the first token); None unless SamplingParams.prompt_logprobs asked.
    prompt_logprobs: list[dict[int, float] | None] | None = None

    def merge(self, later: RequestOutput) -> None:
        """Append a later delta output of the same request to this one (a slow reader gets one joined
        output instead of a backlog)."""
        for completion, later_completion in zip(self.outputs, later.outputs):
            completion.merge(later_completion)
        if later.finished:
            self.prompt, self.prompt_token_ids = later.prompt, later.prompt_token_ids
        if later.prompt_logprobs is not None:
            self.prompt_logprobs = later.prompt_logprobs
        self.finished, self.metrics = later.finished, later.metrics
        self.num_cached_tokens, self.error = later.num_cached_tokens, later.error
