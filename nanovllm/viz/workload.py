"""Running a workload through the engine: arrivals, the step loop, the summary.

A workload is a list of `Arrival`s: a request and the engine step at which it
arrives (all at step 0 for `-i` prompts; staggered for `--demo`). The loop adds
what is due, calls `engine.step()`, hands every `RequestOutput` to the caller
(who streams the new text), and times each step. A step that computed prompt
tokens counts toward the prefill rate (decodes riding along included); a step
of decodes only, toward the decode rate. Peak KV usage is read between steps
from the block manager's free count (O(1)).

`Visualizer` is the optional part: the step observer, the attention hooks and
a view (live or plain). With it absent nothing is registered on the engine.
Its own time (hooks, drawing) is subtracted from the step times.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from nanovllm.engine.engine import LLMEngine, Prompt
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.viz.attention import AttentionCapture, AttentionView
from nanovllm.viz.live import LiveView
from nanovllm.viz.plain import PlainView
from nanovllm.viz.recorder import VizRecorder, VizState


@dataclass
class Arrival:
    step: int                         # the engine step before which the request is added
    request_id: str
    prompt: Prompt
    params: SamplingParams
    prompt_text: str = ""             # how to show the prompt (its text, or the chat it was rendered from)


@dataclass
class RunResult:
    kv_policy: str
    outputs: dict[str, RequestOutput]                 # final outputs, in arrival order
    prompts: dict[str, str]
    elapsed_s: float
    num_generated_tokens: int
    prefill_tokens: int
    prefill_s: float
    decode_tokens: int                                # decodes of decode-only steps
    decode_s: float
    peak_used_blocks: int
    num_blocks: int
    prefix_cache_hit_rate: float
    num_steps: int
    recorder: VizRecorder | None = None
    attention: dict[int, AttentionView] = field(default_factory=dict)   # layer -> last view of the watched sequence
    num_layers: int = 0
    viz_layer: int = 0

    def summary_line(self) -> str:
        prefill = f"{self.prefill_tokens / self.prefill_s:.1f} tok/s" if self.prefill_s > 0 else "-"
        decode = f"{self.decode_tokens / self.decode_s:.1f} tok/s" if self.decode_s > 0 else "-"
        return (f"{self.num_generated_tokens} tokens in {self.elapsed_s:.2f} s ({self.num_steps} steps, "
                f"{len(self.outputs)} request{'s' if len(self.outputs) != 1 else ''}) | prefill {prefill} | "
                f"decode {decode} | peak KV {self.peak_used_blocks / self.num_blocks:.1%} "
                f"({self.peak_used_blocks}/{self.num_blocks} blocks) | "
                f"prefix-cache hit rate {self.prefix_cache_hit_rate:.1%}")


class Visualizer:
    """Observer + attention hooks + a view, attached to one engine for one workload."""

    def __init__(self, engine: LLMEngine, view: LiveView | PlainView | None, layer: int,
                 capture_all_layers: bool = False):
        self.engine = engine
        self.view = view
        self.layer = layer
        self.num_layers = engine.model_config.num_hidden_layers
        block_manager = engine.scheduler.block_manager
        self.recorder = VizRecorder(block_manager, engine.config.kv_policy, engine.config.max_num_batched_tokens,
                                    engine.config.kv_cache_dtype_name)
        layers = list(range(self.num_layers)) if capture_all_layers else [layer]
        tokenizer = engine.tokenizer
        self.capture = AttentionCapture(engine.runner.model, layers,
                                        lambda token_id: tokenizer.decode([token_id], skip_special_tokens=False))
        self.recorder.on_step.append(self._after_step)

    @property
    def overhead_s(self) -> float:
        return self.recorder.overhead_s + self.capture.overhead_s

    def attach(self) -> None:
        self.engine.add_step_observer(self.recorder)
        self.capture.attach()
        if self.view is not None:
            self.view.start()

    def detach(self) -> None:
        """Unhook; the view draws the final state (unless nothing ran, e.g. a request was refused)."""
        self.capture.detach()
        self.engine.remove_step_observer(self.recorder)
        if self.view is not None:
            self.view.stop(self.snapshot() if self.recorder.history else None)

    def arrived(self, request_id: str, step: int) -> None:
        seq = self.engine.requests[request_id][0]
        self.recorder.arrived(request_id, seq, step)
        if self.capture.seq is None:
            self.capture.watch(seq)

    def expect(self, request_id: str, step: int) -> None:
        self.recorder.expect(request_id, step)

    def snapshot(self) -> VizState:
        return self.recorder.snapshot(self.capture.view(self.layer), self.num_layers)

    def _after_step(self, recorder: VizRecorder) -> None:
        watched = self.capture.seq
        if watched is not None and watched.is_finished:
            # Follow the oldest request still running, if any; else keep the finished one's last view.
            running = [t.seq for t in recorder.tracked.values() if t.seq is not None and not t.seq.is_finished
                       and t.seq.block_table]
            if running:
                self.capture.watch(running[0])
        if self.view is not None:
            self.view.show(self.snapshot())


def run_workload(engine: LLMEngine, arrivals: list[Arrival], on_output: Callable[[RequestOutput], None],
                 visualizer: Visualizer | None = None) -> RunResult:
    """Step the engine until every arrival is added and finished."""
    pending = sorted(arrivals, key=lambda a: a.step)
    block_manager = engine.scheduler.block_manager
    finals: dict[str, RequestOutput | None] = {a.request_id: None for a in pending}
    first_step = engine.num_steps
    prefill_tokens = decode_tokens = 0
    prefill_s = decode_s = 0.0
    peak_used = 0
    lookups_before, hits_before = block_manager.prefix_cache_queries, block_manager.prefix_cache_hits
    if visualizer is not None:
        for arrival in pending:
            visualizer.expect(arrival.request_id, arrival.step)
        visualizer.attach()
    start = time.perf_counter()
    try:
        while pending or engine.has_unfinished_requests():
            step = engine.num_steps - first_step
            if not engine.has_unfinished_requests() and pending[0].step > step:
                step = pending[0].step   # idle until the next arrival: let it come now
            due = [a for a in pending if a.step <= step]
            if due:
                pending = pending[len(due):]
                engine.add_requests([(a.request_id, a.prompt, a.params) for a in due])
                if visualizer is not None:
                    for arrival in due:
                        visualizer.arrived(arrival.request_id, engine.num_steps - first_step)
            overhead_before = visualizer.overhead_s if visualizer is not None else 0.0
            prefill_before, decode_before = engine.prefill_tokens_total, engine.decode_tokens_total
            step_start = time.perf_counter()
            outputs = engine.step()
            step_s = time.perf_counter() - step_start
            if visualizer is not None:
                step_s -= visualizer.overhead_s - overhead_before
            peak_used = max(peak_used, block_manager.num_blocks - block_manager.num_free_blocks)
            new_prefill = engine.prefill_tokens_total - prefill_before
            if new_prefill:
                prefill_tokens += new_prefill
                prefill_s += step_s
            else:
                decode_tokens += engine.decode_tokens_total - decode_before
                decode_s += step_s
            for output in outputs:
                on_output(output)
                if output.finished:
                    finals[output.request_id] = output
        elapsed = time.perf_counter() - start - (visualizer.overhead_s if visualizer is not None else 0.0)
    finally:
        if visualizer is not None:
            visualizer.detach()
    lookups = block_manager.prefix_cache_queries - lookups_before
    hits = block_manager.prefix_cache_hits - hits_before
    result = RunResult(
        kv_policy=engine.config.kv_policy,
        outputs={request_id: output for request_id, output in finals.items() if output is not None},
        prompts={a.request_id: a.prompt_text for a in arrivals},
        elapsed_s=elapsed,
        num_generated_tokens=sum(len(c.token_ids) for o in finals.values() if o is not None for c in o.outputs),
        prefill_tokens=prefill_tokens, prefill_s=prefill_s,
        decode_tokens=decode_tokens, decode_s=decode_s,
        peak_used_blocks=peak_used, num_blocks=block_manager.num_blocks,
        prefix_cache_hit_rate=hits / lookups if lookups else 0.0,
        num_steps=engine.num_steps - first_step,
    )
    if visualizer is not None:
        result.recorder = visualizer.recorder
        result.num_layers = visualizer.num_layers
        result.viz_layer = visualizer.layer
        result.attention = {layer: view for layer in visualizer.capture.layers
                            if (view := visualizer.capture.view(layer)) is not None}
    return result
