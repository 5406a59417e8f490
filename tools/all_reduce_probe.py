"""One all-reduce of a [T, H] decode batch between two GPUs of this host, timed inside CUDA graphs as
the decode graphs hold them: NCCL, the peer kernel (ops/all_reduce_triton.py) and, where this torch
has them, torch's symmetric-memory one-shot and two-shot all-reduces.

With --check it first checks the peer kernel: every rank gets the reference's bits (every rank's x
added in float32 in rank order), eagerly and replayed in a graph, its flags are all zero after, and
an abort ends a kernel whose peer never comes. The exit status is non-zero if a check fails.

    python3 tools/all_reduce_probe.py --check --json all-reduce.json

A timing is a graph of 64 all-reduces of one tensor (the peer kernel alternating two slots),
replayed 20 times by both GPUs at once after a barrier: microseconds per all-reduce on rank 0's GPU,
and its host's microseconds to launch the graph (the `launch` columns).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nanovllm.ops.all_reduce_triton import FLAGS_BYTES, PeerAllReduce, peer_all_reduce_torch  # noqa: E402

WORLD_SIZE = 2
METHODS = ("nccl", "peer", "torch one-shot", "torch two-shot")
GRAPH_ALL_REDUCES = 64
REPLAYS = 20


def gathered(x: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's x, in rank order (NCCL's all_gather: nothing of the peer kernel's)."""
    xs = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(xs, x)
    return xs


def check_peer(peer: PeerAllReduce, rank: int, device: torch.device, batches: list[int], hidden: int) -> None:
    for dtype in (torch.bfloat16, torch.float32):
        for num_tokens in batches:
            generator = torch.Generator(device=device).manual_seed(1000 * rank + num_tokens)
            x = torch.randn(num_tokens, hidden, generator=generator, device=device).to(dtype)    # [T, H]
            if not peer.takes(x):            # larger than a slot: the engine sends it to NCCL
                continue
            expected = peer_all_reduce_torch(gathered(x))
            for slot in range(3):
                y = x.clone()
                peer.all_reduce(y, slot)
                if not torch.equal(y, expected):
                    raise AssertionError(f"rank {rank}: {dtype} [{num_tokens}, {hidden}] slot {slot}: "
                                         f"{(y != expected).sum().item()} sums differ from the reference")
    # Replayed in a graph: three all-reduces in turn (the embedding's, the attention's, the MLP's slot).
    buffers = [torch.zeros(7, hidden, dtype=torch.bfloat16, device=device) for _ in range(3)]
    for slot, buffer in enumerate(buffers):    # compiles the kernel before the capture
        peer.all_reduce(buffer, slot)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for slot, buffer in enumerate(buffers):
            peer.all_reduce(buffer, slot)
    for replay in range(5):
        inputs = [torch.randn(7, hidden, device=device).to(torch.bfloat16) + rank + replay for _ in buffers]
        for buffer, x in zip(buffers, inputs):
            buffer.copy_(x)
        graph.replay()
        for slot, (buffer, x) in enumerate(zip(buffers, inputs)):
            if not torch.equal(buffer, peer_all_reduce_torch(gathered(x))):
                raise AssertionError(f"rank {rank}: graph replay {replay}, slot {slot}: the sums differ")
    torch.cuda.synchronize()
    flags = peer.buffers[rank][:FLAGS_BYTES].view(torch.int32)
    if flags.any():
        raise AssertionError(f"rank {rank}: {flags.count_nonzero().item()} flags left set after the all-reduces")


def check_abort(peer: PeerAllReduce, rank: int, device: torch.device, hidden: int) -> None:
    """Rank 0 all-reduces alone (rank 1 never comes): its kernel must wait, then end at the abort. (Last:
    rank 0's signal stays in rank 1's flags.)"""
    dist.barrier()
    if rank == 0:
        peer.all_reduce(torch.ones(8, hidden, device=device), 0)
        done = torch.cuda.Event()
        done.record()
        time.sleep(0.5)
        waited = not done.query()
        peer.abort()
        deadline = time.monotonic() + 10.0
        while not done.query() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not waited or not done.query():
            raise AssertionError(f"the lone kernel waited: {waited}; ended after the abort: {done.query()}")
    dist.barrier()


def all_reduce_methods(peer: PeerAllReduce, group, device: torch.device, max_numel: int, wanted: list[str]) -> dict:
    """name -> (x [T, H], graph position) -> None: one all-reduce of x, in place; of the names wanted."""
    methods = {"nccl": lambda x, i: dist.all_reduce(x),
               "peer": lambda x, i: peer.all_reduce(x, i % 2)}
    if not any(name.startswith("torch") for name in wanted):
        return {name: methods[name] for name in wanted}
    try:
        from torch.distributed import _symmetric_memory as symmetric_memory
        staging = symmetric_memory.empty(max_numel, dtype=torch.bfloat16, device=device)     # [max_numel]
        symmetric_memory.rendezvous(staging, group)
    except Exception as error:   # noqa: BLE001 (reported in the table)
        print(f"torch symmetric memory: {error}", file=sys.stderr)
        return {name: methods[name] for name in wanted if name in methods}

    def one_shot(x: torch.Tensor, i: int) -> None:
        staging[:x.numel()].copy_(x.view(-1))
        x.view(-1).copy_(torch.ops.symm_mem.one_shot_all_reduce(staging[:x.numel()], "sum", group.group_name))

    def two_shot(x: torch.Tensor, i: int) -> None:
        staging[:x.numel()].copy_(x.view(-1))
        torch.ops.symm_mem.two_shot_all_reduce_(staging[:x.numel()], "sum", group.group_name)
        x.view(-1).copy_(staging[:x.numel()])

    methods.update({"torch one-shot": one_shot, "torch two-shot": two_shot})
    return {name: methods[name] for name in wanted}


def time_in_graph(all_reduce, x: torch.Tensor) -> tuple[float, float]:
    """A graph of GRAPH_ALL_REDUCES all-reduces, replayed REPLAYS times -> (GPU microseconds per all-reduce,
    host microseconds per replay call: the launch alone, which the profile of a TP=2 step found slow
    for graphs holding NCCL's kernels)."""
    all_reduce(x, 1)                           # compiles, warms NCCL; position 1: the graph's first takes slot 0
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(GRAPH_ALL_REDUCES):
            all_reduce(x, i)
    graph.replay()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    launch_s = 0.0
    start.record()
    for _ in range(REPLAYS):
        began = time.perf_counter()
        graph.replay()
        launch_s += time.perf_counter() - began
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / (REPLAYS * GRAPH_ALL_REDUCES), launch_s * 1e6 / REPLAYS


def exit_at_deadline(rank: int, seconds: float) -> None:
    """A kernel that never gets its peer's signal spins for good, and so would its process: end it
    after `seconds` (the other rank goes with it: mp.spawn stops the rest when one fails)."""
    def expire() -> None:
        print(f"rank {rank}: not done after {seconds:.0f} s; exiting (a kernel waiting for its peer?)", flush=True)
        os._exit(3)
    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()


def run_rank(rank: int, port: int, args: argparse.Namespace) -> None:
    exit_at_deadline(rank, args.deadline)
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
                            device_id=device)
    group = dist.group.WORLD
    peer = PeerAllReduce.start(group, device)
    if args.check:
        check_peer(peer, rank, device, args.batches, args.hidden)
        print(f"rank {rank}: checked: the peer all-reduce gives the reference's bits", flush=True)
    methods = all_reduce_methods(peer, group, device, max(args.batches) * args.hidden, args.methods)
    rows = []
    for num_tokens in args.batches:
        row = {"batch": num_tokens, "bytes": num_tokens * args.hidden * 2}
        for name, all_reduce in methods.items():
            x = torch.zeros(num_tokens, args.hidden, dtype=torch.bfloat16, device=device)   # [T, H]: sums stay 0
            if name == "peer" and not peer.takes(x):
                continue
            try:
                gpu_us, launch_us = time_in_graph(all_reduce, x)
                row[name], row[f"{name} launch"] = round(gpu_us, 2), round(launch_us, 1)
            except Exception as error:  # noqa: BLE001 (reported in the table)
                row[name] = f"failed: {str(error).splitlines()[0][:120]}"
        rows.append(row)
    if args.check:
        check_abort(peer, rank, device, args.hidden)
        print(f"rank {rank}: checked: an abort ends a kernel whose peer never comes", flush=True)
    if rank == 0:
        report(rows, args)
    dist.barrier()
    dist.destroy_process_group()


def report(rows: list[dict], args: argparse.Namespace) -> None:
    methods = [name for name in METHODS if any(name in r for r in rows)]
    names = methods + [f"{name} launch" for name in methods]
    print(f"{torch.cuda.get_device_name()} x {WORLD_SIZE}, torch {torch.__version__}, NCCL "
          f"{'.'.join(map(str, torch.cuda.nccl.version()))}; one all-reduce of [T, {args.hidden}] bfloat16 in a "
          f"CUDA graph of {GRAPH_ALL_REDUCES}, us on the GPU; then the host's us to launch that graph")
    print("| T | bytes | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for row in rows:
        print(f"| {row['batch']} | {row['bytes']:,} | " + " | ".join(str(row.get(n, "-")) for n in names) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": torch.cuda.get_device_name(), "world_size": WORLD_SIZE, "torch": torch.__version__,
            "hidden": args.hidden, "graph_all_reduces": GRAPH_ALL_REDUCES, "replays": REPLAYS, "unit": "us",
            "rows": rows}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=4096, help="H (Llama-3.1-8B: 4096)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256])
    parser.add_argument("--check", action="store_true", help="check the peer kernel's sums and abort first")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="the all-reduces timed")
    parser.add_argument("--json", help="write the timings here")
    parser.add_argument("--deadline", type=float, default=120.0, help="seconds before each rank gives up and exits")
    args = parser.parse_args()
    if torch.cuda.device_count() < WORLD_SIZE:
        sys.exit(f"needs {WORLD_SIZE} CUDA GPUs; this machine has {torch.cuda.device_count()}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run_rank, args=(port, args), nprocs=WORLD_SIZE)


if __name__ == "__main__":
    main()
