"""Plain mode: the same panels as ASCII frames, printed every N steps.

For logs, pipes and terminals that cannot redraw: no colour, no cursor
movement, ASCII boxes, a `=== step N ===` line before each frame so a log can
be searched, and always a last frame when the run ends.
"""
from __future__ import annotations

import io
import sys
from typing import TextIO

from rich.console import Console, RenderableType

from nanovllm.viz.panels import frame
from nanovllm.viz.recorder import VizState

WIDTH = 100


def render_plain(renderable: RenderableType, width: int = WIDTH) -> str:
    """A rich renderable as plain ASCII text (no colour codes)."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False, emoji=False,
                      highlight=False, legacy_windows=False)
    console.print(renderable)
    return buffer.getvalue()


class PlainView:
    def __init__(self, every: int, file: TextIO | None = None, width: int = WIDTH):
        self.every = every
        self.file = file or sys.stdout
        self.width = width
        self.last_shown = -1

    def start(self) -> None:
        self.last_shown = -1

    def show(self, state: VizState) -> None:
        if state.step % self.every == 0:
            self._print(state)

    def stop(self, state: VizState | None = None) -> None:
        if state is not None and state.step != self.last_shown:
            self._print(state)

    def _print(self, state: VizState) -> None:
        self.file.write(f"=== step {state.step} ===\n" + render_plain(frame(state, ascii_only=True), self.width))
        self.file.flush()
        self.last_shown = state.step
