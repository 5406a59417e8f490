"""Probe: the host's per-step Python for a decode step of 256 sequences, without a model or a GPU.

At batch 256 the engine's host work per step (schedule, input preparation, sampling settings,
completion) is about as long as the GPU's forward pass, so a slow
host can bind `throughput`. This times the same code the GPU path runs, on any CPU: Scheduler
.schedule / .advance / .complete, the CUDA-graph input filling (HostInputs.fill, unpinned here)
and SamplingBatch.build (CPU tensors here), medians over 250 decode steps.

    python tools/host_python_probe.py [--batch 256]
"""
from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.runner.cuda_graph import HostInputs
from nanovllm.runner.sampler import SamplingBatch
from nanovllm.sampling_params import SamplingParams

PROMPT_LEN, BLOCK_SIZE, MAX_MODEL_LEN = 128, 16, 4096


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=256, help="the sequences of each decode step")
    BATCH = parser.parse_args().batch
    block_manager = BlockManager(num_blocks=BATCH * 80, block_size=BLOCK_SIZE)
    scheduler = Scheduler(block_manager, max_num_seqs=BATCH, max_num_batched_tokens=8192,
                          max_model_len=MAX_MODEL_LEN, eos_token_ids=[2])
    params = SamplingParams(temperature=0.0, ignore_eos=True)
    for i in range(BATCH):
        scheduler.waiting.append(Sequence(seq_id=i, request_id=str(i), index=0,
                                          prompt_token_ids=list(range(10 + i, 10 + i + PROMPT_LEN)),
                                          sampling_params=params, seed=i, max_tokens=3000, arrival_time=float(i)))
    host = HostInputs(BATCH, MAX_MODEL_LEN // BLOCK_SIZE, BLOCK_SIZE, pin_memory=False)
    parts = ("schedule", "HostInputs.fill", "SamplingBatch.build", "advance", "complete")
    times: dict[str, list[float]] = {part: [] for part in parts}
    for step in range(300):
        t0 = time.perf_counter()
        batch = scheduler.schedule()
        t1 = time.perf_counter()
        decode = batch.num_prefill_tokens == 0
        if decode:
            host.fill(batch, BATCH)
        t2 = time.perf_counter()
        seqs = batch.sampling_seqs
        SamplingBatch.build([s.sampling_params for s in seqs], [s.seed for s in seqs],
                            [s.num_output_tokens for s in seqs], [s.prompt_token_ids for s in seqs],
                            [s.output_token_ids for s in seqs], [2], "cpu")
        t3 = time.perf_counter()
        scheduler.advance(batch)
        t4 = time.perf_counter()
        scheduler.complete(batch, SimpleNamespace(token_ids=[5] * len(seqs), logprobs=[-1.0] * len(seqs),
                                                  top_logprobs=None))
        t5 = time.perf_counter()
        if decode and step >= 50:
            for part, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                times[part].append(seconds * 1e3)
    medians = {part: statistics.median(values) for part, values in times.items()}
    print(f"batch {BATCH}, median over {len(times['schedule'])} decode steps, ms: "
          + ", ".join(f"{part} {ms:.3f}" for part, ms in medians.items()) + f"; total {sum(medians.values()):.3f}")


if __name__ == "__main__":
    main()
