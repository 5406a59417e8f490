"""The parts of OpenAI's API that real clients send beyond prompts and sampling settings.

- Fields we do not implement (`store`, `metadata`, `service_tier`, ...) are accepted,
  logged once per name, and listed in the `X-Ignored-Fields` response header: agent
  frameworks send them by default and must not get a 400 for it (vLLM's behaviour).
- Structured outputs: `response_format` (`json_object`, `json_schema`), vLLM's
  `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` and
  `structured_outputs` all become one `StructuredOutputsParams` (nanovllm/structured).
- Tool calling: `tools` go to the chat template; with `tool_choice` "auto" the
  reply is read back by a tool-call parser (tool_parsers.py); "required" and a
  named function are enforced by a JSON schema, so the calls always parse:

      "required"  ->  [{"name": one of the tools, "parameters": its schema}, ...]
      named f     ->  f's parameters object itself

- `--reasoning-parser qwen3` moves `<think>` text to `reasoning_content` (reasoning.py).

`ChatReply` turns a choice's generated text into the message (non-streaming) or into
deltas (streaming); the deltas of a stream concatenate to the message.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nanovllm.server.protocol import CompletionLogprobs
from nanovllm.server.reasoning import split_reasoning
from nanovllm.server.tool_parsers import ToolCall, get_tool_parser
from nanovllm.structured import StructuredOutputsParams

logger = logging.getLogger(__name__)

IGNORED_FIELDS_HEADER = "X-Ignored-Fields"
MAX_HEADER_FIELDS = 32        # names the header lists; "... and N more" after them
MAX_LOGGED_FIELDS = 1024      # names remembered as logged; a client sending ever new ones does not grow it
_logged_ignored_fields: set[str] = set()
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


# ---- fields we ignore ----------------------------------------------------------------------

def note_ignored_fields(request: Request, body: Any) -> None:
    """Log each unknown top-level field of `body` once per process; keep the names for the header."""
    names = sorted(body.model_extra or {})
    if not names:
        return
    new = [name for name in names if name not in _logged_ignored_fields]
    if new and len(_logged_ignored_fields) < MAX_LOGGED_FIELDS:
        _logged_ignored_fields.update(new)
        logger.warning("ignoring request fields nano-vllm does not implement: %s",
                       ", ".join(_header_name(name) for name in new[:MAX_HEADER_FIELDS]))
    request.state.ignored_fields = names


def ignored_fields_header(names: list[str]) -> str:
    """The header's value: the names, each as itself if plain (letters, digits, _ . -) else as a JSON
    string in ASCII (a field name is the client's text: a newline or a non-ASCII letter in a header
    would fail the response), at most MAX_HEADER_FIELDS of them."""
    shown = [_header_name(name) for name in names[:MAX_HEADER_FIELDS]]
    if len(names) > MAX_HEADER_FIELDS:
        shown.append(f"... and {len(names) - MAX_HEADER_FIELDS} more")
    return ", ".join(shown)


def _header_name(name: str) -> str:
    return name if _PLAIN_NAME.fullmatch(name) else json.dumps(name[:64])


class IgnoredFieldsMiddleware:
    """Adds `X-Ignored-Fields: a, b` to the response of a request that carried unknown fields."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            names = scope.get("state", {}).get("ignored_fields")
            if message["type"] == "http.response.start" and names:
                message["headers"] = list(message.get("headers", [])) + [
                    (IGNORED_FIELDS_HEADER.lower().encode(), ignored_fields_header(names).encode())]
            await send(message)

        await self.app(scope, receive, send_with_header)


# ---- structured outputs -------------------------------------------------------------------

def structured_outputs_of(body: Any) -> StructuredOutputsParams | None:
    """The request's one output constraint, from whichever field carries it; ValueError if several do."""
    found: dict[str, StructuredOutputsParams] = {}
    response_format = body.response_format
    if response_format is not None:
        kind = response_format.get("type")
        if kind == "json_object":
            found["response_format"] = StructuredOutputsParams(json_object=True)
        elif kind == "json_schema":
            schema = (response_format.get("json_schema") or {}).get("schema")
            if not isinstance(schema, dict):
                raise ValueError("response_format json_schema needs json_schema.schema, a JSON schema object")
            found["response_format"] = StructuredOutputsParams(json=schema)
        elif kind != "text":
            raise ValueError(f"response_format type must be text, json_object or json_schema, got {kind!r}")
    guided = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
    for name, kind in guided.items():
        if getattr(body, name) is not None:
            found[name] = StructuredOutputsParams(**{kind: getattr(body, name)})
    if body.structured_outputs is not None:
        found["structured_outputs"] = StructuredOutputsParams.coerce(body.structured_outputs)
    if len(found) > 1:
        raise ValueError(f"send one output constraint, not several: {', '.join(found)}")
    return next(iter(found.values()), None)


# ---- tools --------------------------------------------------------------------------------

@dataclass
class ToolSetup:
    """What a chat request's tools mean for the prompt, the constraint and the reply."""
    tools: list[dict[str, Any]] | None      # for the chat template (None: no tools offered)
    mode: str                                # "none" | "auto" | "required" | "named"
    named: str | None = None                 # the function tool_choice names
    parser_name: str = "hermes"

    @classmethod
    def of(cls, body: Any, parser_name: str) -> "ToolSetup":
        tools, choice = body.tools, body.tool_choice
        for tool in tools or []:
            if tool.get("type") != "function" or not isinstance((tool.get("function") or {}).get("name"), str):
                raise ValueError('each of tools must be {"type": "function", "function": {"name": ..., ...}}')
        if not tools:
            if choice not in (None, "none"):
                raise ValueError("tool_choice needs tools; send the functions the model may call")
            return cls(None, "none", parser_name=parser_name)
        if choice is None or choice in ("none", "auto", "required"):
            return cls(tools, choice or "auto", parser_name=parser_name)
        name = ((choice or {}).get("function") or {}).get("name") if isinstance(choice, dict) else None
        if name not in {tool["function"]["name"] for tool in tools}:
            raise ValueError(f"tool_choice must be none, auto, required or {{\"type\": \"function\", \"function\": "
                             f"{{\"name\": ...}}}} naming one of the tools; got {choice!r}")
        return cls(tools, "named", name, parser_name)

    def constraint(self, parallel_tool_calls: bool | None) -> StructuredOutputsParams | None:
        """The JSON schema that enforces "required" or a named function (None otherwise)."""
        if self.mode == "named":
            return StructuredOutputsParams(json=self._parameters(self.named))
        if self.mode != "required":
            return None
        call = {"anyOf": [{"type": "object",
                           "properties": {"name": {"const": tool["function"]["name"]},
                                          "parameters": self._parameters(tool["function"]["name"])},
                           "required": ["name", "parameters"]} for tool in self.tools]}
        schema = {"type": "array", "items": call, "minItems": 1}
        if parallel_tool_calls is False:
            schema["maxItems"] = 1
        return StructuredOutputsParams(json=schema)

    def _parameters(self, name: str) -> dict[str, Any]:
        function = next(tool["function"] for tool in self.tools if tool["function"]["name"] == name)
        return function.get("parameters") or {"type": "object", "properties": {}}

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a finished reply."""
        if self.mode == "named":
            return None, [ToolCall(name=self.named, arguments=_compact(text))]
        if self.mode == "required":
            try:
                calls = json.loads(text)
                return None, [ToolCall(name=call["name"], arguments=json.dumps(call["parameters"], ensure_ascii=False))
                              for call in calls]
            except (json.JSONDecodeError, KeyError, TypeError):
                return text, []   # cut off by max_tokens: the text is all there is
        if self.mode == "auto":
            return get_tool_parser(self.parser_name).parse(text)
        return text, []


def _compact(text: str) -> str:
    try:
        return json.dumps(json.loads(text), ensure_ascii=False)
    except json.JSONDecodeError:
        return text


# ---- the reply ----------------------------------------------------------------------------

@dataclass
class ChatReply:
    """One choice's text -> OpenAI's message fields, whole or as stream deltas."""
    tools: ToolSetup
    reasoning: bool                                       # --reasoning-parser given
    text: str = ""                                        # a stream's text so far (the deltas joined)
    sent_reasoning: int = 0                               # characters of each part a stream has sent
    sent_content: int = 0

    def message(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """(message fields: content, reasoning_content, tool_calls; the finish_reason to report)."""
        reasoning, text = split_reasoning(text, True) if self.reasoning else (None, text)
        content, calls = self.tools.parse(text) if self.tools.mode != "none" else (text, [])
        if calls and finish_reason == "stop" and self.tools.mode != "named":
            finish_reason = "tool_calls"
        return {"content": content, "reasoning_content": reasoning,
                "tool_calls": [call.to_openai() for call in calls]}, finish_reason

    def delta(self, new_text: str, finished: bool, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """The delta fields once `new_text` (an output delta's text) joins the text before it (and the
        finish_reason, once finished): reasoning and tool calls are parsed from the whole text so far."""
        self.text += new_text
        text = self.text
        if finished:
            message, finish_reason = self.message(text, finish_reason)
            content = message["content"] or ""
            delta = {"reasoning_content": (message["reasoning_content"] or "")[self.sent_reasoning:] or None,
                     "content": content[self.sent_content:] or None,
                     "tool_calls": [dict(call, index=i) for i, call in enumerate(message["tool_calls"])] or None}
            return delta, finish_reason
        reasoning, content = split_reasoning(text, False) if self.reasoning else (None, text)
        content = content[:self._streamable(content)]
        delta = {"reasoning_content": (reasoning or "")[self.sent_reasoning:] or None,
                 "content": content[self.sent_content:] or None, "tool_calls": None}
        self.sent_reasoning, self.sent_content = len(reasoning or ""), max(self.sent_content, len(content))
        return delta, None

    def _streamable(self, content: str) -> int:
        """How much of the content may be sent before the reply ends: all of it without tools; with
        "required" or a named function none (it is the calls' JSON); with "auto" the text before
        where a call could begin, less trailing whitespace (dropped if a call follows)."""
        if self.tools.mode == "none":
            return len(content)
        if self.tools.mode != "auto":
            return 0
        marker = get_tool_parser(self.tools.parser_name).start_marker
        if marker == "{":
            return 0 if content.lstrip()[:1] in ("", "{", "<") else len(content.rstrip())
        start = content.find(marker)
        if start < 0:
            start = len(content) - _partial_marker_len(content, marker)
        return len(content[:start].rstrip())


def _partial_marker_len(text: str, marker: str) -> int:
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:length]):
            return length
    return 0


# ---- echo + logprobs ----------------------------------------------------------------------

def echo_logprobs(prompt_token_ids: list[int], prompt_logprobs: list[dict[int, float] | None] | None,
                  num_top: int, token_text: Callable[[int], str],
                  completion_logprobs: CompletionLogprobs | None = None) -> CompletionLogprobs:
    """Completions logprobs of the prompt (RequestOutput.prompt_logprobs; the first token has none)
    followed by the completion's own, if given: what lm-evaluation-harness reads for a log-likelihood.
    A stream sends the prompt's alone, in its first chunk."""
    result = CompletionLogprobs()
    text_offset = 0
    for token_id, entry in zip(prompt_token_ids, prompt_logprobs or []):
        token = token_text(token_id)
        result.tokens.append(token)
        result.token_logprobs.append(None if entry is None else entry[token_id])
        result.top_logprobs.append(None if entry is None else {
            token_text(t): logprob for t, logprob in sorted(entry.items(), key=lambda item: -item[1])[:num_top]})
        result.text_offset.append(text_offset)
        text_offset += len(token)
    if completion_logprobs is not None:
        for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            getattr(result, name).extend(getattr(completion_logprobs, name))
    return result
