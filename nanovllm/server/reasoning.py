"""Reasoning parsers: a thinking model's `<think>...</think>` text goes to `reasoning_content`.

Qwen3 (and DeepSeek-R1 style models) write their chain of thought between
`<think>` and `</think>` before the answer. With `--reasoning-parser qwen3` the
server returns that part in `message.reasoning_content` (and `delta.reasoning_content`
when streaming) and only the answer in `content`, as vLLM does. Output that does
not start with `<think>` is all content (Qwen3 with `enable_thinking: false`).

`split_reasoning` works on the text generated so far: while the output is still
growing, a tail that may be the start of a tag is held back, so the parts it returns
only ever grow, and a stream's deltas concatenate to the final split.
"""
from __future__ import annotations

THINK_START, THINK_END = "<think>", "</think>"
REASONING_PARSERS = ("qwen3",)


def split_reasoning(text: str, finished: bool) -> tuple[str | None, str]:
    """(reasoning or None, content) of `text`; unfinished text keeps back what may begin a tag."""
    if not text.startswith(THINK_START):
        if not finished and THINK_START.startswith(text):
            return None, ""    # "<thi" may still become the tag
        return None, text
    end = text.find(THINK_END)
    if end >= 0:
        return text[len(THINK_START):end], text[end + len(THINK_END):].lstrip("\n")
    reasoning = text[len(THINK_START):]
    return reasoning[:len(reasoning) - (0 if finished else _partial_tag_len(reasoning, THINK_END))], ""


def _partial_tag_len(text: str, tag: str) -> int:
    """The length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0
