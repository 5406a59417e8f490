"""Time GPU work with no launch overhead: capture it into a CUDA graph, replay, time with events."""
from __future__ import annotations

from typing import Callable

import torch


def graph_time_us(fn: Callable[[], object], calls: int = 1, replays: int = 50, warmup: int = 10) -> float:
    """`fn` run `calls` times in a row inside one CUDA graph -> microseconds per call of `fn`, the
    mean over `replays` replays (after one eager run, to compile, and `warmup` replays)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    for _ in range(warmup):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (calls * replays)
