"""Tool-call parsers: the function calls a model writes in its own format -> OpenAI's `tool_calls`.

Models are trained to call tools in one of a few formats; the chat template
tells the model which (from the request's `tools`) and the parser reads it back:

- `hermes` (Hermes, Qwen2.5, Qwen3, SmolLM): each call is a JSON object between
  tags, `<tool_call>{"name": "f", "arguments": {...}}</tool_call>`; text before
  the first tag is ordinary content.
- `llama3_json` (Llama 3.1 / 3.2): the whole reply is one JSON object
  `{"name": "f", "parameters": {...}}` (or several joined by `;`), optionally
  after `<|python_tag|>`.

A parser returns the content left over and the calls, each with its arguments
re-serialized as a JSON string (OpenAI sends arguments as a string). Text that
does not parse stays content: a model that only mentions a tag is not calling.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass


@dataclass
class ToolCall:
    name: str
    arguments: str                                   # a JSON object, as text
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def to_openai(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def _call_from_json(text: str, arguments_key: str) -> ToolCall | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get(arguments_key, value.get("arguments", value.get("parameters", {})))
    return ToolCall(name=value["name"], arguments=json.dumps(arguments, ensure_ascii=False))


class HermesToolParser:
    name = "hermes"
    start_marker = "<tool_call>"
    _CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        start = text.find(self.start_marker)
        if start < 0:
            return text, []
        calls = [_call_from_json(body, "arguments") for body in self._CALL.findall(text[start:])]
        if not calls or None in calls:
            return text, []
        content = text[:start]
        return (content if content.strip() else None), calls


class Llama3JsonToolParser:
    name = "llama3_json"
    start_marker = "{"
    _PYTHON_TAG = "<|python_tag|>"

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        body = text.strip()
        if body.startswith(self._PYTHON_TAG):
            body = body[len(self._PYTHON_TAG):].strip()
        if not body.startswith("{"):
            return text, []
        parts = re.split(r"\}\s*;\s*\{", body)   # "{...}; {...}": the split takes the braces between
        calls = [_call_from_json(("{" if i else "") + part + ("}" if i < len(parts) - 1 else ""), "parameters")
                 for i, part in enumerate(parts)]
        if None in calls:
            return text, []
        return None, calls


TOOL_PARSERS = {parser.name: parser for parser in (HermesToolParser, Llama3JsonToolParser)}


def get_tool_parser(name: str) -> HermesToolParser | Llama3JsonToolParser:
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; choose one of {sorted(TOOL_PARSERS)}")
    return TOOL_PARSERS[name]()
