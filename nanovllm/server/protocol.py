"""The OpenAI API's shapes, as pydantic models.

Requests are parsed strictly: a field of the wrong JSON type (`"n": "2"`,
`"max_tokens": 1.5`) is an error, never a silent guess, and the server answers
it with a 400 naming the field, as OpenAI does. A top-level field we do not
implement (`store`, `metadata`, ...) is accepted and ignored, as vLLM does:
clients send them by default; the server logs each name once and lists them in
a response header (openai_extras.py). Ranges that OpenAI documents (`n >= 1`,
`max_tokens >= 1`, penalties in [-2, 2], ...) are checked here too, and every
integer is bounded (token ids and counts by int64, seeds to 64 bits), so no
number wraps or overflows on its way to the sampler; everything else about
sampling is checked once more by `SamplingParams`, the engine's own gate.

Beside OpenAI's fields the requests take vLLM's sampling extras (`top_k`,
`min_p`, `repetition_penalty`, `min_tokens`, `ignore_eos`, `stop_token_ids`,
...), which the official client sends through `extra_body`.

Responses mirror OpenAI's objects field for field: `text_completion`,
`chat.completion`, their streaming chunks, `usage`, `logprobs`, and the error
body `{"error": {"message", "type", "param", "code"}}`.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from nanovllm.sampling_params import INT64_MAX, MAX_LOGPROBS, SEED_MAX, SEED_MIN, SamplingParams

# OpenAI's default max_tokens for completions, also when the request sends `"max_tokens": null`.
DEFAULT_COMPLETION_MAX_TOKENS = 16

# A token id as JSON may carry it: bounded here so no number reaches the engine that int64 cannot hold
# (the server checks it against the model's vocabulary next).
TokenId = Annotated[int, Field(ge=0, le=INT64_MAX)]

# ---- errors ------------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str                 # "invalid_request_error" | "server_error"
    param: str | None = None  # the request field at fault, when there is one
    code: str | None = None   # e.g. "model_not_found", "context_length_exceeded", "invalid_api_key"


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ---- requests ----------------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class _TopLevelRequest(_Request):
    """A request body: unknown fields are kept aside (`model_extra`), not refused."""
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Request):
    include_usage: bool = False   # one last chunk, with empty choices, carries the request's usage


class _SamplingRequest(_TopLevelRequest):
    """The fields completions and chat share. None means "the default", as in OpenAI's API."""
    model: str
    n: int | None = Field(None, ge=1, le=128)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = Field(None, ge=-1, le=INT64_MAX)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int | None = Field(None, ge=0, le=INT64_MAX)
    ignore_eos: bool | None = None
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    # Structured outputs and logit bias (server/openai_extras.py turns them into SamplingParams fields)
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None, **extras: Any) -> SamplingParams:
        """SamplingParams from the fields given; ValueError if they cannot go together."""
        given = {name: getattr(self, name) for name in (
            "n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
            "repetition_penalty", "seed", "stop", "stop_token_ids", "min_tokens", "ignore_eos",
            "skip_special_tokens", "include_stop_str_in_output", "logit_bias") if getattr(self, name) is not None}
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **given, **extras)


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]   # text, texts, token ids, or lists of ids
    max_tokens: int | None = Field(DEFAULT_COMPLETION_MAX_TOKENS, ge=1, le=INT64_MAX)   # null: the default
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = None

    def to_sampling_params(self, **extras: Any) -> SamplingParams:
        max_tokens = self.max_tokens if self.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS
        # echo + logprobs: the prompt's log-probabilities too (lm-evaluation-harness's log-likelihood).
        prompt_logprobs = self.logprobs if self.echo and self.logprobs is not None else None
        return self._sampling_params(max_tokens, self.logprobs, prompt_logprobs=prompt_logprobs, **extras)


class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    # A client sends back the assistant message it received, with fields we leave out (refusal, audio, ...).
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None     # an assistant turn that called tools
    tool_call_id: str | None = None                    # a tool turn: the call it answers

    def to_template_dict(self) -> dict[str, Any]:
        """{"role", "content", ...} as chat templates expect it (text parts joined, "developer" read as
        "system", tool-call arguments as objects, as HF templates render them; "name" when the message has one)."""
        content = self.content if isinstance(self.content, str) else "".join(
            part.text for part in self.content or [])
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": content}
        if self.tool_calls is not None:
            message["tool_calls"] = [_template_tool_call(call) for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message


def _template_tool_call(call: dict[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function") or {})
    if isinstance(function.get("arguments"), str):
        try:
            function["arguments"] = json.loads(function["arguments"])
        except json.JSONDecodeError:
            pass   # the template gets the text as it came
    return {**call, "function": function}


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)              # None: up to the context length
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX)   # OpenAI's newer name for max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # Tools and the chat template
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None     # "none" | "auto" | "required" | a named function
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # e.g. {"enable_thinking": false} for Qwen3
    add_generation_prompt: bool = True                  # open the assistant's turn
    continue_final_message: bool = False                # or continue the last (assistant) message

    def to_sampling_params(self, **extras: Any) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._sampling_params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None, **extras)


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True       # for `prompt`: a BOS first if the model wants one
    add_generation_prompt: bool = True    # for `messages`: open the assistant's turn


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[TokenId]


# ---- responses ---------------------------------------------------------------------------


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """Per token of the choice's text: its string, its log-probability, the top alternatives
    (None for the first token of an echoed prompt, which has no context)."""
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)   # where each token's text starts in the choice's text


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None   # "stop" | "length" | "abort"


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None   # None in stream chunks, except the last when include_usage


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = Field(None, exclude_if=lambda value: value is None)   # --reasoning-parser
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class ChatDelta(BaseModel):
    """A choice's news in one chunk; absent fields are left out of the JSON, as OpenAI does."""
    role: Literal["assistant"] | None = Field(None, exclude_if=lambda value: value is None)   # first chunk only
    content: str | None = Field(None, exclude_if=lambda value: value is None)
    reasoning_content: str | None = Field(None, exclude_if=lambda value: value is None)
    tool_calls: list[dict[str, Any]] | None = Field(None, exclude_if=lambda value: value is None)


class ChatStreamChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nano-vllm"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
