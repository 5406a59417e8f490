"""Probe: the host time per step of the server's engine core against the offline loop, with a model that costs nothing.

The server steps the same `LLMEngine` as `LLM.generate`, but its requests stream (one delta output per
request per step), and every step's outputs are encoded into one message for the API process, which
decodes it and hands each request's delta to its caller. On a GPU the host's Python of a step hides
behind the device's forward only while it is shorter; what the server adds per step is what this
measures. The model runner is replaced by a stub that "samples" a fixed token for every row at once,
so all that remains is the host's work: scheduling, completing, outputs, messages. Times are CPU time of
the thread that does the work, so that other work on the machine does not inflate them.

The workload is `throughput`'s shape (256 requests, prompts 100-1024, outputs 100-1024, EOS ignored,
all submitted at once), with async scheduling on as on one GPU. Per step, in microseconds, over all
steps and over those with (nearly) every request running:

    offline      engine.step() of non-streamed requests (what `bench throughput` loops over)
    core step    engine.step_with_deltas() of streamed delta requests (what the core's loop calls)
    core send    EngineCore._send: per-client split, stats, StepOutputs encoding
    socket send  its ZeroMQ send (the I/O thread's work is not counted)
    api dispatch the API process's side, replayed apart from the core's: decoding the step's messages,
                 AsyncLLMEngine._dispatch to the streams
    api chunks   each stream's reader, woken by the dispatch: its outputs, the new tokens' text (the API process
                 decodes a stream without stop strings), one SSE chunk's JSON (the /v1/completions stream's work)

    python tools/core_loop_probe.py [--tokenizer ids|embedded] [--profile offline|core|api] [--num-prompts 256]
                                    [--repeats 3]

`--tokenizer ids` (the default) is what a dummy-weights benchmark serves (token ids decoded as "<id>"),
`embedded` the embedded model's tokenizer. `--profile` runs that part under cProfile and prints its 25
costliest functions.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import tempfile
import time
import uuid

import msgspec
import torch
import zmq

from nanovllm.bench.workloads import throughput_workload
from nanovllm.config import EngineConfig
from nanovllm.engine.async_engine import AsyncLLMEngine, OutputStream
from nanovllm.engine.core import CoreAddresses, EngineCore, StepOutputs, core_info
from nanovllm.engine.engine import LLMEngine
from nanovllm.model.config import ModelConfig
from nanovllm.model.llama import LlamaForCausalLM
from nanovllm.runner.sampler import SamplerOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.tokenizer import TokenIdTokenizer, Tokenizer

VOCAB_SIZE, EOS = 128256, 128001   # Llama-3.2-1B's vocabulary
clock = time.thread_time   # this thread's CPU seconds: other work on the machine does not count
FULL_BATCH = 0.97                  # steps running at least this share of the requests count as "full batch"


class StubSamples:
    def __init__(self, token_ids: list[int]):
        self.token_ids = token_ids

    def result(self) -> SamplerOutput:
        return SamplerOutput(token_ids=self.token_ids, logprobs=[-1.0] * len(self.token_ids), top_logprobs=None)


class StubRunner:
    """ModelRunner's interface to the engine, with no model: every sampling row gets a printable token."""

    def __init__(self):
        self.num_launches = 0

    def launch(self, batch) -> StubSamples | None:
        self.num_launches += 1
        if not batch.sampling_seqs:
            return None
        token = 1000 + self.num_launches % 5000
        return StubSamples([token + row for row in range(len(batch.sampling_seqs))])

    def shutdown(self) -> None:
        pass


def make_engine(tokenizer: Tokenizer, num_prompts: int) -> LLMEngine:
    model_config = ModelConfig(architecture="llama", vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                               max_position_embeddings=4096, eos_token_ids=[EOS])
    with torch.device("cpu"):
        model = LlamaForCausalLM(model_config)
    config = EngineConfig(model="probe", device="cpu", dtype="float32", max_num_seqs=256, max_num_batched_tokens=8192,
                          num_kv_blocks=num_prompts * 130 + 64, async_scheduling=True)
    engine = LLMEngine(config, model=model, tokenizer=tokenizer)
    engine.runner = StubRunner()
    return engine


def requests(num_prompts: int) -> list[tuple[str, list[int], SamplingParams]]:
    workload = throughput_workload(num_prompts)
    return [(f"probe-{i}", r.prompt_token_ids, SamplingParams(temperature=workload.temperature, max_tokens=r.max_tokens,
                                                              ignore_eos=True))
            for i, r in enumerate(workload.requests)]


def run_offline(tokenizer: Tokenizer, num_prompts: int, profiler: cProfile.Profile | None) -> dict[str, list[float]]:
    engine = make_engine(tokenizer, num_prompts)
    engine.add_requests(requests(num_prompts), stream=False)
    times: dict[str, list[float]] = {"offline": [], "batch": []}
    if profiler:
        profiler.enable()
    while engine.has_unfinished_requests():
        batch = len(engine.scheduler.running)
        t0 = clock()
        engine.step()
        times["offline"].append(clock() - t0)
        times["batch"].append(batch)
    if profiler:
        profiler.disable()
    return times


def run_core(tokenizer: Tokenizer, num_prompts: int, profiler: cProfile.Profile | None
             ) -> tuple[dict[str, list[float]], list[list[bytes]]]:
    """The core's loop body over a real socket; -> its times, and each step's messages as the API process
    receives them (replayed by run_api, apart, as the API process is another process)."""
    engine = make_engine(tokenizer, num_prompts)
    base = os.path.join(tempfile.gettempdir(), f"nanovllm-probe-{uuid.uuid4().hex[:8]}")
    addresses = CoreAddresses(input=f"ipc://{base}-in", outputs=[f"ipc://{base}-out0"])
    context = zmq.Context()
    core = EngineCore(engine, context, addresses)
    timed_socket = core.output_sockets[0] = TimedSocket(core.output_sockets[0])
    output_socket = context.socket(zmq.PULL)
    output_socket.connect(addresses.outputs[0])
    engine.add_requests(requests(num_prompts), stream=True, delta=True, detokenize=False)   # no stop strings:
    core.client_of.update(dict.fromkeys(engine.requests, 0))                               # the API process decodes
    times: dict[str, list[float]] = {part: [] for part in ("core step", "core send", "socket send", "batch")}
    received = []
    while engine.has_unfinished_requests():
        batch = len(engine.scheduler.running)
        if profiler:
            profiler.enable()
        t0 = clock()
        outputs, deltas = engine.step_with_deltas()
        t1 = clock()
        core._send(outputs, deltas)
        t2 = clock()
        if profiler:
            profiler.disable()
        messages = []
        while output_socket.poll(1000 if (outputs or deltas) and not messages else 0):
            messages.append(output_socket.recv())
        received.append(messages)
        socket_seconds, timed_socket.seconds = timed_socket.seconds, 0.0
        for part, seconds in zip(times, (t1 - t0, t2 - t1 - socket_seconds, socket_seconds)):
            times[part].append(seconds)
        times["batch"].append(batch)
    core.close()
    output_socket.close(linger=0)
    context.term()
    return times, received


def run_api(tokenizer: Tokenizer, num_prompts: int, received: list[list[bytes]], batches: list[int],
            profiler: cProfile.Profile | None) -> dict[str, list[float]]:
    """The API process's side of each step: its messages dispatched to the streams, then the streams' readers."""
    engine = make_engine(tokenizer, num_prompts)
    base = os.path.join(tempfile.gettempdir(), f"nanovllm-probe-{uuid.uuid4().hex[:8]}")
    api = AsyncLLMEngine(core_info(engine), CoreAddresses(input=f"ipc://{base}-in", outputs=[f"ipc://{base}-out0"]))
    decoder = msgspec.msgpack.Decoder(StepOutputs)
    loop = asyncio.new_event_loop()
    readers = []
    for request_id, _, params in requests(num_prompts):
        stream = api._streams[request_id] = OutputStream(api, [request_id])
        readers.append(loop.create_task(read_stream(stream, tokenizer, params)))
    loop.run_until_complete(asyncio.sleep(0))   # every reader waits on its stream
    times: dict[str, list[float]] = {"api dispatch": [], "api chunks": [], "batch": batches}
    for messages in received:
        if profiler:
            profiler.enable()
        t0 = clock()
        for message in messages:
            api._dispatch(decoder.decode(message))
        t1 = clock()
        loop.run_until_complete(yield_twice())   # the readers woken by the dispatch run
        t2 = clock()
        if profiler:
            profiler.disable()
        times["api dispatch"].append(t1 - t0)
        times["api chunks"].append(t2 - t1)
    loop.run_until_complete(asyncio.gather(*readers))
    loop.close()
    return times


class TimedSocket:
    """The core's output socket, timing its sends."""

    def __init__(self, socket: zmq.Socket):
        self.socket = socket
        self.seconds = 0.0

    def send(self, *args, **kwargs) -> None:
        start = clock()
        try:
            self.socket.send(*args, **kwargs)
        finally:
            self.seconds += clock() - start

    def close(self, *args, **kwargs) -> None:
        self.socket.close(*args, **kwargs)


async def read_stream(stream: OutputStream, tokenizer: Tokenizer, params: SamplingParams) -> None:
    """What the server does with a request's outputs: wait for its stream, decode the new tokens' text, make
    each SSE chunk's JSON (app.py's _completion_chunks)."""
    from nanovllm.server.app import _ChoiceProgress
    from nanovllm.server.protocol import CompletionChoice, CompletionResponse
    from nanovllm.tokenizer import IncrementalDetokenizer

    progress = _ChoiceProgress(IncrementalDetokenizer(tokenizer, [], params.skip_special_tokens))
    async for output in stream:
        for completion in output.outputs:
            if progress.advance(completion, False):
                CompletionResponse(id="cmpl-probe", created=0, model="probe", choices=[CompletionChoice(
                    index=0, text=completion.text, finish_reason=completion.finish_reason)]
                ).model_dump_json(exclude={"usage"})


async def yield_twice() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


def summarize(runs: list[dict[str, list[float]]], full_batch: int) -> dict[str, tuple[float, float]]:
    """part -> (mean us/step over all steps, over full-batch steps), each the least over the runs (the run
    least disturbed by other work on the machine)."""
    summary: dict[str, tuple[float, float]] = {}
    for part in runs[0]:
        if part == "batch":
            continue
        means, full_means = [], []
        for times in runs:
            full = [seconds for seconds, batch in zip(times[part], times["batch"]) if batch >= full_batch]
            means.append(sum(times[part]) / len(times[part]) * 1e6)
            full_means.append(sum(full) / max(len(full), 1) * 1e6)
        summary[part] = (min(means), min(full_means))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tokenizer", choices=("ids", "embedded"), default="ids")
    parser.add_argument("--profile", choices=("offline", "core", "api"))
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each loop; the least time of each part counts")
    args = parser.parse_args()
    tokenizer = TokenIdTokenizer(VOCAB_SIZE, [EOS]) if args.tokenizer == "ids" else Tokenizer.load(None)
    profiler = cProfile.Profile() if args.profile else None
    offline, core, api = [], [], []
    for _ in range(1 if args.profile else args.repeats):
        offline.append(run_offline(tokenizer, args.num_prompts, profiler if args.profile == "offline" else None))
        times, received = run_core(tokenizer, args.num_prompts, profiler if args.profile == "core" else None)
        core.append(times)
        api.append(run_api(tokenizer, args.num_prompts, received, times["batch"],
                           profiler if args.profile == "api" else None))
    full_batch = int(FULL_BATCH * min(args.num_prompts, 256))
    summary = {**summarize(offline, full_batch), **summarize(core, full_batch), **summarize(api, full_batch)}
    batches = offline[0]["batch"]
    num_full = sum(batch >= full_batch for batch in batches)
    print(f"{args.num_prompts} requests of `throughput`, tokenizer {args.tokenizer}, {len(batches)} steps "
          f"({num_full} with >= {full_batch} running), least of {len(offline)} run(s); us per step:")
    print(f"  {'part':<14} {'all steps':>10} {'full batch':>11}")
    for part, (mean, mean_full) in summary.items():
        print(f"  {part:<14} {mean:10.0f} {mean_full:11.0f}")
    loop = [summary["core step"][i] + summary["core send"][i] for i in range(2)]
    print(f"  core loop (step + send, socket aside) / offline: {loop[0] / summary['offline'][0]:.2f}x all steps, "
          f"{loop[1] / summary['offline'][1]:.2f}x full batch")
    if profiler is not None:
        print(f"\ncProfile of {args.profile}, by own time:")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
