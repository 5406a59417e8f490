"""A broadcast ring buffer in shared memory: one writer, several readers, on one machine.

Tensor parallelism sends every step's inputs from rank 0 to ranks 1..N-1. A
torch.distributed broadcast costs tens of microseconds of host time on each
side; when the ranks share a machine, the same int64 bytes can be copied into a
shared-memory segment that every rank maps, and the readers find them by
polling a flag. (vLLM's `MessageQueue` in shm_broadcast.py does the same; this
is a small version of that design.)

The segment holds S slots of a fixed capacity, each message in one slot, and
two small tables of int64 counters:

    header        [4]        writer pid, R (readers), S (slots), slot capacity in int64s
    readers       [R, 2]     per reader: its pid (0 until it attaches), how many messages it has read
    slots         [S, 2]     per slot: the number of the message in it (0: none yet), its length in int64s
    data          [S, capacity]

Message m (1, 2, 3, ...) goes to slot (m - 1) % S. The writer first waits until
every reader has read message m - S (the slot's last occupant), copies the
message in, and only then publishes it by writing m into the slot's number.
Reader r waits until the slot of its next message, read[r] + 1, shows that
number, copies the message out, and then counts it read. Every counter has one
writer (the writer owns the slot table, reader r its row), so no lock is needed,
only that the stores become visible in the order they were made (a fence).

Waiting spins for SPIN_S (a step's next message usually arrives within it),
then sleeps BACKOFF_S between polls, and IDLE_BACKOFF_S once the wait has
lasted IDLE_S, so that an idle engine does not keep a core busy (the first
step after a second of idleness may then arrive up to a millisecond late). While waiting each side checks the other's process: a reader whose
writer has died raises WriterDiedError, a writer whose reader has died raises
ReaderDiedError, instead of waiting forever.

The creator (the writer) unlinks the segment when it closes and when it is
garbage-collected; readers only unmap it.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
import weakref
from contextlib import contextmanager
from multiprocessing import shared_memory
from typing import Callable, Iterator

import numpy as np
import torch

INT64_BYTES = 8
SPIN_S = 1e-3            # poll without sleeping for this long, then ...
BACKOFF_S = 100e-6       # ... sleep this long between polls, and once a wait has lasted ...
IDLE_S = 1.0             # ... this long (an idle engine) ...
IDLE_BACKOFF_S = 1e-3    # ... this long
LIVENESS_S = 0.05        # check the peer's process this often while waiting
DEFAULT_NUM_SLOTS = 4

_fence_lock = threading.Lock()


def memory_fence() -> None:
    """A full memory barrier: acquiring and releasing a lock are atomic instructions with barrier semantics.
    x86 keeps stores in order anyway; weaker machines (ARM) need this between the data and its flag."""
    with _fence_lock:
        pass


class ReaderDiedError(RuntimeError):
    """A reader's process exited while the writer waited for it."""


class WriterDiedError(RuntimeError):
    """The writer's process exited while a reader waited for a message."""


class QueueTimeoutError(TimeoutError):
    """A wait with a deadline passed it."""


def process_alive(pid: int) -> bool:
    """True while process pid runs; a zombie (exited, not yet reaped by its parent) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rsplit(b")", 1)[1].split()[0]   # the field after the command's name
    except (OSError, IndexError):
        return True   # no /proc (macOS): the signal check is all we have
    return state not in (b"Z", b"X")


class _Segment:
    """The mapped segment and numpy/torch views onto its parts (see the module docstring)."""

    def __init__(self, memory: shared_memory.SharedMemory, num_readers: int, num_slots: int, capacity: int):
        self.memory = memory
        self.num_readers, self.num_slots, self.capacity = num_readers, num_slots, capacity
        buf = memory.buf
        self.header = np.ndarray((4,), np.int64, buf, 0)                                  # [4]
        offset = 4 * INT64_BYTES
        self.readers = np.ndarray((num_readers, 2), np.int64, buf, offset)                # [R, (pid, read)]
        offset += num_readers * 2 * INT64_BYTES
        self.slots = np.ndarray((num_slots, 2), np.int64, buf, offset)                    # [S, (number, length)]
        offset += num_slots * 2 * INT64_BYTES
        self.data = torch.frombuffer(buf, dtype=torch.int64, offset=offset,
                                     count=num_slots * capacity).view(num_slots, capacity)   # [S, capacity]

    @staticmethod
    def nbytes(num_readers: int, num_slots: int, capacity: int) -> int:
        return (4 + 2 * num_readers + 2 * num_slots + num_slots * capacity) * INT64_BYTES

    def release(self) -> None:
        """Drop the views (an exported buffer cannot be unmapped), then unmap."""
        self.header = self.readers = self.slots = self.data = None
        _close(self.memory)


def _close(memory: shared_memory.SharedMemory) -> None:
    try:
        memory.close()
    except BufferError:   # a caller still holds a view; the mapping goes when it does
        pass


def _unlink(memory: shared_memory.SharedMemory) -> None:
    _close(memory)
    try:
        memory.unlink()
    except FileNotFoundError:
        pass


class Waiter:
    """Spin (for spin_s), then back off; check a peer every LIVENESS_S; give up at the deadline."""

    def __init__(self, timeout_s: float | None, what: str, spin_s: float = SPIN_S):
        self.spin_s = spin_s
        self.start = time.monotonic()
        self.deadline = None if timeout_s is None else self.start + timeout_s
        self.next_check = self.start + LIVENESS_S
        self.what = what

    def pause(self, check: Callable[[], None]) -> None:
        now = time.monotonic()
        if now >= self.next_check:
            check()
            self.next_check = now + LIVENESS_S
            if self.deadline is not None and now >= self.deadline:
                raise QueueTimeoutError(f"{self.what} for {now - self.start:.1f} s; gave up")
        waited = now - self.start
        time.sleep(0 if waited < self.spin_s else BACKOFF_S if waited < IDLE_S else IDLE_BACKOFF_S)


class ShmQueueWriter:
    """The writing end; it creates the segment, and removes it on close() or when collected."""

    def __init__(self, num_readers: int, capacity_bytes: int, num_slots: int = DEFAULT_NUM_SLOTS):
        if num_readers < 1 or num_slots < 2 or capacity_bytes < INT64_BYTES:
            raise ValueError(f"a shared-memory queue needs at least one reader, two slots and room for one int64 "
                             f"(got {num_readers} readers, {num_slots} slots, {capacity_bytes} bytes)")
        capacity = -(-capacity_bytes // INT64_BYTES)
        nbytes = _Segment.nbytes(num_readers, num_slots, capacity)
        _check_room(nbytes)
        memory = shared_memory.SharedMemory(create=True, size=nbytes)
        self._finalizer = weakref.finalize(self, _unlink, memory)
        self.name = memory.name
        self.segment = _Segment(memory, num_readers, num_slots, capacity)
        self.segment.header[:] = (os.getpid(), num_readers, num_slots, capacity)
        self.num_written = 0
        self.closed = False

    @property
    def capacity_bytes(self) -> int:
        return self.segment.capacity * INT64_BYTES

    def write(self, parts: list[torch.Tensor], timeout_s: float | None = None,
              watch: Callable[[], None] | None = None) -> None:
        """Send one message: the parts (integer CPU tensors) joined as int64. Waits while the slot is
        still unread; watch() (which may raise) runs every LIVENESS_S of that wait, before the check of
        the readers' processes."""
        segment = self.segment
        length = sum(part.numel() for part in parts)
        if length > segment.capacity:
            raise ValueError(f"a message of {length * INT64_BYTES} bytes does not fit a slot of "
                             f"{self.capacity_bytes} bytes; make the queue's slots larger")
        number = self.num_written + 1
        slot = (number - 1) % segment.num_slots
        self._wait_for_readers(number - segment.num_slots, timeout_s, watch)
        torch.cat([part.flatten() for part in parts], out=segment.data[slot, :length])
        segment.slots[slot, 1] = length
        memory_fence()                 # the message and its length before its number
        segment.slots[slot, 0] = number
        self.num_written = number

    def _wait_for_readers(self, number: int, timeout_s: float | None, watch: Callable[[], None] | None) -> None:
        """Until every reader has read message `number` (nothing to wait for when it is < 1)."""
        readers = self.segment.readers
        if number < 1 or readers[:, 1].min() >= number:
            return
        waiter = Waiter(timeout_s, f"the writer waited for its readers to read message {number}")

        def check() -> None:
            if watch is not None:
                watch()
            for index, (pid, num_read) in enumerate(readers.tolist()):
                if num_read < number and pid and not process_alive(pid):
                    raise ReaderDiedError(f"reader {index} (pid {pid}) of shared-memory queue {self.name} "
                                          f"exited before reading message {number}")

        while readers[:, 1].min() < number:
            waiter.pause(check)
        memory_fence()                 # their reads done before we overwrite the slot

    def close(self) -> None:
        """Unmap and remove the segment (readers still attached keep their mapping until they close)."""
        if self.closed:
            return
        self.closed = True
        self.segment.release()
        self._finalizer()


class ShmQueueReader:
    """Reader `index` (0 .. R-1) of a queue made by ShmQueueWriter(name)."""

    def __init__(self, name: str, index: int):
        # Python < 3.13 registers an attached segment with the resource tracker too; a reader spawned by the
        # writer's process shares the writer's tracker, so this only repeats the writer's registration.
        memory = shared_memory.SharedMemory(name=name)
        writer_pid, num_readers, num_slots, capacity = np.ndarray((4,), np.int64, memory.buf, 0).tolist()
        if not 0 <= index < num_readers:
            _close(memory)
            raise ValueError(f"reader index {index} is out of range for a queue of {num_readers} readers")
        self.name, self.index, self.writer_pid = name, index, writer_pid
        self.segment = _Segment(memory, num_readers, num_slots, capacity)
        self.num_read = int(self.segment.readers[index, 1])
        self.segment.readers[index, 0] = os.getpid()
        self.closed = False

    @contextmanager
    def next_message(self, timeout_s: float | None = None) -> Iterator[torch.Tensor]:
        """Wait for the next message; yield it as an int64 view onto its slot [length], counted read when
        the block ends. The view is valid only inside the block: copy what must outlive it."""
        segment = self.segment
        number = self.num_read + 1
        slot = (number - 1) % segment.num_slots
        if segment.slots[slot, 0] != number:
            waiter = Waiter(timeout_s, f"reader {self.index} waited for message {number}")
            while segment.slots[slot, 0] != number:
                waiter.pause(self._check_writer)
        memory_fence()                 # the number before the message it publishes
        yield segment.data[slot, :int(segment.slots[slot, 1])]
        memory_fence()                 # our copy done before the writer may reuse the slot
        self.num_read = number
        segment.readers[self.index, 1] = number

    def _check_writer(self) -> None:
        if not process_alive(self.writer_pid):
            raise WriterDiedError(f"the writer (pid {self.writer_pid}) of shared-memory queue {self.name} exited; "
                                  "no more messages will come")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.segment.release()


def _check_room(nbytes: int) -> None:
    """A segment larger than the free space of its file system fails later, with SIGBUS at a write: refuse it
    now with a sentence instead."""
    shm_dir = "/dev/shm"
    if os.path.isdir(shm_dir) and shutil.disk_usage(shm_dir).free < nbytes:
        raise RuntimeError(f"a shared-memory queue of {nbytes / 2**20:.1f} MiB does not fit in {shm_dir} "
                           f"({shutil.disk_usage(shm_dir).free / 2**20:.1f} MiB free); enlarge it (docker run "
                           "--shm-size) or lower max_num_batched_tokens, max_num_seqs or max_model_len")
