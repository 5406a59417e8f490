"""Tensor-parallel worker processes: ranks 1..N-1 run the same forward as the engine's rank 0.

With `tensor_parallel_size=N` the engine process is rank 0: it alone runs the
scheduler and the block manager, and it alone samples. Ranks 1..N-1 hold the
other shards of the weights and of the KV cache (see model/parallel.py), and
each step they run exactly the forward pass rank 0 runs, so the all-reduces
inside the model meet.

Two ways to get the ranks:

- the engine spawns them (`WorkerGroup.start`): N-1 processes on this machine,
  joined through a TCPStore on a free localhost port; gloo on the CPU, NCCL on
  CUDA (rank r uses GPU r);
- `torchrun` starts every rank (on one machine or several): the process group
  comes from the launcher's environment, rank 0 runs the engine and the others
  call `model_runner.run_worker` (`torchrun ... -m nanovllm.tp_main` does both).

What a rank other than 0 runs (`model_runner.serve_rank`) is handed to
`WorkerGroup.start`, so that this module never imports the model runner.

Each step rank 0 sends the batch to the other ranks as int64 numbers, never
pickled Python objects: a header with the sizes, then one payload with the
batch's six tensors joined:

    header   [8]   STEP or SHUTDOWN, T, B, max_blocks, N, max_query_len, max_seq_len, P
    payload        input_ids [T']; positions [T']; slot_mapping [T']; logits_indices [N] (rows that need
                   logits); query_start_loc [B + 1]; seq_lens [B]; block_tables [B * max_blocks];
                   pending_index [P]; pending_row [P]

T' is T rounded up to even, so that the four int64 parts, which the ranks run as views of the payload
on the device, start a multiple of 16 bytes into it: a Triton kernel specializes on its pointers' alignment, and an
8-byte-aligned view would compile another copy of it in the middle of serving. The three int32 parts
become copies. With async scheduling (engine.py) the newest token of a decode row may still be on
rank 0's device: pending_index lists those rows of input_ids, pending_row the rows of the last step's
samples that hold them, and every rank takes them from one broadcast of rank 0's sample buffer
(model_runner.py), queued after the sampling on the device, so that no host waits for it.

How they travel depends on where the ranks are:

- spawned workers share this machine: rank 0 makes header and payload, as one
  message, straight from the step's Python lists (`step_message`) and writes it
  into a shared-memory ring buffer (shm_queue.py), which every worker polls; a
  worker copies the payload to its device itself. Rank 0 then copies the same
  payload to its own device and unpacks it as the workers do, so every rank
  runs tensors made the same way, and the workers start before rank 0's copy. Its slots hold the
  largest step the config allows (`max_step_ints`), computed, not guessed;
- under torchrun the ranks may be on several machines: two torch.distributed
  broadcasts, the header then the payload (each costs tens of microseconds of
  host time on either side, so the six tensors travel as one).

Start and stop are checked: a rank that fails to load its shard makes every
rank give up at the first collective (an agreement on "loaded"), and rank 0
raises with the worker's traceback; a worker found dead before or during a
step ends the engine's requests with `WorkerDiedError` (naming the error it
raised, if it raised one) and shuts the others down; a worker whose engine
process is gone exits by itself. A spawned worker that raises leaves its
traceback in a file of the temporary folder, which rank 0 reads and removes.
"""
from __future__ import annotations

import itertools
import math
import multiprocessing.connection
import os
import pickle
import sys
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Callable, Iterator, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanovllm.config import EngineConfig
from nanovllm.model.parallel import ParallelState
from nanovllm.ops.attention import AttentionMetadata
from nanovllm.runner.sampler import host_to_device
from nanovllm.runner.shm_queue import QueueTimeoutError, ReaderDiedError, ShmQueueReader, ShmQueueWriter

if TYPE_CHECKING:
    from nanovllm.ops.all_reduce_triton import PeerAllReduce
    from nanovllm.runner.cuda_graph import DecodeGraphs, MixedGraphs

STEP, SHUTDOWN = 1, 0
HEADER_SIZE = 8
STARTUP_TIMEOUT = timedelta(minutes=5)     # rendezvous of the ranks
# A worker waits in a broadcast for the next step, however long the engine stays idle.
COLLECTIVE_TIMEOUT = timedelta(days=365)
JOIN_TIMEOUT_S = 30.0                      # for workers to exit after SHUTDOWN before they are killed
FAILED_JOIN_TIMEOUT_S = 5.0                # for workers to exit after a failure before they are killed
ABORT_TIMEOUT_S = 10.0                     # for NCCL to abort a group whose peer is gone
WATCH_INTERVAL_S = 0.05                    # rank 0 checks the workers' processes this often while it polls its GPU


class Step(NamedTuple):
    """One step as every rank runs it."""
    input_ids: torch.Tensor           # [T]
    positions: torch.Tensor           # [T]
    metadata: AttentionMetadata
    logits_indices: torch.Tensor      # [N]
    pending_index: torch.Tensor       # [P] rows of input_ids whose token is still on rank 0's device ...
    pending_row: torch.Tensor         # [P] ... at these rows of its sample buffer (async scheduling)


# What a rank other than 0 runs once it has joined the group (model_runner.serve_rank); passed in, so
# that this module, which the model runner imports, never imports the model runner.
ServeRank = Callable[[EngineConfig, int], None]


class WorkerDiedError(RuntimeError):
    """A tensor-parallel rank is gone; the engine cannot run a step without it."""


def max_step_ints(config: EngineConfig) -> int:
    """The longest step message the config allows, in int64s: header and payload with T, B and max_blocks at
    their limits (N <= B + T: a row per sequence that samples, plus the prompt rows whose log-probabilities
    are asked for)."""
    num_tokens, num_seqs = config.max_num_batched_tokens, config.max_num_seqs
    max_blocks = -(-config.max_model_len // config.block_size)
    # the header of that step: N = B + T logits rows, and P = B pending rows
    return HEADER_SIZE + _payload_size([STEP, num_tokens, num_seqs, max_blocks, num_seqs + num_tokens, 0, 0, num_seqs])


class HostStep(NamedTuple):
    """One step's inputs as plain Python lists on the host, as rank 0 schedules them (model_runner.host_inputs)."""
    input_ids: list[int]            # [T]
    positions: list[int]            # [T]
    slot_mapping: list[int]         # [T]
    query_start_loc: list[int]      # [B + 1]
    seq_lens: list[int]             # [B]
    block_tables: list[list[int]]   # [B][max_blocks], padded with -1
    logits_indices: list[int]       # [N]
    max_query_len: int
    pending_index: list[int]        # [P] rows of input_ids whose token is still on the device (async scheduling) ...
    pending_row: list[int]          # [P] ... at these rows of the last step's samples


def step_message(step: HostStep) -> np.ndarray:
    """The step as one message of int64s, header then payload (the wire format above), in one pass over the lists."""
    num_tokens, num_seqs = len(step.input_ids), len(step.seq_lens)
    max_blocks = len(step.block_tables[0])
    header = [STEP, num_tokens, num_seqs, max_blocks, len(step.logits_indices), step.max_query_len,
              max(step.seq_lens), len(step.pending_index)]
    pad = [0] * (_even(num_tokens) - num_tokens)
    numbers = itertools.chain(header, step.input_ids, pad, step.positions, pad, step.slot_mapping, pad,
                              step.logits_indices, step.query_start_loc, step.seq_lens,
                              itertools.chain.from_iterable(step.block_tables), step.pending_index,
                              step.pending_row)
    return np.fromiter(numbers, dtype=np.int64, count=HEADER_SIZE + _payload_size(header))


def backend_for(device: str) -> str:
    return "nccl" if device == "cuda" else "gloo"


def launched_by_torchrun() -> bool:
    """True when a launcher (torchrun) started this process as one rank of a group."""
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def join_launched_group(config: EngineConfig) -> tuple[int, bool]:
    """Join the group described by torchrun's environment (or the one already made);
    -> (this rank, whether we created the group and so must destroy it)."""
    created = not dist.is_initialized()
    if created:
        if config.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend_for(config.device), timeout=COLLECTIVE_TIMEOUT)
    if dist.get_world_size() != config.tensor_parallel_size:
        raise ValueError(f"the launcher started {dist.get_world_size()} ranks but tensor_parallel_size is "
                         f"{config.tensor_parallel_size}; make them equal (torchrun --nnodes x --nproc-per-node)")
    return dist.get_rank(), created


def all_ranks_agree(ok: bool, device: torch.device) -> bool:
    """A collective every rank calls once at start-up: True if every rank passes ok=True."""
    flag = torch.tensor([int(ok)], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def min_over_ranks(value: int, device: torch.device) -> int:
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def start_peer_all_reduce(parallel: ParallelState, device: torch.device) -> PeerAllReduce:
    """all_reduce="peer", on every rank at start-up: map every rank's buffer (a collective) -> this rank's
    PeerAllReduce. If any rank cannot, every rank raises RuntimeError, rather than one rank summing
    through NCCL while another waits in the kernel."""
    from nanovllm.ops.all_reduce_triton import PeerAllReduce
    peer, error = None, None
    try:
        peer = PeerAllReduce.start(parallel.group, device)
    except Exception as e:   # no symmetric memory in this torch, GPUs that cannot reach each other, ...
        error = e
    if all_ranks_agree(peer is not None, device):
        return peer
    raise RuntimeError(f"all_reduce='peer' could not map the GPUs' memory ({error or 'on another rank'}); it needs "
                       "torch's symmetric memory and GPUs of one host that reach each other's memory (NVLink or "
                       "PCIe peer access): pass all_reduce='auto' to sum through NCCL")


# ---- rank 0 ----------------------------------------------------------------------------------

@dataclass
class WorkerGroup:
    """Rank 0's handle on the other ranks: sends each step, checks they live, stops them."""
    device: torch.device
    context: mp.ProcessContext | None          # None under torchrun: the launcher owns the processes
    owns_process_group: bool
    error: str | None = None                   # why the group stopped, once it has
    closed: bool = False                       # shut down (a later call must not touch a newer group)
    graphs: "list[DecodeGraphs | MixedGraphs]" = field(default_factory=list)   # rank 0's CUDA graphs,
                                               # released before the group goes
    peer: "PeerAllReduce | None" = None        # all_reduce="peer": aborted when a worker dies, so nothing waits;
                                               # closed after the graphs on a clean stop
    steps: ShmQueueWriter | None = None        # spawned workers read their steps here; None: broadcasts
    worker_errors: dict[int, str] = field(default_factory=dict)   # rank -> the traceback of a spawned worker
                                               # that raised (_take_worker_error)

    @classmethod
    def start(cls, config: EngineConfig, parallel: ParallelState, serve_rank: ServeRank) -> "WorkerGroup":
        """Start (or, under torchrun, join) ranks 1..N-1 and wait until every rank has loaded its shard;
        a spawned rank runs serve_rank(config, rank)."""
        device = torch.device(config.device)
        if launched_by_torchrun():
            rank, created = join_launched_group(config)
            if rank != 0:
                raise ValueError(f"rank {rank} called the engine; under torchrun only rank 0 runs the engine, "
                                 "the others call nanovllm.runner.model_runner.run_worker(config)")
            group = cls(device, None, created)
        else:
            steps = ShmQueueWriter(num_readers=config.tensor_parallel_size - 1,
                                   capacity_bytes=max_step_ints(config) * 8)
            try:
                context = _spawn_workers(config, serve_rank, steps.name)
            except BaseException:
                steps.close()
                raise
            group = cls(device, context, True, steps=steps)
        parallel.group = dist.group.WORLD
        if not all_ranks_agree(True, device):
            group.error = "a tensor-parallel rank failed to load its shard"
            group.shutdown()
            raise RuntimeError(group.error + group._failure_details())
        return group

    def _failure_details(self) -> str:
        """The failed worker's traceback (spawned workers, once shut down), or where to look for it."""
        if self.worker_errors:
            rank = min(self.worker_errors)
            return f":\nrank {rank}: {self.worker_errors[rank]}"
        return "; see that rank's log"

    def _take_worker_error(self, rank: int) -> str | None:
        """The traceback spawned worker `rank` (exited) left when it raised, if it did, kept in worker_errors;
        its error file is removed (_take_error_file)."""
        if self.context is not None and rank not in self.worker_errors:
            traceback = _take_error_file(self.context.error_files[rank - 1])
            if traceback is not None:
                self.worker_errors[rank] = traceback
        return self.worker_errors.get(rank)

    @property
    def processes(self) -> list[mp.Process]:
        return [] if self.context is None else list(self.context.processes)

    def wait_for_device(self) -> None:
        """Wait for the work queued on this GPU (the step's forward and its NCCL collectives) while
        watching the workers. A gloo collective fails when its peer's socket closes, but NCCL waits for
        a dead peer forever: blocking in a device sync would hang the engine. Polling lets rank 0 see
        the dead worker and raise WorkerDiedError instead."""
        _poll_device(watch=self.check_alive)

    def wait_for(self, event: torch.cuda.Event) -> None:
        """Wait until `event` (recorded on this GPU) has completed, watching the workers (wait_for_device)."""
        _poll_device(watch=self.check_alive, event=event)

    def check_alive(self, wait_s: float = 0.0) -> None:
        """Raise WorkerDiedError (after shutting the others down) if a worker has exited;
        wait_s > 0 gives a dying worker that long to be reaped."""
        if self.error is not None:
            self.shutdown()
            raise WorkerDiedError(self.error)
        processes = self.processes
        if wait_s > 0 and processes:
            multiprocessing.connection.wait([p.sentinel for p in processes], timeout=wait_s)
        for rank, process in enumerate(processes, start=1):
            if not process.is_alive():
                process.join()    # reaped: its error file, if any, is whole
                traceback = self._take_worker_error(rank)
                raised = f" after raising {traceback.strip().splitlines()[-1]}" if traceback else ""
                self.error = (f"tensor-parallel worker rank {rank} (pid {process.pid}) exited with code "
                              f"{process.exitcode}{raised}; the engine cannot run without it, start a new one")
                self.shutdown()
                raise WorkerDiedError(self.error)

    def send_step(self, step: HostStep) -> Step:
        """Send one step to every worker, through the shared-memory queue or broadcast (torchrun) -> rank 0's
        tensors of it, unpacked from the same message as the workers'."""
        message = step_message(step)                                     # [HEADER_SIZE + payload] int64
        header, payload = message[:HEADER_SIZE], torch.from_numpy(message[HEADER_SIZE:])
        if self.steps is not None:     # the workers' copies start before rank 0's own
            self.steps.write([torch.from_numpy(message)], watch=self.check_alive)
        payload = host_to_device(payload, torch.int64, self.device)      # on the CPU, the message's own view
        if self.steps is None:
            dist.broadcast(host_to_device(torch.from_numpy(header), torch.int64, self.device), src=0)
            dist.broadcast(payload, src=0)
        return _unpack_step(header.tolist(), payload)

    def _send_shutdown(self) -> bool:
        """Send SHUTDOWN to every worker -> whether it went out."""
        header = torch.tensor([SHUTDOWN] + [0] * (HEADER_SIZE - 1), dtype=torch.int64)   # [HEADER_SIZE]
        if self.steps is not None:
            try:
                self.steps.write([header], timeout_s=JOIN_TIMEOUT_S)
            except (ReaderDiedError, QueueTimeoutError):
                return False
            return True
        dist.broadcast(header.to(self.device), src=0)
        if self.device.type == "cuda":   # the message must be out before the group goes
            _poll_device(timeout_s=JOIN_TIMEOUT_S)
        return True

    def shutdown(self) -> None:
        """Tell the workers to stop, wait for them (killing any that hang), leave the process group.
        After a failure (error set) no message is sent: the workers get a few seconds, then are killed."""
        if self.closed:
            return
        self.closed = True
        processes = self.processes
        clean = self.error is None and all(p.is_alive() for p in processes)
        if clean:
            clean = self._send_shutdown()
        self.error = self.error or "the tensor-parallel workers were shut down"
        deadline = time.monotonic() + (JOIN_TIMEOUT_S if clean else FAILED_JOIN_TIMEOUT_S)
        # Release the graphs, then leave the group, before waiting for the workers, which do the same as soon
        # as they read SHUTDOWN. NCCL's teardown of a communicator waits until every graph that captured one
        # of its collectives is gone: with the graphs alive, destroy and abort hung on two H200s.
        if self.peer is not None and not clean:   # a kernel may be waiting for the dead worker: end it
            self.peer.abort()
        for graphs in self.graphs:
            graphs.release()
        self.graphs = []
        if self.peer is not None and clean:       # (after a failure a kernel may still run: left mapped)
            self.peer.close()
        if self.owns_process_group and dist.is_initialized():
            _leave_group(clean, cuda=self.device.type == "cuda")
        for rank, process in enumerate(processes, start=1):
            process.join(timeout=max(deadline - time.monotonic(), 0.1))
            if process.is_alive():
                process.kill()
                process.join()
            self._take_worker_error(rank)
        if self.steps is not None:
            self.steps.close()


def _poll_device(watch: Callable[[], None] | None = None, timeout_s: float = math.inf,
                 event: torch.cuda.Event | None = None) -> None:
    """Wait for the work queued on this GPU (or only for `event`) by polling its completion, never in a
    device sync (an NCCL collective whose peer died never completes): call `watch` (which may raise)
    every WATCH_INTERVAL_S, and give up after timeout_s."""
    done = event
    if done is None:
        done = torch.cuda.Event()
        done.record()
    deadline = time.monotonic() + timeout_s
    next_check = time.monotonic() + WATCH_INTERVAL_S
    while not done.query() and time.monotonic() < deadline:
        if watch is not None and time.monotonic() >= next_check:
            watch()
            next_check = time.monotonic() + WATCH_INTERVAL_S
        time.sleep(0)   # let other threads (a server's event loop) run between polls


def _leave_group(clean: bool, cuda: bool) -> None:
    """Leave the default process group: destroy it after a clean stop; after a failure on CUDA abort
    it, since destroying an NCCL group whose peer died could wait for that peer forever. On CUDA this
    runs in a thread with a time limit, so that even a stuck teardown cannot hang the engine: a destroy
    that does not finish in JOIN_TIMEOUT_S is followed by an abort."""
    if not cuda:
        dist.destroy_process_group()
        return

    def leave(destroy: bool) -> None:
        try:
            dist.destroy_process_group() if destroy else dist.distributed_c10d._abort_process_group()
        except Exception as error:
            print(f"nano-vllm: leaving the NCCL process group failed: {error}", file=sys.stderr)

    for destroy in ((True, False) if clean else (False,)):
        timeout_s = JOIN_TIMEOUT_S if destroy else ABORT_TIMEOUT_S
        thread = threading.Thread(target=leave, args=(destroy,), daemon=True, name="nanovllm-nccl-leave")
        thread.start()
        thread.join(timeout_s)
        if not thread.is_alive():
            return
        print(f"nano-vllm: the NCCL process group did not {'close' if destroy else 'abort'} within "
              f"{timeout_s:.0f} s", file=sys.stderr)


def _spawn_workers(config: EngineConfig, serve_rank: ServeRank, steps_name: str) -> mp.ProcessContext:
    """Start ranks 1..N-1 on this machine, each reading its steps from shared-memory queue `steps_name`,
    and join the process group with them as rank 0."""
    world_size = config.tensor_parallel_size
    if dist.is_initialized():
        raise RuntimeError("a torch.distributed process group already exists in this process; shut down the "
                           "other tensor-parallel engine first (engine.shutdown()): one process runs one at a time")
    if config.device == "cuda" and world_size > torch.cuda.device_count():
        raise ValueError(f"tensor_parallel_size={world_size} needs one GPU per rank but torch sees "
                         f"{torch.cuda.device_count()}; lower it, or start ranks on several machines with torchrun")
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, timeout=STARTUP_TIMEOUT,
                          wait_for_workers=False)
    with _main_not_rerun_in_workers():
        context = mp.start_processes(_worker_process, args=(config, store.port, os.getpid(), serve_rank, steps_name),
                                     nprocs=world_size - 1, join=False, daemon=True, start_method="spawn")
    # Wait for every worker to reach the store, noticing at once one that dies on the way.
    started = [f"started/{rank}" for rank in range(1, world_size)]
    deadline = time.monotonic() + STARTUP_TIMEOUT.total_seconds()
    while not store.check(started):
        try:
            context.join(timeout=0.05)
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            raise _start_failed(context, f"a tensor-parallel worker failed to start: {e}") from None
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
                process.join()
            raise _start_failed(context, f"the tensor-parallel workers did not start within {STARTUP_TIMEOUT}")
    if config.device == "cuda":
        torch.cuda.set_device(0)
        # Rank 0 handles a dead peer itself (wait_for_device, _leave_group); NCCL's watchdog must
        # not tear this process, the engine, down.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
    dist.init_process_group(backend_for(config.device), store=store, rank=0, world_size=world_size,
                            timeout=COLLECTIVE_TIMEOUT)
    return context


def _start_failed(context: mp.ProcessContext, message: str) -> RuntimeError:
    """The error to raise when the workers did not start, their error files removed first."""
    for path in context.error_files:
        _take_error_file(path)
    return RuntimeError(message)


def _take_error_file(path: str) -> str | None:
    """The traceback in a spawned worker's error file, if the worker (exited) wrote one, and the file removed.
    torch.multiprocessing gives each worker a file in the temporary folder, which the worker writes when it
    raises; torch reads it (ProcessContext.join) but never removes it."""
    if not os.path.exists(path):
        return None
    with open(path, "rb") as file:
        traceback = pickle.load(file)
    os.unlink(path)
    return traceback


@contextmanager
def _main_not_rerun_in_workers() -> Iterator[None]:
    """A spawned process first re-runs the parent's `__main__` script from its file. A script read from
    stdin (`python - < script.py`) has no file (its `__file__` is '<stdin>'), so every worker would die
    before it starts. The workers need nothing from `__main__` (their entry and arguments live in this
    package), so while they start, a `__main__` without a real file is not named to them."""
    main = sys.modules["__main__"]
    path = getattr(main, "__file__", None)
    if getattr(main, "__spec__", None) is not None or path is None or os.path.isfile(path):
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path


def stop_with(owner: object, workers: WorkerGroup) -> None:
    """Shut the workers down when `owner` is garbage-collected or the interpreter exits."""
    weakref.finalize(owner, workers.shutdown)


# ---- ranks 1..N-1 ----------------------------------------------------------------------------

# A spawned worker reads its steps from the engine's shared-memory queue (attached in _worker_process);
# under torchrun this stays None and the steps come by broadcast.
_steps_from_engine: ShmQueueReader | None = None


def _worker_process(index: int, config: EngineConfig, store_port: int, engine_pid: int,
                    serve_rank: ServeRank, steps_name: str) -> None:
    """Entry of a spawned worker: rank index + 1, reader `index` of the engine's step queue."""
    global _steps_from_engine
    rank = index + 1
    threading.Thread(target=_exit_when_engine_is_gone, args=(engine_pid,), daemon=True).start()
    _steps_from_engine = ShmQueueReader(steps_name, index)
    if config.device == "cuda":
        torch.cuda.set_device(rank)
    store = dist.TCPStore("127.0.0.1", store_port, config.tensor_parallel_size, is_master=False,
                          timeout=STARTUP_TIMEOUT)
    store.set(f"started/{rank}", "1")
    dist.init_process_group(backend_for(config.device), store=store, rank=rank,
                            world_size=config.tensor_parallel_size, timeout=COLLECTIVE_TIMEOUT)
    try:
        serve_rank(config, rank)
    finally:
        dist.destroy_process_group()
        _steps_from_engine.close()


def _exit_when_engine_is_gone(engine_pid: int) -> None:
    """A worker blocked in a collective cannot notice its engine died (NCCL waits); this thread can.
    (A worker waiting for its next step notices by itself: the queue checks its writer.)"""
    while os.getppid() == engine_pid:
        time.sleep(1.0)
    os._exit(1)


def receive_step(device: torch.device) -> Step | None:
    """The next step sent by rank 0, or None for SHUTDOWN."""
    if _steps_from_engine is not None:
        with _steps_from_engine.next_message() as message:                  # [HEADER_SIZE + payload] int64
            header = message[:HEADER_SIZE].tolist()
            if header[0] == SHUTDOWN:
                return None
            if message.shape[0] != HEADER_SIZE + _payload_size(header):
                raise RuntimeError(f"a step message of {message.shape[0]} int64s does not match its header {header}")
            payload = _copy_to_device(message[HEADER_SIZE:], device)       # the slot is reused after this block
        return _unpack_step(header, payload)
    header_tensor = torch.empty(HEADER_SIZE, dtype=torch.int64, device=device)
    dist.broadcast(header_tensor, src=0)
    header = header_tensor.tolist()
    if header[0] == SHUTDOWN:
        return None
    payload = torch.empty(_payload_size(header), dtype=torch.int64, device=device)
    dist.broadcast(payload, src=0)
    return _unpack_step(header, payload)


def _payload_size(header: list[int]) -> int:
    _, num_tokens, num_seqs, max_blocks, num_logits, _, _, num_pending = header
    return 3 * _even(num_tokens) + num_logits + 2 * num_seqs + 1 + num_seqs * max_blocks + 2 * num_pending


def _even(num_tokens: int) -> int:
    """T' of the wire format: T rounded up to even."""
    return num_tokens + num_tokens % 2


def _copy_to_device(view: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of a queue slot's int64s on `device`; on CUDA through pinned memory, so that the copy to the GPU
    is asynchronous (the caching host allocator keeps the pinned block until that copy is done)."""
    if device.type != "cuda":
        return view.clone()
    staging = torch.empty(view.shape, dtype=torch.int64, pin_memory=True)     # [n]
    staging.copy_(view)
    return staging.to(device, non_blocking=True)


def _unpack_step(header: list[int], payload: torch.Tensor) -> Step:
    """header and payload (wire format above) -> the step's tensors, views of the payload or int32 copies."""
    _, num_tokens, num_seqs, max_blocks, num_logits, max_query_len, max_seq_len, num_pending = header
    token_rows, logits_indices, query_start_loc, seq_lens, block_tables, pending_index, pending_row = payload.split(
        [3 * _even(num_tokens), num_logits, num_seqs + 1, num_seqs, num_seqs * max_blocks, num_pending, num_pending])
    token_rows = token_rows.view(3, -1)[:, :num_tokens]                                  # [3, T]
    query_start_loc = query_start_loc.to(torch.int32)                                    # [B + 1]
    seq_lens = seq_lens.to(torch.int32)                                                  # [B]
    block_tables = block_tables.view(num_seqs, max_blocks).to(torch.int32)               # [B, max_blocks]
    metadata = AttentionMetadata(query_start_loc=query_start_loc, seq_lens=seq_lens, slot_mapping=token_rows[2],
                                 block_tables=block_tables, max_query_len=max_query_len, max_seq_len=max_seq_len)
    return Step(token_rows[0], token_rows[1], metadata, logits_indices, pending_index, pending_row)
