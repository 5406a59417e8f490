"""Live mode: the panels redrawn in place after every step, in colour (rich's `Live`).

The frame is rebuilt from a fresh `VizState` each time; rich diffs nothing, it
just moves the cursor back up and repaints, which a terminal does in a few
milliseconds. A short terminal gets fewer heat-map rows, so the whole frame
fits. The last frame stays on the screen when the run ends.
"""
from __future__ import annotations

from rich.console import Console
from rich.live import Live

from nanovllm.viz.panels import frame
from nanovllm.viz.recorder import VizState


class LiveView:
    def __init__(self, console: Console | None = None):
        self.console = console or Console()
        self.live: Live | None = None

    def start(self) -> None:
        self.live = Live(console=self.console, auto_refresh=False, vertical_overflow="crop")
        self.live.start()

    def show(self, state: VizState) -> None:
        if self.live is not None:
            self.live.update(frame(state, height=self.console.size.height), refresh=True)

    def stop(self, state: VizState | None = None) -> None:
        if self.live is None:
            return
        if state is not None:
            self.live.update(frame(state, height=self.console.size.height), refresh=True)
        self.live.stop()
        self.live = None
