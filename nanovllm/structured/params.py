"""What a request constrains its output to: one JSON schema, any JSON object, a regex, a choice or a grammar.

This is the request-side description only (plain data, checked when it is made);
`nanovllm.structured.grammar` compiles it against the tokenizer. The names are
vLLM's `StructuredOutputsParams`: exactly one of `json`, `json_object`,
`regex`, `choice`, `grammar` is set.
"""
from __future__ import annotations

import json as json_module
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StructuredOutputsParams:
    json: str | dict | None = None        # a JSON schema (a dict, or its JSON text)
    json_object: bool = False              # any JSON object (OpenAI's response_format json_object)
    regex: str | None = None               # the whole output matches this regular expression
    choice: list[str] | None = None        # the output is exactly one of these strings
    grammar: str | None = None             # an EBNF (GBNF) grammar with a `root` rule

    def __post_init__(self) -> None:
        kinds = [name for name in ("json", "json_object", "regex", "choice", "grammar")
                 if getattr(self, name) not in (None, False)]
        if len(kinds) != 1:
            raise ValueError("structured_outputs needs exactly one of json, json_object, regex, choice, grammar; "
                             f"got {kinds or 'none'}")
        if self.json is not None:
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = json_module.loads(schema)
                except json_module.JSONDecodeError as e:
                    raise ValueError(f"structured_outputs json is not valid JSON ({e}); send a JSON schema") from None
            if not isinstance(schema, (dict, bool)):
                raise ValueError(f"structured_outputs json must be a JSON schema object, got {type(schema).__name__}")
        if self.json_object is not False and self.json_object is not True:
            raise ValueError(f"structured_outputs json_object must be True or False, got {self.json_object!r}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs {name} must be a non-empty string, got {value!r}")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise ValueError(f"structured_outputs choice must be a non-empty list of non-empty strings, "
                                 f"got {self.choice!r}")
            object.__setattr__(self, "choice", list(self.choice))

    @property
    def key(self) -> tuple[str, str]:
        """(kind, canonical text): equal for requests that compile to the same grammar."""
        if self.json is not None:
            schema = self.json if not isinstance(self.json, str) else json_module.loads(self.json)
            return "json", json_module.dumps(schema, sort_keys=True, separators=(",", ":"))
        if self.json_object:
            return "json_object", ""
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            return "choice", json_module.dumps(self.choice)
        return "grammar", self.grammar

    @classmethod
    def coerce(cls, value: Any) -> "StructuredOutputsParams":
        """A StructuredOutputsParams, or a dict of its fields (as a JSON request carries it)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {"json", "json_object", "regex", "choice", "grammar"}
            if unknown:
                raise ValueError(f"structured_outputs has unknown fields {sorted(unknown)}; "
                                 "use json, json_object, regex, choice or grammar")
            return cls(**value)
        raise ValueError(f"structured_outputs must be a StructuredOutputsParams or a dict, got {type(value).__name__}")
