"""The OpenAI-compatible HTTP server: FastAPI routes over the async engine.

    POST /v1/completions        prompt(s) -> text          (SSE stream with "stream": true)
    POST /v1/chat/completions   messages -> assistant turn (rendered by the model's chat template)
    GET  /v1/models             the one model served, under its served name
    GET  /health  /version  /metrics        POST /tokenize  /detokenize

A request's life: the body is read (at most `max_request_bytes`, else 413) and
parsed strictly (else 400 naming the field); the prompt becomes token ids (chat
messages through the template); `n` samples become one engine request with n
sequences, a list of prompts one engine request each. Then either the final
outputs are collected into one JSON response, or each step's news is sent as a
server-sent event (`data: {...}\\n\\n`, ending `data: [DONE]`), one chunk per
choice that progressed. Either way a client that disconnects aborts its
requests, which frees their KV blocks.

Every error is OpenAI's body, `{"error": {"message", "type", "param", "code"}}`,
with OpenAI's status: 400 bad input, 401 bad API key, 404 unknown model or
route, 413 body too large, 503 queue full or shutting down, 500 a failed step
(400 when the step failed on the request's own parameters);
the guards of security.py add 400 unknown Host, 403 foreign web origin, 408
body too slow and 415 a POST that is not JSON.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nanovllm import __version__
from nanovllm.config import EngineConfig
from nanovllm.engine.async_engine import AsyncLLMEngine, EngineNotRunningError, OutputStream, QueueFullError
from nanovllm.engine.core import CoreInfo
from nanovllm.engine.engine import LLMEngine
from nanovllm.model.loader import EMBEDDED_MODEL
from nanovllm.outputs import CompletionOutput, RequestOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.server.metrics import StatLogger, make_registry
from nanovllm.server.openai_extras import (ChatReply, IgnoredFieldsMiddleware, ToolSetup, echo_logprobs,
                                           note_ignored_fields, structured_outputs_of)
from nanovllm.tokenizer import IncrementalDetokenizer, TokenIdTokenizer, Tokenizer
from nanovllm.server.protocol import (
    ChatCompletionChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatDelta,
    ChatLogprob, ChatLogprobs, ChatMessage, ChatResponseMessage, ChatStreamChoice, CompletionChoice, CompletionLogprobs,
    CompletionRequest, CompletionResponse, DetokenizeRequest, DetokenizeResponse, ErrorInfo, ErrorResponse,
    ModelCard, ModelList, TokenizeRequest, TokenizeResponse, TopLogprob, UsageInfo,
)
from nanovllm.server.reasoning import REASONING_PARSERS
from nanovllm.server.tool_parsers import get_tool_parser
from nanovllm.server.security import (JsonContentTypeMiddleware, SecurityConfig, add_security_middleware,
                                      error_response)
from nanovllm.tokenizer import TokenOffsets


DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_WAITING = 1024
RETRY_AFTER_SECONDS = 1
MAX_CHARS_PER_TOKEN = 256         # longer than any token of the vocabularies we serve: a bound, not an estimate
TOKENIZE_SLOTS_PER_CLIENT = 2     # a client's texts tokenized at once; its others wait their turn

RequestModel = TypeVar("RequestModel", bound=BaseModel)


@dataclass
class ServerConfig:
    served_model_name: str | None = None   # None: the model directory's name / file's stem, or the embedded name
    api_key: str | None = None             # set: every route but /health needs `Authorization: Bearer <api_key>`
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_waiting: int = DEFAULT_MAX_WAITING   # queued sequences beyond which new requests get 503
    log_interval: float = 5.0              # seconds between stat log lines while busy
    chat_template: str | None = None       # Jinja text replacing the model's chat template (--chat-template)
    reasoning_parser: str | None = None    # "qwen3": <think> text goes to reasoning_content
    tool_call_parser: str = "hermes"       # how tool_choice "auto" reads calls back (server/tool_parsers.py)
    security: SecurityConfig = field(default_factory=SecurityConfig)   # hosts, origins, timeouts

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_waiting"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.log_interval > 0:
            raise ValueError(f"log_interval must be a positive number of seconds, got {self.log_interval!r}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("the API key is empty; pass a non-empty key or none at all")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"unknown reasoning parser {self.reasoning_parser!r}; choose one of {REASONING_PARSERS}")
        get_tool_parser(self.tool_call_parser)   # raises, naming the parsers, if unknown


def default_served_model_name(model: str | None, load_format: str = "auto") -> str:
    if model is None or model == EMBEDDED_MODEL:
        return EMBEDDED_MODEL
    path = Path(model)
    if load_format == "dummy" and not path.exists():   # a built-in shape's name, e.g. qwen3-0.6b
        return model
    return path.name if path.is_dir() else path.stem


class OpenAIError(Exception):
    """An error answered with OpenAI's error body and status."""

    def __init__(self, status_code: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.info = ErrorInfo(message=message, type=type, param=param, code=code)

    def response(self) -> JSONResponse:
        # A 503 is temporary (a full queue, a restart): Retry-After tells clients when to come back.
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if self.status_code == 503 else None
        return error_response(self.status_code, **self.info.model_dump(), headers=headers)


def build_app(engine_config: EngineConfig | None = None, server_config: ServerConfig | None = None, *,
              engine: LLMEngine | None = None) -> FastAPI:
    """The server's ASGI app. Starts an engine core process for `engine_config` and waits for its
    model to load (errors surface here, before any socket is bound: EngineStartupError), or serves
    `engine` from a core loop in a thread of this process if given."""
    server_config = server_config or ServerConfig()
    if engine is None:
        async_engine = AsyncLLMEngine.launch(engine_config if engine_config is not None else EngineConfig(),
                                             server_config.max_waiting)
        tokenizer = tokenizer_for(async_engine.info)
    else:
        async_engine = AsyncLLMEngine.from_engine(engine, server_config.max_waiting)
        tokenizer = engine.tokenizer
    return build_app_for(async_engine, tokenizer, server_config)


def tokenizer_for(info: CoreInfo) -> Tokenizer:
    """The API process's tokenizer: the engine's, or the same token-id stand-in when it has none."""
    if info.token_ids_only:
        return TokenIdTokenizer(info.vocab_size, info.eos_token_ids, info.bos_token_id)
    return Tokenizer.load(info.model, info.tokenizer)


def build_app_for(async_engine: AsyncLLMEngine, tokenizer: Tokenizer, server_config: ServerConfig) -> FastAPI:
    """The routes and middleware over a started engine core."""
    server = OpenAIServer(async_engine, tokenizer, server_config)
    app = FastAPI(title="nano-vllm", version=__version__, lifespan=server.lifespan)
    app.state.server = server

    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/version", server.version, methods=["GET"])
    app.add_api_route("/metrics", server.metrics, methods=["GET"])
    app.add_api_route("/tokenize", server.tokenize, methods=["POST"])
    app.add_api_route("/detokenize", server.detokenize, methods=["POST"])
    app.add_api_route("/v1/models", server.list_models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", server.retrieve_model, methods=["GET"])
    app.add_api_route("/v1/completions", server.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", server.chat_completions, methods=["POST"])

    app.add_exception_handler(OpenAIError, _openai_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
    app.add_exception_handler(Exception, _internal_error_handler)
    # The middleware added last runs first: host, origin and key are checked before a byte of the body is read.
    app.add_middleware(JsonContentTypeMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=server.config.max_request_bytes)
    app.add_middleware(IgnoredFieldsMiddleware)
    add_security_middleware(app, server.config.security, server.config.api_key)
    return app


class OpenAIServer:
    """The endpoints, over one AsyncLLMEngine."""

    def __init__(self, async_engine: AsyncLLMEngine, tokenizer: Tokenizer, config: ServerConfig):
        info = async_engine.info
        self.config = config
        self.model_name = config.served_model_name or default_served_model_name(info.model, info.load_format)
        self.tokenizer = tokenizer
        self.vocab_size = info.vocab_size
        self.max_model_len = info.max_model_len
        self.created = int(time.time())
        self.async_engine = async_engine
        self.registry, request_metrics = make_registry(self.async_engine, self.model_name)
        self.async_engine.on_finished = request_metrics.observe
        self.stat_logger = StatLogger(self.async_engine, config.log_interval)
        self._token_texts: dict[int, str] = {}
        self._tokenize_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="nanovllm-tokenize")
        self._tokenize_slots: dict[str, _ClientSlots] = {}   # client address -> its share of the pool

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        self.async_engine.start()
        stat_logger = None
        if self.async_engine.client_index == 0:   # one log line for the whole server, from the first API process
            stat_logger = asyncio.get_running_loop().create_task(self.stat_logger.run())
        try:
            yield
        finally:
            if stat_logger is not None:
                stat_logger.cancel()
            await self.async_engine.stop()
            self._tokenize_pool.shutdown(wait=False)

    # ---- small endpoints -----------------------------------------------------------------

    async def health(self) -> Response:
        """200 while the engine runs and accepts requests; 503 once it failed or is shutting down."""
        healthy = self.async_engine.is_running and self.async_engine.accepting
        return Response(status_code=200 if healthy else 503)

    async def version(self) -> dict[str, str]:
        return {"version": __version__}

    async def metrics(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    def _model_card(self) -> ModelCard:
        return ModelCard(id=self.model_name, created=self.created, max_model_len=self.max_model_len)

    async def list_models(self) -> dict[str, Any]:
        return ModelList(data=[self._model_card()]).model_dump()

    async def retrieve_model(self, model_id: str) -> dict[str, Any]:
        self._check_model(model_id)
        return self._model_card().model_dump()

    async def tokenize(self, request: Request) -> dict[str, Any]:
        body = _parse(TokenizeRequest, await request.body())
        if body.model is not None:
            self._check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise OpenAIError(400, "send exactly one of `prompt` (text) and `messages` (a chat)")
        if body.prompt is not None:
            tokens = await self._tokenize(request, body.prompt, "prompt", lambda: self.tokenizer.encode(
                body.prompt, add_special_tokens=body.add_special_tokens))
        else:
            tokens = await self._chat_prompt(request, body.messages, body.add_generation_prompt)
        return TokenizeResponse(count=len(tokens), max_model_len=self.max_model_len, tokens=tokens).model_dump()

    async def detokenize(self, request: Request) -> dict[str, Any]:
        body = _parse(DetokenizeRequest, await request.body())
        if body.model is not None:
            self._check_model(body.model)
        self._check_token_ids(body.tokens, "tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(body.tokens)).model_dump()

    # ---- completions ---------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        body = _parse(CompletionRequest, await request.body())
        note_ignored_fields(request, body)
        self._check_model(body.model)
        _check_stream_options(body.stream, body.stream_options)
        params = _sampling_params(body)
        prompts = await self._completion_prompts(request, body.prompt, params.max_tokens)
        response_id = f"cmpl-{uuid.uuid4().hex}"
        outputs = await self._submit([(f"{response_id}-{i}", ids, params) for i, (_, ids) in enumerate(prompts)],
                                     stream=bool(body.stream))
        header = dict(id=response_id, created=int(time.time()), model=self.model_name)
        if body.stream:
            return _event_stream(self._completion_chunks(body, params, prompts, outputs, header), outputs,
                                 _include_usage(body))
        finals = await _collect_final_outputs(request, outputs)
        if finals is None:
            return Response(status_code=499)   # the client left; nobody reads this
        choices = []
        for prompt_index, final in enumerate(finals):
            prompt_text = prompts[prompt_index][0] if body.echo else ""
            for completion in final.outputs:
                logprobs = None
                if body.logprobs is not None:
                    logprobs = self._completion_logprobs(completion, body.logprobs,
                                                         TokenOffsets(self.tokenizer, params.skip_special_tokens),
                                                         len(completion.text))
                    if body.echo:   # the completion's text follows the prompt's; the prompt's logprobs first
                        logprobs.text_offset = [len(prompt_text) + offset for offset in logprobs.text_offset]
                        logprobs = echo_logprobs(final.prompt_token_ids, final.prompt_logprobs, body.logprobs,
                                                 self._token_text, logprobs)
                choices.append(CompletionChoice(index=prompt_index * params.n + completion.index,
                                                text=prompt_text + completion.text, logprobs=logprobs,
                                                finish_reason=completion.finish_reason))
        return JSONResponse(CompletionResponse(choices=choices, usage=_usage(finals), **header).model_dump())

    async def _completion_chunks(self, body: CompletionRequest, params: SamplingParams,
                                 prompts: list[tuple[str, list[int]]], outputs: OutputStream,
                                 header: dict[str, Any]) -> AsyncIterator[BaseModel]:
        prompt_index = {request_id: i for i, request_id in enumerate(outputs.request_ids)}
        progress = {index: self._choice_progress(params, stream=True) for index in range(len(prompts) * params.n)}
        if body.echo and body.logprobs is None:
            for index in progress:
                yield CompletionResponse(choices=[CompletionChoice(index=index, text=prompts[index // params.n][0])],
                                         **header)
        async for output in outputs:
            _raise_if_failed(output)
            if body.echo and body.logprobs is not None and output.prompt_logprobs is not None:
                # The prompt's log-probabilities come once, with the first token: the echo leads each choice.
                text, token_ids = prompts[prompt_index[output.request_id]]
                echoed = echo_logprobs(token_ids, output.prompt_logprobs, body.logprobs, self._token_text)
                for sample in range(params.n):
                    yield CompletionResponse(choices=[CompletionChoice(
                        index=prompt_index[output.request_id] * params.n + sample, text=text, logprobs=echoed)],
                        **header)
            for completion in output.outputs:
                index = prompt_index[output.request_id] * params.n + completion.index
                state = progress[index]
                if not state.advance(completion, body.logprobs is not None):
                    continue
                logprobs = None
                if body.logprobs is not None:
                    state.offsets = state.offsets or TokenOffsets(self.tokenizer, params.skip_special_tokens)
                    logprobs = self._completion_logprobs(completion, body.logprobs, state.offsets, state.text_length)
                    if body.echo:   # offsets in the choice's text, which begins with the prompt's
                        prompt_length = len(prompts[index // params.n][0])
                        logprobs.text_offset = [prompt_length + offset for offset in logprobs.text_offset]
                yield CompletionResponse(choices=[CompletionChoice(
                    index=index, text=completion.text, logprobs=logprobs,
                    finish_reason=completion.finish_reason)], **header)
        if _include_usage(body):
            prompt_tokens = sum(len(token_ids) for _, token_ids in prompts) * params.n
            yield CompletionResponse(choices=[], usage=_streamed_usage(prompt_tokens, progress), **header)

    async def _completion_prompts(self, request: Request, prompt: str | list[str] | list[int] | list[list[int]],
                                  max_tokens: int | None) -> list[tuple[str, list[int]]]:
        """(text, token ids) of each prompt of a completions request."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise OpenAIError(400, "prompt is an empty list; send a string, a list of strings or of token ids",
                              param="prompt")
        if isinstance(prompt[0], int):
            prompt = [prompt]
        prompts = []
        for item in prompt:
            if isinstance(item, str):
                token_ids = await self._tokenize(request, item, "prompt", lambda text=item: self.tokenizer.encode(text))
                text = item
            else:
                self._check_token_ids(item, "prompt")
                token_ids, text = item, self.tokenizer.decode(item)
            self._check_prompt_length(token_ids, "prompt", max_tokens)
            prompts.append((text, token_ids))
        return prompts

    def _completion_logprobs(self, completion: CompletionOutput, num_top: int, offsets: TokenOffsets,
                             text_length: int) -> CompletionLogprobs:
        """Logprobs of the completion's (delta's) tokens; `offsets` has seen the tokens before them, and
        `text_length` is the length of the text sent so far, this delta's included."""
        result = CompletionLogprobs()
        result.text_offset = offsets.add(completion.token_ids)
        if completion.finished:   # a stop string cut the text: its tokens start at the end
            result.text_offset = [min(offset, text_length) for offset in result.text_offset]
        for token_id, entry in zip(completion.token_ids, completion.logprobs):
            result.tokens.append(self._token_text(token_id))
            result.token_logprobs.append(entry[token_id])
            result.top_logprobs.append({self._token_text(t): logprob for t, logprob in _top(entry, num_top)})
        return result

    # ---- chat ----------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        body = _parse(ChatCompletionRequest, await request.body())
        note_ignored_fields(request, body)
        self._check_model(body.model)
        _check_stream_options(body.stream, body.stream_options)
        try:
            tools = ToolSetup.of(body, self.config.tool_call_parser)
        except ValueError as error:
            raise OpenAIError(400, str(error), param="tool_choice") from None
        params = _sampling_params(body, tools)
        prompt_token_ids = await self._chat_prompt(
            request, body.messages, add_generation_prompt=body.add_generation_prompt,
            tools=tools.tools if tools.mode != "none" else None,
            continue_final_message=body.continue_final_message, **(body.chat_template_kwargs or {}))
        self._check_prompt_length(prompt_token_ids, "messages", params.max_tokens)
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        outputs = await self._submit([(response_id, prompt_token_ids, params)], stream=bool(body.stream))
        header = dict(id=response_id, created=int(time.time()), model=self.model_name)
        reasoning = self.config.reasoning_parser is not None
        if body.stream:
            return _event_stream(self._chat_chunks(body, params, len(prompt_token_ids), outputs, header, tools),
                                 outputs,
                                 _include_usage(body))
        finals = await _collect_final_outputs(request, outputs)
        if finals is None:
            return Response(status_code=499)
        choices = []
        for completion in finals[0].outputs:
            message, finish_reason = ChatReply(tools, reasoning).message(completion.text, completion.finish_reason)
            choices.append(ChatCompletionChoice(
                index=completion.index, message=ChatResponseMessage(**message),
                logprobs=self._chat_logprobs(completion, body.top_logprobs or 0) if body.logprobs else None,
                finish_reason=finish_reason))
        return JSONResponse(ChatCompletionResponse(choices=choices, usage=_usage(finals), **header).model_dump())

    async def _chat_chunks(self, body: ChatCompletionRequest, params: SamplingParams, prompt_tokens: int,
                           outputs: OutputStream, header: dict[str, Any],
                           tools: ToolSetup) -> AsyncIterator[BaseModel]:
        progress = {index: self._choice_progress(params, stream=True) for index in range(params.n)}
        replies = {index: ChatReply(tools, self.config.reasoning_parser is not None) for index in range(params.n)}
        for index in range(params.n):
            yield ChatCompletionChunk(choices=[ChatStreamChoice(
                index=index, delta=ChatDelta(role="assistant", content=""))], **header)
        async for output in outputs:
            _raise_if_failed(output)
            for completion in output.outputs:
                if not progress[completion.index].advance(completion, bool(body.logprobs)):
                    continue
                logprobs = self._chat_logprobs(completion, body.top_logprobs or 0) if body.logprobs else None
                delta, finish_reason = replies[completion.index].delta(completion.text, completion.finished,
                                                                       completion.finish_reason)
                yield ChatCompletionChunk(choices=[ChatStreamChoice(
                    index=completion.index, delta=ChatDelta(**delta), logprobs=logprobs,
                    finish_reason=finish_reason)], **header)
        if _include_usage(body):
            yield ChatCompletionChunk(choices=[], usage=_streamed_usage(prompt_tokens, progress), **header)

    async def _chat_prompt(self, request: Request, messages: list[ChatMessage], add_generation_prompt: bool,
                           **options: Any) -> list[int]:
        """options: tools, continue_final_message and the template's own keyword arguments."""
        conversation = [message.to_template_dict() for message in messages]

        def render() -> list[int]:
            try:
                return self.tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                          chat_template=self.config.chat_template, **options)
            except Exception as error:   # no template, or the template rejects the conversation (jinja raises)
                raise OpenAIError(400, f"the chat cannot be rendered: {error}", param="messages") from None

        return await self._tokenize(request, conversation, "messages", render)

    def _chat_logprobs(self, completion: CompletionOutput, num_top: int) -> ChatLogprobs:
        content = []
        for token_id, entry in zip(completion.token_ids, completion.logprobs):
            content.append(ChatLogprob(
                token=self._token_text(token_id), logprob=entry[token_id],
                bytes=list(self.tokenizer.token_bytes(token_id)),
                top_logprobs=[TopLogprob(token=self._token_text(t), logprob=logprob,
                                         bytes=list(self.tokenizer.token_bytes(t)))
                              for t, logprob in _top(entry, num_top)]))
        return ChatLogprobs(content=content)

    # ---- shared --------------------------------------------------------------------------

    async def _tokenize(self, request: Request, text: Any, param: str, work: Callable[[], list[int]]) -> list[int]:
        """Run `work` (tokenizing or rendering `text`, a string or a conversation) off the event loop.

        Bounded before it starts: no token is longer than MAX_CHARS_PER_TOKEN characters, so a text
        longer than max_model_len of them cannot fit and is refused unread. And each client (by
        address) has at most TOKENIZE_SLOTS_PER_CLIENT texts in the pool at once, so one client's
        burst of large prompts queues behind itself, not in front of everyone else's."""
        num_chars = _text_length(text)
        if num_chars > self.max_model_len * MAX_CHARS_PER_TOKEN:
            raise OpenAIError(400, f"This model's maximum context length is {self.max_model_len} tokens, but the "
                              f"{param} has {num_chars} characters, which cannot fit; shorten it", param=param,
                              code="context_length_exceeded")
        client = request.client.host if request.client is not None else ""
        slots = self._tokenize_slots.get(client)
        if slots is None:
            slots = self._tokenize_slots[client] = _ClientSlots(asyncio.Semaphore(TOKENIZE_SLOTS_PER_CLIENT))
        slots.users += 1
        try:
            async with slots.semaphore:
                return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, work)
        except ValueError as error:   # e.g. a model without a tokenizer given text
            raise OpenAIError(400, str(error), param=param) from None
        finally:
            slots.users -= 1
            if not slots.users:
                del self._tokenize_slots[client]

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise OpenAIError(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`",
                              param="model", code="model_not_found")

    def _check_token_ids(self, token_ids: list[int], param: str) -> None:
        bad = next((t for t in token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise OpenAIError(400, f"token id {bad} is not in the vocabulary [0, {self.vocab_size})", param=param)

    def _check_prompt_length(self, prompt_token_ids: list[int], param: str, max_tokens: int | None) -> None:
        if not prompt_token_ids:
            raise OpenAIError(400, "the prompt is empty; send at least one token", param=param)
        if len(prompt_token_ids) > self.max_model_len:
            raise OpenAIError(400, f"This model's maximum context length is {self.max_model_len} tokens, but the "
                              f"prompt has {len(prompt_token_ids)} tokens; shorten it", param=param,
                              code="context_length_exceeded")
        if max_tokens is not None and len(prompt_token_ids) + max_tokens > self.max_model_len:
            raise OpenAIError(400, f"This model's maximum context length is {self.max_model_len} tokens, but "
                              f"{len(prompt_token_ids) + max_tokens} were requested ({len(prompt_token_ids)} in the "
                              f"prompt, {max_tokens} in max_tokens); shorten the prompt or lower max_tokens",
                              param="max_tokens", code="context_length_exceeded")

    def _decodes_here(self, params: SamplingParams, stream: bool) -> bool:
        """Whether this process, not the engine core, turns a request's tokens into text: a stream
        without stop strings (the core matches those in the text), when the engine makes text at all
        (not with skip_tokenizer_init). Each token decoded here is work taken off the core's loop."""
        return stream and not params.stop and self.async_engine.info.makes_text

    def _choice_progress(self, params: SamplingParams, stream: bool) -> _ChoiceProgress:
        if not self._decodes_here(params, stream):
            return _ChoiceProgress()
        return _ChoiceProgress(IncrementalDetokenizer(self.tokenizer, [], params.skip_special_tokens))

    async def _submit(self, requests: list[tuple[str, list[int], SamplingParams]], stream: bool) -> OutputStream:
        detokenize = not self._decodes_here(requests[0][2], stream)
        try:
            return await self.async_engine.add_requests(requests, stream=stream, detokenize=detokenize)
        except ValueError as error:
            raise OpenAIError(400, str(error)) from None
        except (QueueFullError, EngineNotRunningError) as error:
            raise OpenAIError(503, f"the server cannot take this request now: {error}", type="server_error",
                              code="service_unavailable") from None

    def _token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.token_text(token_id)
        return text


@dataclass
class _ClientSlots:
    semaphore: asyncio.Semaphore
    users: int = 0   # requests holding or waiting for a slot


@dataclass
class _ChoiceProgress:
    """How much of one choice a stream has sent."""
    detokenizer: IncrementalDetokenizer | None = None   # set: the deltas carry token ids only, decoded here
    num_tokens: int = 0
    text_length: int = 0                  # characters of text sent
    offsets: TokenOffsets | None = None   # completions logprobs: where each token's text starts
    done: bool = False

    def advance(self, delta: CompletionOutput, with_logprobs: bool) -> bool:
        """Count a delta in (giving it its text, when decoded here); -> whether it has anything to
        send: more text, the finish, or (when logprobs are asked) more tokens."""
        if self.done:
            return False
        if self.detokenizer is not None:
            detokenizer = self.detokenizer
            delta.text = detokenizer.add_tokens(delta.token_ids) if delta.token_ids else ""
            if delta.finished:   # text held back for a character still incomplete: what a whole decode keeps
                delta.text += detokenizer.whole_text(detokenizer.token_ids)[len(detokenizer.text):]
        self.num_tokens += len(delta.token_ids)
        self.text_length += len(delta.text)
        self.done = delta.finished
        return delta.finished or bool(delta.text) or (with_logprobs and bool(delta.token_ids))


def _text_length(text: Any) -> int:
    """Characters of a string, or of every string inside a conversation (lists and dicts)."""
    if isinstance(text, str):
        return len(text)
    if isinstance(text, dict):
        return sum(_text_length(value) for value in text.values())
    if isinstance(text, list):
        return sum(_text_length(item) for item in text)
    return 0


def _top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    """The k most likely tokens of one step's logprobs (the entry may also hold the sampled one)."""
    return sorted(entry.items(), key=lambda item: -item[1])[:k]


def _usage(finals: list[RequestOutput]) -> UsageInfo:
    prompt_tokens = sum(len(final.prompt_token_ids) for final in finals)
    completion_tokens = sum(len(completion.token_ids) for final in finals for completion in final.outputs)
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


def _streamed_usage(prompt_tokens: int, progress: dict[int, _ChoiceProgress]) -> UsageInfo:
    completion_tokens = sum(state.num_tokens for state in progress.values())
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


def _parse(model: type[RequestModel], body: bytes) -> RequestModel:
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        raise _validation_error(error) from None


def _validation_error(error: ValidationError) -> OpenAIError:
    """One 400 naming the first field at fault (with every reason when a field allows several shapes)."""
    errors = error.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return OpenAIError(400, f"the request body is not valid JSON: {first['msg']}")
    if not first["loc"]:
        return OpenAIError(400, f"the request body must be a JSON object: {first['msg']}")
    param = str(first["loc"][0])
    same_field = [e for e in errors if e["loc"] and str(e["loc"][0]) == param]
    if len(same_field) == 1:
        where = ".".join(str(part) for part in first["loc"])
        return OpenAIError(400, f"{where}: {first['msg']}", param=param)
    reasons = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in same_field)
    return OpenAIError(400, f"{param} matches none of its accepted forms ({reasons})", param=param)


def _sampling_params(body: CompletionRequest | ChatCompletionRequest, tools: ToolSetup | None = None,
                     ) -> SamplingParams:
    try:
        constraint = structured_outputs_of(body)
        tool_constraint = None if tools is None else tools.constraint(body.parallel_tool_calls)
        if constraint is not None and tool_constraint is not None:
            raise ValueError("tool_choice required or a named function is itself an output constraint; "
                             "drop response_format (or the guided_* field)")
        return body.to_sampling_params(structured_outputs=tool_constraint or constraint)
    except ValueError as error:   # SamplingParams' sentences start with the field's name
        first_word = str(error).split(" ", 1)[0]
        raise OpenAIError(400, str(error), param=first_word if first_word in type(body).model_fields else None) \
            from None


def _include_usage(body: CompletionRequest | ChatCompletionRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _check_stream_options(stream: bool | None, stream_options: Any) -> None:
    if stream_options is not None and not stream:
        raise OpenAIError(400, "stream_options is only allowed when stream is true", param="stream_options")


def _raise_if_failed(output: RequestOutput) -> None:
    """A request that failed on its own parameters or inputs is a 400, one the engine failed (a device
    error) a 500; one the server aborted (its client is still here: shutdown) a 503, never an "abort"
    finish reason, which OpenAI's API does not have."""
    if output.error is not None and output.error_in_request:
        raise OpenAIError(400, f"this request's parameters could not be run: {output.error}")
    if output.error is not None:
        raise OpenAIError(500, f"generation failed: {output.error}", type="server_error")
    if any(completion.finish_reason == "abort" for completion in output.outputs):
        raise OpenAIError(503, "the server is shutting down and stopped this request before it finished; "
                          "retry it", type="server_error", code="service_unavailable")


async def _wait_for_disconnect(request: Request) -> None:
    """Return when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect_final_outputs(request: Request, outputs: OutputStream) -> list[RequestOutput] | None:
    """The final output of each request of `outputs`, in order; None (and the requests aborted)
    if the client disconnects first."""
    finals: dict[str, RequestOutput] = {}

    async def collect() -> None:
        async for output in outputs:
            if output.finished:
                finals[output.request_id] = output

    collecting = asyncio.ensure_future(collect())
    disconnected = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({collecting, disconnected}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnected.cancel()
        if not collecting.done():
            collecting.cancel()
        outputs.close()
    if not collecting.done() or collecting.cancelled():
        return None
    try:
        collecting.result()
    except EngineNotRunningError as error:   # the engine core is gone
        raise OpenAIError(500, str(error), type="server_error") from None
    results = [finals[request_id] for request_id in outputs.request_ids]
    for final in results:
        _raise_if_failed(final)
    return results


def _event_stream(chunks: AsyncIterator[BaseModel], outputs: OutputStream, include_usage: bool) -> StreamingResponse:
    """Server-sent events: `data: <chunk JSON>` per chunk, then `data: [DONE]`. Chunks carry a `usage`
    field (null until the last) only with include_usage. An error mid-stream is sent as an OpenAI error body."""
    exclude = None if include_usage else {"usage"}

    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {chunk.model_dump_json(exclude=exclude)}\n\n"
        except OpenAIError as error:
            yield f"data: {ErrorResponse(error=error.info).model_dump_json()}\n\n"
        except EngineNotRunningError as error:
            info = ErrorInfo(message=str(error), type="server_error")
            yield f"data: {ErrorResponse(error=info).model_dump_json()}\n\n"
        finally:
            outputs.close()
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ---- errors and middleware -----------------------------------------------------------------


async def _openai_error_handler(request: Request, error: OpenAIError) -> JSONResponse:
    return error.response()


async def _http_error_handler(request: Request, error: StarletteHTTPException) -> JSONResponse:
    message = f"{error.detail}: {request.method} {request.url.path}"
    return OpenAIError(error.status_code, message, code=None).response()


async def _internal_error_handler(request: Request, error: Exception) -> JSONResponse:
    # Starlette re-raises the error after this response is sent, and uvicorn logs its traceback.
    return OpenAIError(500, f"internal error: {type(error).__name__}: {error}", type="server_error").response()


class BodyLimitMiddleware:
    """Reads the whole request body before the app sees it, and answers 413 (unparsed) once it
    exceeds `max_bytes`: by its Content-Length up front, or by counting what actually arrives."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(int(declared), scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._too_large(size, scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()   # after the body: waits for the disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, size: int, scope: Scope, receive: Receive, send: Send) -> None:
        message = (f"the request body has {size} bytes or more; the server takes at most {self.max_bytes} "
                   "(its --max-request-bytes)")
        await OpenAIError(413, message, code="request_too_large").response()(scope, receive, send)

