"""The peer all-reduce (nanovllm/ops/all_reduce_triton.py) between processes on the CPU: each process is
one rank and runs the kernel under Triton's interpreter; every rank's buffer is a slice of one
shared-memory segment, which each process maps at its own addresses, as torch's symmetric memory maps
the GPUs' buffers. So the signals really go out into the other ranks' flags and the kernels really
spin until theirs arrive, over rounds of several sizes and every slot in turn.

    python3 tools/peer_all_reduce_cpu.py --ranks 3 --rounds 4

Each rank prints a line a round (its slot, the size, whether its sum is the reference's bits), then
its flags; the exit status is non-zero if any rank's sum differs, a flag is left set, or a rank is not
done within --timeout seconds (a kernel waiting for a signal that never comes).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = [3001, 1, 37, 2500, 5, 999]     # numbers a round, in turn: 2 programs of 2 chunks, then 1 program
SLOT_BYTES = 16384
MAX_PROGRAMS = 2


def run_rank(segment_name: str, rank: int, world_size: int, rounds: int) -> bool:
    """One rank's rounds (in a process started with TRITON_INTERPRET=1) -> whether all were right."""
    import torch
    from multiprocessing import resource_tracker
    from multiprocessing.shared_memory import SharedMemory

    from nanovllm.ops.all_reduce_triton import FLAGS_BYTES, NUM_SLOTS, peer_all_reduce_torch, peer_all_reduce_triton

    segment = SharedMemory(segment_name)
    resource_tracker.unregister(segment._name, "shared_memory")   # the starting process owns the segment
    size = FLAGS_BYTES + NUM_SLOTS * SLOT_BYTES
    memory = torch.frombuffer(segment.buf, dtype=torch.uint8)                      # every rank's buffer
    buffers = tuple(memory[r * size:(r + 1) * size] for r in range(world_size))    # as this process maps them
    right = True
    for round_ in range(rounds):
        numel, slot = SIZES[round_ % len(SIZES)], round_ % NUM_SLOTS
        generator = [torch.Generator().manual_seed(100 * round_ + r) for r in range(world_size)]
        xs = [torch.randn(numel, generator=generator[r]) for r in range(world_size)]   # every rank's x, known here
        x = xs[rank].clone()
        peer_all_reduce_triton(x, buffers, rank, slot, torch.zeros(1, dtype=torch.int32), SLOT_BYTES,
                               max_programs=MAX_PROGRAMS)
        same = torch.equal(x, peer_all_reduce_torch(xs))
        right &= same
        print(f"rank {rank}: round {round_}, slot {slot}, {numel} number{'s' * (numel > 1)}: "
              f"{'the reference sum' if same else 'NOT the reference sum'}", flush=True)
    flags = memory[rank * size:rank * size + FLAGS_BYTES].view(torch.int32)
    print(f"rank {rank}: {'flags all zero again' if not flags.any() else f'{flags.count_nonzero()} flags left set'}")
    right &= not flags.any()
    del memory, buffers, flags
    segment.close()
    return right


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=len(SIZES))
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds for the ranks to finish")
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)       # a rank's own process
    parser.add_argument("--segment", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank is not None:
        sys.exit(0 if run_rank(args.segment, args.rank, args.ranks, args.rounds) else 1)

    from multiprocessing.shared_memory import SharedMemory

    from nanovllm.ops.all_reduce_triton import FLAGS_BYTES, NUM_SLOTS
    segment = SharedMemory(create=True, size=args.ranks * (FLAGS_BYTES + NUM_SLOTS * SLOT_BYTES))
    try:
        segment.buf[:] = bytes(segment.size)                               # every flag 0
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
        ranks = [subprocess.Popen([sys.executable, __file__, "--rank", str(rank), "--segment", segment.name,
                                   "--ranks", str(args.ranks), "--rounds", str(args.rounds)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for rank in range(args.ranks)]
        try:
            outputs = [rank.communicate(timeout=args.timeout)[0] for rank in ranks]
        except subprocess.TimeoutExpired:
            sys.exit(f"the ranks were not done after {args.timeout:.0f} s: a kernel waits for a signal")
        finally:
            for rank in ranks:
                rank.kill()
        for output in outputs:
            print(output, end="")
        sys.exit(max(rank.returncode for rank in ranks))
    finally:
        segment.close()
        segment.unlink()


if __name__ == "__main__":
    main()
