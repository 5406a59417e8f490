"""How much of a CPU decode step is Python around the model, and how loaded the machine was.

A decode step is the model's work (the forward pass and the LM head: the
kernels, and the Python that calls them) plus the engine's host work around it
(scheduling, input preparation, sampling, detokenizing, building the outputs).
`measure_step_overhead` fills the engine with `batch_size` sequences, lets them
reach the decode phase, then times whole `engine.step()` calls and, through
timers around the model's `forward` and `compute_logits`, the model's share.
What is left is the step's host overhead; it should stay a small fraction of
the step (under 10%), or the kernels' speed does not reach the user. Where the
model runs the fused CPU forward (model/llama_numba.py), the time inside its
compiled calls (the forward, and the LM head where it is fused too) is
measured as well: the rest of the step is Python and torch around compiled
code (sampling, the engine).

The load average is printed beside the figures: on a shared machine another
job's threads take cores from the kernels, and every figure moves with it.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

from nanovllm.engine.engine import LLMEngine
from nanovllm.sampling_params import SamplingParams


@dataclass
class StepOverhead:
    batch_size: int
    step_ms: float           # mean wall time of a decode step
    model_ms: float          # of which the model's forward pass and LM head
    load_average: tuple[float, float, float]   # 1, 5 and 15 minutes, at the end of the measurement
    compiled_ms: float | None = None   # of model_ms, inside the fused forward's compiled calls (None: not fused)

    @property
    def host_ms(self) -> float:
        return self.step_ms - self.model_ms

    @property
    def host_fraction(self) -> float:
        return self.host_ms / self.step_ms

    @property
    def outside_compiled_ms(self) -> float | None:
        """The step's time outside the fused forward's compiled calls (None: the model does not run it)."""
        return None if self.compiled_ms is None else self.step_ms - self.compiled_ms

    def as_dict(self) -> dict:
        return {**asdict(self), "host_ms": self.host_ms, "host_fraction": self.host_fraction,
                "outside_compiled_ms": self.outside_compiled_ms}

    def summary(self) -> str:
        compiled = ("" if self.compiled_ms is None else
                    f", outside the compiled calls {self.outside_compiled_ms:.2f} ms "
                    f"({self.outside_compiled_ms / self.step_ms:.1%})")
        return (f"decode step at batch {self.batch_size}: {self.step_ms:.2f} ms, of which host work outside the "
                f"model {self.host_ms:.2f} ms ({self.host_fraction:.1%}){compiled}; "
                f"{load_average_text(self.load_average)}")


def load_average_text(load: tuple[float, float, float] | None = None) -> str:
    """'load average 1.23 0.98 0.70 on 2 cores' (1, 5, 15 minutes), now unless given."""
    one, five, fifteen = os.getloadavg() if load is None else load
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def measure_step_overhead(engine: LLMEngine, batch_size: int, steps: int = 30,
                          prompt_len: int = 64) -> StepOverhead:
    """Decode `steps` steps of `batch_size` sequences (prompts of `prompt_len` tokens) and split
    their time into the model's and the rest. The sequences are aborted at the end."""
    params = SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True)
    request_ids = [f"step-overhead-{batch_size}-{i}" for i in range(batch_size)]
    engine.add_requests([(request_id, [(7 * i + j) % 1000 + 1 for j in range(prompt_len)], params)
                         for i, request_id in enumerate(request_ids)], stream=False)
    while engine.scheduler.waiting or any(seq.num_computed_tokens < seq.num_prompt_tokens
                                          for seq in engine.scheduler.running):
        engine.step()
    engine.step()
    model = engine.runner.model
    model_seconds = [0.0]

    def timed(call):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                model_seconds[0] += time.perf_counter() - start
        return run

    model.forward, model.compute_logits = timed(model.forward), timed(model.compute_logits)
    fused = getattr(model, "_fused", None) or None          # a llama_numba.FusedDecoder, once a step made it
    compiled_before = fused.compiled_seconds if fused is not None else 0.0
    try:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        elapsed = time.perf_counter() - start
    finally:
        del model.forward, model.compute_logits     # the class's methods again
    for request_id in request_ids:
        engine.abort_request(request_id)
    while engine.has_unfinished_requests():
        engine.step()
    compiled_ms = None if fused is None else (fused.compiled_seconds - compiled_before) / steps * 1e3
    return StepOverhead(batch_size, elapsed / steps * 1e3, model_seconds[0] / steps * 1e3, os.getloadavg(),
                        compiled_ms)
