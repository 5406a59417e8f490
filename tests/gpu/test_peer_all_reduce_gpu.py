"""The peer all-reduce's kernel (ops/all_reduce_triton.py) on one GPU, ranks simulated: each rank's buffer
is memory of this GPU and each rank's kernel runs on a stream of its own, all at once. So the signals'
protocol runs for real (the compare-and-swaps, release and acquire, the spinning, the abort), between
programs of one GPU rather than over NVLink; the interpreter tests (tests/test_ops_triton.py) run one
rank at a time. Two GPUs: tests/gpu/test_tensor_parallel_gpu.py.
Run on a CUDA machine: `python3 -m pytest -q -m gpu tests/gpu/test_peer_all_reduce_gpu.py`.
"""
from __future__ import annotations

import time

import pytest
import torch

from nanovllm.ops.all_reduce_triton import (FLAGS_BYTES, NUM_SLOTS, SLOT_BYTES, peer_all_reduce_torch,
                                            peer_all_reduce_triton)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

HIDDEN = 4096
WAIT_S = 10.0


class SimulatedRanks:
    """world_size ranks on this GPU: a buffer, a stream and an x each, and one abort flag.

    Each rank's kernel is compiled and loaded before any runs beside another: loading a module waits
    for the GPU to be idle, so loading rank 1's while rank 0's waits for it on the same GPU would never
    end. (Ranks of their own GPUs and processes never wait so.) Warming up, each runs once alone with
    the abort set, and the flags it left are cleared."""

    def __init__(self, world_size: int, dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float32)):
        self.buffers = tuple(torch.zeros(FLAGS_BYTES + NUM_SLOTS * SLOT_BYTES, dtype=torch.uint8, device="cuda")
                             for _ in range(world_size))
        self.streams = [torch.cuda.Stream() for _ in range(world_size)]
        self.abort_flag = torch.ones(1, dtype=torch.int32, pin_memory=True)
        for dtype in dtypes:
            for rank in range(world_size):
                for numel in (HIDDEN, HIDDEN * 7):      # numel's divisibility by 16 compiles apart from 1's
                    peer_all_reduce_triton(torch.zeros(numel, dtype=dtype, device="cuda"), self.buffers, rank, 0,
                                           self.abort_flag)
                peer_all_reduce_triton(torch.zeros(1, dtype=dtype, device="cuda"), self.buffers, rank, 0,
                                       self.abort_flag)
        torch.cuda.synchronize()
        for buffer in self.buffers:
            buffer[:FLAGS_BYTES].zero_()
        self.abort_flag[0] = 0

    def all_reduce(self, xs: list[torch.Tensor], slot: int, ranks: list[int] | None = None,
                   **options) -> list[torch.cuda.Event]:
        """Launch each rank's kernel (of `ranks`, default all) on its stream -> their completion events."""
        torch.cuda.synchronize()
        done = []
        for rank in ranks if ranks is not None else range(len(xs)):
            with torch.cuda.stream(self.streams[rank]):
                peer_all_reduce_triton(xs[rank], self.buffers, rank, slot, self.abort_flag, **options)
                done.append(torch.cuda.Event())
                done[-1].record()
        return done

    def flags(self) -> list[torch.Tensor]:
        return [buffer[:FLAGS_BYTES].view(torch.int32) for buffer in self.buffers]


def wait(done: list[torch.cuda.Event], ranks: SimulatedRanks, timeout_s: float = WAIT_S) -> bool:
    """Whether every event completes within timeout_s; if not, abort the kernels (so that none spins on)."""
    deadline = time.monotonic() + timeout_s
    while not all(event.query() for event in done):
        if time.monotonic() > deadline:
            ranks.abort_flag[0] = 1
            torch.cuda.synchronize()
            return False
        time.sleep(0.001)
    return True


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("rows, dtype", [(1, torch.bfloat16), (7, torch.float32), (256, torch.bfloat16)])
def test_ranks_on_streams_get_the_reference_sums_round_after_round_and_leave_the_flags_zero(world_size, rows, dtype):
    ranks = SimulatedRanks(world_size)
    generator = torch.Generator(device="cuda").manual_seed(rows)
    for round_ in range(24):            # the slots in turn, as a forward takes them
        xs = [torch.randn(rows, HIDDEN, generator=generator, device="cuda").to(dtype) for _ in range(world_size)]
        expected = peer_all_reduce_torch(xs)
        done = ranks.all_reduce(xs, slot=round_ % NUM_SLOTS)
        assert wait(done, ranks), f"round {round_}: the ranks' kernels still waited for each other after {WAIT_S} s"
        for rank, x in enumerate(xs):
            assert torch.equal(x, expected), f"round {round_}, rank {rank}"
    assert all(not flags.any() for flags in ranks.flags())


def test_programs_that_loop_over_many_chunks_get_the_reference_sums():
    ranks = SimulatedRanks(2)
    for round_ in range(8):
        xs = [torch.randn(37, HIDDEN, device="cuda").to(torch.bfloat16) for _ in range(2)]
        expected = peer_all_reduce_torch(xs)
        assert wait(ranks.all_reduce(xs, slot=round_ % 2, max_programs=3), ranks)
        assert all(torch.equal(x, expected) for x in xs)


def test_a_rank_alone_waits_for_its_peer_until_the_abort_and_leaves_x_as_it_was():
    ranks = SimulatedRanks(2)
    xs = [torch.randn(8, HIDDEN, device="cuda").to(torch.bfloat16) for _ in range(2)]
    before = xs[0].clone()
    done = ranks.all_reduce(xs, slot=0, ranks=[0])      # rank 1 never comes
    time.sleep(0.5)
    assert not done[0].query()
    ranks.abort_flag[0] = 1
    assert wait(done, ranks, timeout_s=5.0), "the abort did not end the waiting kernel"
    assert torch.equal(xs[0], before)
