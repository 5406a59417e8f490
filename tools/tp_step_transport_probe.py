"""Probe: the host time to get one decode step from rank 0 to a worker, through the shared-memory queue
and through two gloo broadcasts, on the CPU, without a model.

Two processes run the engine's own code: rank 0 calls WorkerGroup.send_step (the step's lists to a
message, sent, and rank 0's own tensors unpacked from it), the worker calls receive_step, and after each
step both join one gloo all-reduce of one number (the forward's all-reduces
keep the real ranks in step the same way). Per step it reports, as medians over STEPS steps:
the time inside send_step on rank 0 ("send"); inside receive_step on the worker, which enters it
as rank 0 starts sending ("receive": rank 0's send, the transfer, the unpacking); and the whole round
less a round of the all-reduce alone ("step less the all-reduce"). On a busy machine the last two
count the waits for a core too; so the queue's two calls are also timed in one process, back to back,
with nothing to wait for (the work alone).

    python tools/tp_step_transport_probe.py
"""
from __future__ import annotations

import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanovllm.runner import tp_worker
from nanovllm.runner.shm_queue import ShmQueueReader, ShmQueueWriter

STEPS, WARMUP = 2000, 200
BATCHES = (1, 256)
MAX_BLOCKS = 32          # a context of up to 512 tokens in blocks of 16


def decode_step(batch: int) -> tp_worker.HostStep:
    """A decode step of `batch` sequences as rank 0's host_inputs makes it."""
    return tp_worker.HostStep(input_ids=list(range(batch)), positions=[499] * batch,
                              slot_mapping=[row * 512 + 499 for row in range(batch)],
                              query_start_loc=list(range(batch + 1)), seq_lens=[500] * batch,
                              block_tables=[[row * MAX_BLOCKS + block for block in range(MAX_BLOCKS)]
                                            for row in range(batch)],
                              logits_indices=list(range(batch)), max_query_len=1, pending_index=[],
                              pending_row=[])


def join_group(rank: int, port: int) -> None:
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)


def ack() -> None:
    dist.all_reduce(torch.zeros(1, dtype=torch.int64))


def worker(index: int, port: int, queue_name: str, results: mp.Queue) -> None:
    join_group(1, port)
    reader = ShmQueueReader(queue_name, 0)
    for transport in ("none", "shm", "gloo"):
        tp_worker._steps_from_engine = reader if transport == "shm" else None
        for batch in BATCHES:
            times = []
            for step in range(WARMUP + STEPS):
                ack()                                  # rank 0 starts the step's clock after this
                if transport != "none":
                    start = time.perf_counter()
                    tp_worker.receive_step(torch.device("cpu"))
                    times.append(time.perf_counter() - start)
                ack()
            results.put((transport, batch, times[WARMUP:]))
    reader.close()
    dist.destroy_process_group()


def queue_calls_in_one_process(batch: int) -> tuple[float, float]:
    """(send_step, receive_step) through the queue, writer and reader in this process -> medians in us."""
    writer = ShmQueueWriter(num_readers=1, capacity_bytes=1 << 20)
    tp_worker._steps_from_engine = reader = ShmQueueReader(writer.name, 0)
    group = tp_worker.WorkerGroup(torch.device("cpu"), None, False, steps=writer)
    step = decode_step(batch)
    send, receive = [], []
    for _ in range(WARMUP + STEPS):
        start = time.perf_counter()
        group.send_step(step)
        sent = time.perf_counter()
        tp_worker.receive_step(torch.device("cpu"))
        send.append(sent - start)
        receive.append(time.perf_counter() - sent)
    tp_worker._steps_from_engine = None
    reader.close()
    writer.close()
    return statistics.median(send[WARMUP:]) * 1e6, statistics.median(receive[WARMUP:]) * 1e6


def main() -> None:
    port = 29_000 + os.getpid() % 1000
    writer = ShmQueueWriter(num_readers=1, capacity_bytes=1 << 20)
    results = mp.get_context("spawn").Queue()
    context = mp.start_processes(worker, args=(port, writer.name, results), nprocs=1, join=False,
                                 start_method="spawn")
    join_group(0, port)
    rows = {}
    for transport in ("none", "shm", "gloo"):
        group = tp_worker.WorkerGroup(torch.device("cpu"), None, False, steps=writer if transport == "shm" else None)
        for batch in BATCHES:
            step = decode_step(batch)
            send, whole = [], []
            for _ in range(WARMUP + STEPS):
                ack()
                start = time.perf_counter()
                if transport != "none":
                    group.send_step(step)
                sent = time.perf_counter()
                ack()
                send.append(sent - start)
                whole.append(time.perf_counter() - start)
            rows[transport, batch] = (send[WARMUP:], whole[WARMUP:])
    received = {(transport, batch): times for transport, batch, times in (results.get() for _ in range(6))}
    context.join()
    dist.destroy_process_group()
    writer.close()

    def us(times: list[float]) -> float:
        return statistics.median(times) * 1e6

    print(f"decode steps (T = B, {MAX_BLOCKS} blocks per sequence), medians over {STEPS} steps, in us:")
    print("| transport | batch | payload bytes | send (rank 0) | receive (worker) | step less the all-reduce |")
    print("|---|---|---|---|---|---|")
    for transport in ("shm", "gloo"):
        for batch in BATCHES:
            send, whole = rows[transport, batch]
            payload = 8 * len(tp_worker.step_message(decode_step(batch)))
            extra = us(whole) - us(rows["none", batch][1])
            print(f"| {transport} | {batch} | {payload} | {us(send):.1f} | {us(received[transport, batch]):.1f} | "
                  f"{extra:.1f} |")
    for batch in BATCHES:
        send_us, receive_us = queue_calls_in_one_process(batch)
        print(f"| shm, one process | {batch} | | {send_us:.1f} | {receive_us:.1f} | |")


if __name__ == "__main__":
    main()
