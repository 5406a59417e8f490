"""All-reduce through the other GPUs' memory: one kernel instead of an NCCL call, for the small sums
of a decode step.

With tensor parallelism every layer ends in two all-reduces of [T, H] (model/parallel.py). At decode
T is the batch, so each sums a few kilobytes, and NCCL's call costs more than the bytes. GPUs of one
host joined by NVLink can read each other's memory. A *symmetric* buffer (torch's symmetric memory:
one allocation of the same size on every rank, each mapped into every rank's address space) gives a
rank the addresses of all ranks' buffers, and one kernel does the all-reduce ("one-shot"):

    1. each program copies its chunks of x into this rank's buffer;
    2. it signals the same program on every other rank ("my chunks are there") and waits for theirs;
    3. it reads those chunks from every rank's buffer, adds them in float32 in rank order and writes
       the sum over x. Every rank adds the same numbers in the same order: all get the same bits.

One rank's buffer, in bytes:

    flags  [MAX_PROGRAMS, WORLD] int32    flags[p, r]: program p of rank r has signalled (1) or not (0)
    slots  [NUM_SLOTS, slot_bytes]        the chunks, in one of the slots

Signalling is a compare-and-swap 0 -> 1 on the peer's flag (spinning while the peer has not yet taken
the previous signal) with release semantics, so that the chunks are visible before the flag; waiting
is 1 -> 0 on this rank's own flag, with acquire semantics. The flags are all 0 again after every
all-reduce, so a CUDA graph replays the kernel with no counter kept by the host.

Why slots: a rank can finish its all-reduce while a slower peer still reads its buffer. If its next
all-reduce wrote the same slot, the peer would read the new numbers. So consecutive all-reduces take
different slots (the caller says which: model/parallel.py gives the embedding, the attention and the
MLP a slot each). All-reduce n + 2 may reuse n's slot: a rank starts it only after all-reduce n + 1's
signals came from every peer, and a peer signals n + 1 only after its kernel for n has finished.

If a peer dies, its signal never comes. The waits also watch a flag in this host's pinned memory;
the engine sets it (`PeerAllReduce.abort`) when it finds a dead rank, and every waiting kernel ends.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_PROGRAMS = 64        # programs of one all-reduce at most; each loops over its chunks
FLAGS_BYTES = 4096       # room for [MAX_PROGRAMS, 8 ranks] int32 flags; the slots start 16-byte aligned
NUM_SLOTS = 3            # the embedding's, the attention's and the MLP's all-reduce
SLOT_BYTES = 2 << 20     # larger tensors go to NCCL: a [256, 4096] bfloat16 decode batch fits
BLOCK = 1024             # elements of a chunk: 8 per thread of 4 warps, 16 bytes of bfloat16
ABORT_CHECK_SPINS = tl.constexpr(256)   # a wait reads the host's abort flag (over PCIe) once per this many tries
THREADS = tl.constexpr(128)             # of a program (num_warps=4)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _aborted(abort_ptr):
    """The host's abort flag, the same value in every thread: each thread reads it, and the program
    takes their max. (Read apart, two warps could see it before and after the host sets it, and
    leave the loop below apart.)"""
    return tl.max(tl.load(abort_ptr + tl.zeros([THREADS], dtype=tl.int32), volatile=True), axis=0)


@triton.jit
def _swap_flag(flag_ptr, old: tl.constexpr, new: tl.constexpr, sem: tl.constexpr, abort_ptr):
    """Spin until the flag holds `old`, then set `new` (one compare-and-swap), or until the abort flag
    is set -> 1 if the swap happened, 0 if it was aborted. A scalar atomic: one thread of the program
    does it, and the others get its result."""
    swapped = (tl.atomic_cas(flag_ptr, old, new, sem=sem, scope="sys") == old).to(tl.int32)
    aborted = _aborted(abort_ptr)
    spins = 0
    while swapped + aborted == 0:
        swapped = (tl.atomic_cas(flag_ptr, old, new, sem=sem, scope="sys") == old).to(tl.int32)
        spins += 1
        if spins % ABORT_CHECK_SPINS == 0:
            aborted = _aborted(abort_ptr)
    return swapped


@triton.jit
def _peer_all_reduce_kernel(x_ptr, numel, buffers, slot_offset, abort_ptr, RANK: tl.constexpr,
                            WORLD: tl.constexpr, BLOCK: tl.constexpr):
    # buffers: WORLD pointers (bytes), every rank's buffer as this GPU addresses it
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    dtype = x_ptr.dtype.element_ty
    own_slot = (buffers[RANK] + slot_offset).to(tl.pointer_type(dtype), bitcast=True)
    # 1. this program's chunks of x into this rank's slot
    for start in range(pid * BLOCK, numel, step):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < numel
        tl.store(own_slot + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)
    # 2. every thread's stores come before this program's signals (their release), then the signals out,
    # then the peers' in; after them (acquire, which also drops this SM's cached lines) the chunks are there
    tl.debug_barrier()
    arrived = 1
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            peer_flags = buffers[peer].to(tl.pointer_type(tl.int32), bitcast=True)
            arrived *= _swap_flag(peer_flags + pid * WORLD + RANK, 0, 1, "release", abort_ptr)
    own_flags = buffers[RANK].to(tl.pointer_type(tl.int32), bitcast=True)
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            arrived *= _swap_flag(own_flags + pid * WORLD + peer, 1, 0, "acquire", abort_ptr)
    tl.debug_barrier()
    # 3. the sum, in rank order (aborted: x is left as it was)
    if arrived != 0:
        for start in range(pid * BLOCK, numel, step):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < numel
            total = tl.zeros([BLOCK], dtype=tl.float32)
            for rank in tl.static_range(WORLD):
                slot = (buffers[rank] + slot_offset).to(tl.pointer_type(dtype), bitcast=True)
                total += tl.load(slot + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(x_ptr + offs, total.to(dtype), mask=mask)


def fits_a_slot(x: torch.Tensor, slot_bytes: int) -> bool:
    """Whether the kernel can sum x through slots of slot_bytes: contiguous, of a dtype it adds, small enough."""
    return x.dtype in DTYPES and x.is_contiguous() and x.numel() * x.element_size() <= slot_bytes


def peer_all_reduce_triton(x: torch.Tensor, buffers: tuple[torch.Tensor, ...], rank: int, slot: int,
                           abort_flag: torch.Tensor, slot_bytes: int = SLOT_BYTES,
                           max_programs: int = MAX_PROGRAMS) -> torch.Tensor:
    """Sum x over the ranks whose buffers are `buffers` (uint8 views, as this GPU addresses them; each
    FLAGS_BYTES + NUM_SLOTS * slot_bytes), through slot `slot` of each -> x, the sum written over it. Every
    rank calls it with its own x, the same slot and the same x.numel()."""
    world_size = len(buffers)
    if not fits_a_slot(x, slot_bytes):
        raise ValueError(f"the peer all-reduce takes contiguous {', '.join(map(str, DTYPES))} tensors of at most "
                         f"{slot_bytes} bytes, got {x.dtype} {tuple(x.shape)}")
    if not 0 <= slot < NUM_SLOTS or not 0 <= rank < world_size or max_programs * world_size * 4 > FLAGS_BYTES:
        raise ValueError(f"slot {slot} of {NUM_SLOTS}, rank {rank} of {world_size}: out of range")
    programs = min(triton.cdiv(x.numel(), BLOCK), max_programs)
    if programs:
        _peer_all_reduce_kernel[(programs,)](x, x.numel(), tuple(buffers), FLAGS_BYTES + slot * slot_bytes,
                                             abort_flag, RANK=rank, WORLD=world_size, BLOCK=BLOCK, num_warps=4)
    return x


def peer_all_reduce_torch(xs: list[torch.Tensor]) -> torch.Tensor:
    """The reference: every rank's x, added in float32 in rank order, in their dtype."""
    total = torch.zeros(xs[0].shape, dtype=torch.float32, device=xs[0].device)
    for x in xs:
        total += x.float()
    return total.to(xs[0].dtype)


@dataclass
class PeerAllReduce:
    """This rank's symmetric buffer and every rank's, mapped here: `all_reduce(x, slot)` for the tensors
    it `takes`. `start` makes one on every rank of a group at once (a collective)."""
    buffers: tuple[torch.Tensor, ...]   # [WORLD] uint8 views of every rank's buffer, as this GPU addresses them
    rank: int
    abort_flag: torch.Tensor            # [1] int32 in pinned host memory: non-zero ends every wait
    memory: tuple                       # this rank's allocation and torch's handle of the mappings: the views
                                        # above own neither, so both live as long as this does (`close`)
    slot_bytes: int = SLOT_BYTES

    @classmethod
    def start(cls, group, device: torch.device, slot_bytes: int = SLOT_BYTES) -> "PeerAllReduce":
        """On every rank of `group` at once: allocate the symmetric buffer (zeroed flags) and map the
        peers' (RuntimeError where torch or the GPUs cannot)."""
        import torch.distributed as dist
        from torch.distributed import _symmetric_memory as symmetric_memory
        nbytes = FLAGS_BYTES + NUM_SLOTS * slot_bytes
        buffer = symmetric_memory.empty(nbytes, dtype=torch.uint8, device=device)        # [nbytes]
        buffer.zero_()
        torch.cuda.synchronize(device)
        handle = symmetric_memory.rendezvous(buffer, group)
        handle.barrier()                          # every rank's flags are zero before any signal
        buffers = tuple(handle.get_buffer(rank, [nbytes], torch.uint8, 0)
                        for rank in range(dist.get_world_size(group)))
        abort_flag = torch.zeros(1, dtype=torch.int32, pin_memory=True)
        return cls(buffers, dist.get_rank(group), abort_flag, (buffer, handle), slot_bytes)

    def takes(self, x: torch.Tensor) -> bool:
        return bool(self.buffers) and x.is_cuda and fits_a_slot(x, self.slot_bytes)

    def all_reduce(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        """x summed over the ranks, in place, through `slot` (never the slot of the all-reduce before)."""
        return peer_all_reduce_triton(x, self.buffers, self.rank, slot, self.abort_flag, self.slot_bytes)

    def abort(self) -> None:
        """End every kernel waiting for a peer (a dead one): after this, the sums are wrong."""
        self.abort_flag[0] = 1

    def close(self) -> None:
        """Unmap the buffers and free this rank's, once no graph holds the kernel (before the process
        group goes); every all-reduce after this goes through the group's."""
        self.buffers, self.memory = (), ()
