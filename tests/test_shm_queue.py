"""The shared-memory broadcast queue (nanovllm/runner/shm_queue.py): order across wrap-around, every size up to
a full slot, liveness of both ends, clean-up. Readers and writers in other processes are spawned; every wait
has a deadline."""
from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import time
from multiprocessing import shared_memory

import pytest
import torch

from nanovllm.runner.shm_queue import (QueueTimeoutError, ReaderDiedError, ShmQueueReader, ShmQueueWriter,
                                       WriterDiedError, process_alive)

WAIT_S = 60.0   # no wait in these tests lasts longer
CAPACITY_INTS = 1000
spawn = multiprocessing.get_context("spawn")


def message(number: int) -> torch.Tensor:
    """Message `number`: a length from 1 to a full slot, contents that name the message."""
    length = CAPACITY_INTS if number % 7 == 0 else 1 if number % 5 == 0 else 1 + (number * 37) % CAPACITY_INTS
    return torch.arange(length, dtype=torch.int64) + number * 10_000                     # [length]


def read_messages(name: str, index: int, count: int, results: multiprocessing.Queue) -> None:
    """A reader process: read `count` messages, report each one's (first value, length), or the failure."""
    reader = ShmQueueReader(name, index)
    seen = []
    try:
        for number in range(1, count + 1):
            with reader.next_message(timeout_s=WAIT_S) as received:
                if not torch.equal(received, message(number)):
                    raise AssertionError(f"reader {index}: message {number} arrived as {received[:4].tolist()}..., "
                                         f"length {received.numel()}")
                seen.append((int(received[0]), received.numel()))
        results.put((index, seen))
    except Exception as error:
        results.put((index, repr(error)))
    finally:
        reader.close()


def attach_and_sleep(name: str, index: int, attached: multiprocessing.Queue) -> None:
    reader = ShmQueueReader(name, index)
    attached.put(os.getpid())
    time.sleep(WAIT_S)
    reader.close()


def write_and_sleep(names: multiprocessing.Queue) -> None:
    writer = ShmQueueWriter(num_readers=1, capacity_bytes=64)
    writer.write([torch.tensor([7])])
    names.put(writer.name)
    time.sleep(WAIT_S)


def segment_exists(name: str) -> bool:
    try:
        shared_memory.SharedMemory(name=name).close()
    except FileNotFoundError:
        return False
    return True


def test_two_readers_get_every_message_in_order_across_wrap_around_at_every_size():
    count = 300   # 100 times round 3 slots; lengths from 1 int64 to a full slot
    writer = ShmQueueWriter(num_readers=2, capacity_bytes=CAPACITY_INTS * 8, num_slots=3)
    results = spawn.Queue()
    readers = [spawn.Process(target=read_messages, args=(writer.name, index, count, results)) for index in (0, 1)]
    try:
        for reader in readers:
            reader.start()
        for number in range(1, count + 1):
            whole = message(number)
            cut = whole.numel() // 2
            writer.write([whole[:cut].to(torch.int32), whole[cut:]], timeout_s=WAIT_S)   # parts join as int64
        reports = dict(results.get(timeout=WAIT_S) for _ in readers)
    finally:
        for reader in readers:
            reader.join(timeout=WAIT_S)
            reader.kill()
        writer.close()
    expected = [(number * 10_000, message(number).numel()) for number in range(1, count + 1)]
    assert reports == {0: expected, 1: expected}
    assert {length for _, length in expected} >= {1, CAPACITY_INTS}


def test_a_message_larger_than_a_slot_is_refused_with_the_sizes():
    writer = ShmQueueWriter(num_readers=1, capacity_bytes=CAPACITY_INTS * 8)
    try:
        writer.write([torch.zeros(CAPACITY_INTS, dtype=torch.int64)])   # a full slot fits
        with pytest.raises(ValueError, match="8008 bytes does not fit a slot of 8000 bytes"):
            writer.write([torch.zeros(CAPACITY_INTS + 1, dtype=torch.int64)])
    finally:
        writer.close()


def test_a_dead_reader_makes_the_waiting_writer_raise_within_a_second():
    writer = ShmQueueWriter(num_readers=1, capacity_bytes=64, num_slots=2)
    attached = spawn.Queue()
    reader = spawn.Process(target=attach_and_sleep, args=(writer.name, 0, attached))
    try:
        reader.start()
        pid = attached.get(timeout=WAIT_S)
        writer.write([torch.tensor([1])])
        writer.write([torch.tensor([2])])   # both slots are full now; the next write waits for the reader
        os.kill(pid, signal.SIGKILL)        # not reaped: a zombie counts as dead
        start = time.monotonic()
        with pytest.raises(ReaderDiedError, match=f"reader 0 \\(pid {pid}\\) .* exited before reading message 1"):
            writer.write([torch.tensor([3])], timeout_s=WAIT_S)
        assert time.monotonic() - start < 1.0
    finally:
        reader.kill()
        reader.join(timeout=WAIT_S)
        writer.close()


def test_a_writer_that_waits_past_its_deadline_raises():
    writer = ShmQueueWriter(num_readers=1, capacity_bytes=64, num_slots=2)   # reader 0 never attaches
    try:
        writer.write([torch.tensor([1])])
        writer.write([torch.tensor([2])])
        with pytest.raises(QueueTimeoutError, match="waited for its readers to read message 1"):
            writer.write([torch.tensor([3])], timeout_s=0.2)
    finally:
        writer.close()


def test_a_dead_writer_makes_the_waiting_reader_raise_within_a_second():
    names = spawn.Queue()
    process = spawn.Process(target=write_and_sleep, args=(names,))
    process.start()
    try:
        name = names.get(timeout=WAIT_S)
        reader = ShmQueueReader(name, 0)
        with reader.next_message(timeout_s=WAIT_S) as received:
            assert received.tolist() == [7]
        process.kill()                      # not reaped: a zombie counts as dead
        start = time.monotonic()
        with pytest.raises(WriterDiedError, match=f"writer \\(pid {process.pid}\\) .* exited"):
            with reader.next_message(timeout_s=WAIT_S):
                pass
        assert time.monotonic() - start < 1.0
        reader.close()
    finally:
        process.kill()
        process.join(timeout=WAIT_S)
        if segment_exists(name):            # a killed writer cannot remove its segment: we do
            shared_memory.SharedMemory(name=name).unlink()


def test_an_idle_reader_sleeps_instead_of_spinning():
    writer = ShmQueueWriter(num_readers=1, capacity_bytes=64)
    reader = ShmQueueReader(writer.name, 0)
    try:
        wall, cpu = time.monotonic(), time.process_time()
        with pytest.raises(QueueTimeoutError, match="reader 0 waited for message 1"):
            with reader.next_message(timeout_s=0.5):
                pass
        wall, cpu = time.monotonic() - wall, time.process_time() - cpu
        assert cpu < 0.5 * wall, f"waiting {wall:.2f} s took {cpu:.2f} s of CPU"
    finally:
        reader.close()
        writer.close()


def test_the_segment_is_removed_by_close_and_by_garbage_collection():
    writer = ShmQueueWriter(num_readers=1, capacity_bytes=64)
    name = writer.name
    assert segment_exists(name)
    writer.close()
    assert not segment_exists(name)

    writer = ShmQueueWriter(num_readers=1, capacity_bytes=64)
    name = writer.name
    del writer
    gc.collect()
    assert not segment_exists(name)


def test_a_slot_holds_the_largest_step_of_the_config():
    from nanovllm.config import EngineConfig
    from nanovllm.runner.tp_worker import max_step_ints

    config = EngineConfig(device="cpu", max_num_batched_tokens=8192, max_num_seqs=256, max_model_len=8192)
    # header 8; input_ids, positions, slot_mapping 3 x 8192; query_start_loc 257; seq_lens 256; block tables
    # 256 x 512; logits_indices 256 + 8192 (sampling rows, then prompt rows scored for prompt_logprobs);
    # pending_index and pending_row 2 x 256 (docs/reference/tensor-parallel.md quotes the bytes)
    assert max_step_ints(config) == 8 + 3 * 8192 + 257 + 256 + 256 * 512 + 256 + 8192 + 2 * 256
    assert max_step_ints(config) * 8 == 1_321_032


def test_a_zombie_process_does_not_count_as_alive():
    process = spawn.Process(target=time.sleep, args=(WAIT_S,))
    process.start()
    try:
        assert process_alive(process.pid)
        os.kill(process.pid, signal.SIGKILL)
        deadline = time.monotonic() + WAIT_S
        while process_alive(process.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not process_alive(process.pid)
    finally:
        process.join(timeout=WAIT_S)
