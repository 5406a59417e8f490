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

A server streams hundreds of requests at once, and one object per request per
step is most of a step's host time at that size. So the intermediate outputs
of delta streams travel as `StepDeltas`: one step's new tokens of all of them
in a few flat columns (vLLM v1's engine core outputs are the same idea);
`StepDeltas.outputs()` turns them into the `RequestOutput`s they stand for,
whose `metrics` is None (the final output carries the request's metrics whole).
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
    metrics: RequestMetrics | None               # None in a delta stream's intermediate outputs
    num_cached_tokens: int = 0                   # prompt tokens found in the prefix cache
    error: str | None = None                     # why the request failed (finish_reason "error")
    error_in_request: bool = False               # ... because of its own parameters or inputs (a client
                                                 # error, HTTP 400), not the engine's (500)
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
        self.error_in_request = later.error_in_request


@dataclass(slots=True)
class StepDeltas:
    """What one step added to the unfinished delta streams, as columns: one row per sample, the n
    samples of a request in consecutive rows in index order (every sample of a request that moved,
    even one that gained nothing). Final outputs are never here: they are whole `RequestOutput`s."""
    request_ids: list[str] = field(default_factory=list)              # [R]
    num_tokens: list[int] = field(default_factory=list)               # [R] new tokens of each row
    token_ids: list[int] = field(default_factory=list)                # [sum(num_tokens)] every row's, in row order
    texts: list[str] = field(default_factory=list)                    # [R] new text ("" when the caller decodes)
    cumulative_logprobs: list[float] = field(default_factory=list)    # [R]
    # [R] the new tokens' logprobs where the request asked for them, else None; None for no row at all.
    logprobs: list[list[dict[int, float]] | None] | None = None

    def __len__(self) -> int:
        return len(self.request_ids)

    def add(self, request_id: str, token_ids: list[int], text: str, cumulative_logprob: float,
            logprobs: list[dict[int, float]] | None) -> None:
        """Append a row: sample 0 of `request_id`, or its next sample when the row before is of the same request."""
        if logprobs is not None and self.logprobs is None:
            self.logprobs = [None] * len(self.request_ids)
        self.request_ids.append(request_id)
        self.num_tokens.append(len(token_ids))
        self.token_ids += token_ids
        self.texts.append(text)
        self.cumulative_logprobs.append(cumulative_logprob)
        if self.logprobs is not None:
            self.logprobs.append(logprobs)

    def outputs(self) -> list[RequestOutput]:
        """One delta RequestOutput per request, in row order."""
        outputs: list[RequestOutput] = []
        start = 0
        previous = None
        for row, request_id in enumerate(self.request_ids):
            end = start + self.num_tokens[row]
            if request_id == previous:
                completions = outputs[-1].outputs
            else:
                completions = []
                outputs.append(RequestOutput(request_id, None, [], completions, False, None))
                previous = request_id
            completions.append(CompletionOutput(
                len(completions), self.texts[row], self.token_ids[start:end], self.cumulative_logprobs[row],
                None if self.logprobs is None else self.logprobs[row]))
            start = end
        return outputs
