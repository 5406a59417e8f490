"""Probe: the fused sampling pass (ops/sampling_triton.py) by batch size and chunks per row.

At batch 256 the pass takes ~170 us of a ~2.2 ms `throughput` decode step on an H200
(step_timeline_probe.py --batch 256): it hashes and takes two logarithms for each of 33M
logits, so it is bound by instructions, not by the 65 MB it reads. With the default split
(TARGET_PROGRAMS programs in all) a batch-256 pass is 512 programs of 4 warps, about 16 warps
per multiprocessor. This times the pass at other chunk counts, greedy and at temperature 0.6,
for a 128k vocabulary in bfloat16 (the logits as the LM head leaves them).

Each call is timed from the host, wrapper included: below ~70 us a call on an H200 host the
figures are the wrapper's Python (tensor allocations, two launches), not the GPU's time, so
only the batch-256 temperature rows measure the kernel.

    python tools/sampling_probe.py
"""
from __future__ import annotations

import torch

from nanovllm.ops import sampling_triton

VOCAB = 128256


def time_us(fn, repeats: int = 30) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats * 1e3


def main() -> None:
    print(f"card: {torch.cuda.get_device_name()}, vocabulary {VOCAB}, bfloat16 logits, "
          f"TARGET_PROGRAMS {sampling_triton.TARGET_PROGRAMS}, MAX_SPLITS {sampling_triton.MAX_SPLITS}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for batch in (1, 64, 256):
        logits = (torch.randn(batch, VOCAB, device="cuda", generator=gen) * 3).to(torch.bfloat16)
        keys = torch.randint(0, 2**32, (batch,), device="cuda", generator=gen, dtype=torch.int64)
        temperature = torch.full((batch,), 0.6, device="cuda")
        for mode, args in (("greedy", (None, None)), ("t=0.6", (keys, temperature))):
            cells = []
            for splits in (None, 1, 2, 4, 8, 16, 32, 64, 128):
                us = time_us(lambda: sampling_triton.sample_from_logits_triton(logits, *args, num_splits=splits))
                cells.append(f"{'auto' if splits is None else splits}: {us:.1f}")
            print(f"batch {batch:3d} {mode:6s} us by chunks per row | " + " | ".join(cells))


if __name__ == "__main__":
    main()
