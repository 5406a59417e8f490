"""AsyncLLMEngine over an engine core in a thread, on a tiny random model: concurrent callers share
steps and their deltas add up to what the sync engine gives, a closed stream aborts and frees its
blocks, the waiting queue is bounded, drain aborts what outlives the grace period, and a failing
core fails its callers instead of leaving them waiting."""
from __future__ import annotations

import asyncio

import pytest

from nanovllm.engine.async_engine import AsyncLLMEngine, EngineNotRunningError, QueueFullError
from nanovllm.engine.engine import LLMEngine, StepInfo
from nanovllm.sampling_params import SamplingParams
from conftest import engine_over


def ids(text: str) -> list[int]:
    """A prompt as the API process sends it: token ids (any ids of the tiny vocabulary will do)."""
    return [3 + ord(char) % 90 for char in text]


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


@pytest.fixture
def make_engine(tiny_llama_loaded):
    def make(**engine_args) -> LLMEngine:
        engine_args.setdefault("max_model_len", 128)
        return engine_over(tiny_llama_loaded, device="cpu", **engine_args)

    return make


def run(coroutine_fn, engine: AsyncLLMEngine):
    """Run `coroutine_fn()` with the engine's step loop going, then stop the engine."""
    async def main():
        engine.start()
        try:
            return await coroutine_fn()
        finally:
            await engine.stop()
    return asyncio.run(main())


def test_concurrent_callers_share_steps_and_get_what_the_sync_engine_gives(make_engine):
    reference = make_engine()
    reference.add_requests([("a", ids("Hello"), greedy(6)), ("b", ids("World, again"), greedy(9))], stream=False)
    expected = {}
    while reference.has_unfinished_requests():
        expected.update({out.request_id: out.outputs[0].token_ids for out in reference.step()})

    engine = make_engine()
    steps: list[StepInfo] = []
    engine.add_step_observer(steps.append)
    async_engine = AsyncLLMEngine.from_engine(engine)

    async def consume(request_id: str, prompt: list[int], params: SamplingParams) -> list[list[int]]:
        return [out.outputs[0].token_ids async for out in async_engine.generate(request_id, prompt, params)]

    streams = run(lambda: asyncio.gather(consume("a", ids("Hello"), greedy(6)),
                                         consume("b", ids("World, again"), greedy(9))), async_engine)
    # Each output is a delta: the new tokens only, which add up to the whole (cumulative outputs would
    # add up to more; a reader that falls behind gets the deltas it missed joined, never dropped).
    assert [sum(stream, []) for stream in streams] == [expected["a"], expected["b"]]
    assert any({chunk.request_id for chunk in step.scheduled} == {"a", "b"} for step in steps)
    assert async_engine.stats.kv_usage.used_blocks == 0


def test_closing_a_stream_aborts_its_request_and_frees_its_blocks(make_engine):
    async_engine = AsyncLLMEngine.from_engine(make_engine())

    async def scenario():
        outputs = await async_engine.add_requests([("long", ids("Tell me a story"), greedy(100))])
        first = await outputs.get()
        outputs.close()
        while async_engine.num_unfinished_requests:
            await asyncio.sleep(0.01)
        return first

    first = run(scenario, async_engine)
    assert not first[0].finished
    assert async_engine.stats.kv_usage.used_blocks == 0
    assert async_engine.stats.num_running == async_engine.stats.num_waiting == 0


def test_a_cancelled_caller_aborts_its_request(make_engine):
    async_engine = AsyncLLMEngine.from_engine(make_engine(max_model_len=512))

    async def scenario():
        started = asyncio.Event()

        async def consume():
            async for _ in async_engine.generate("long", ids("Once upon a time"), greedy(400)):
                started.set()
        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        while async_engine.num_unfinished_requests:
            await asyncio.sleep(0.01)

    run(scenario, async_engine)
    assert async_engine.stats.kv_usage.used_blocks == 0
    assert async_engine.stats.generation_tokens_total < 400


def test_a_full_waiting_queue_refuses_new_requests(make_engine):
    async_engine = AsyncLLMEngine.from_engine(make_engine(max_num_seqs=1), max_waiting=2)

    async def scenario():
        running = await async_engine.add_requests([("r", ids("Hi"), greedy(50))])
        await running.get()   # "r" runs; the next two wait behind it
        waiting = await async_engine.add_requests([("w", ids("Hi"), greedy(2, n=2))])
        with pytest.raises(QueueFullError, match="max_waiting=2"):
            await async_engine.add_requests([("refused", ids("Hi"), greedy(2))])
        return [out async for out in running], [out async for out in waiting]

    running, waiting = run(scenario, async_engine)
    assert running[-1].finished and waiting[-1].finished
    assert async_engine.stats.num_requests_finished == 2


def test_an_invalid_request_raises_and_queues_nothing(make_engine):
    async_engine = AsyncLLMEngine.from_engine(make_engine())

    async def scenario():
        with pytest.raises(ValueError, match="max_model_len"):
            await async_engine.add_requests([("ok", ids("Hi"), greedy(2)), ("long", [5] * 500, greedy(2))])
        return [out async for out in await async_engine.add_requests([("ok", ids("Hi"), greedy(2))])]

    outputs = run(scenario, async_engine)
    assert outputs[-1].finished and sum(len(out.outputs[0].token_ids) for out in outputs) == 2
    assert async_engine.num_unfinished_requests == 0


def test_drain_lets_short_requests_finish_aborts_the_rest_and_refuses_new_ones(make_engine):
    async_engine = AsyncLLMEngine.from_engine(make_engine(max_num_seqs=1, max_model_len=512))

    async def scenario():
        short = await async_engine.add_requests([("short", ids("Hi"), greedy(3))])
        long = await async_engine.add_requests([("long", ids("Hi there"), greedy(480))])
        drain = asyncio.create_task(async_engine.drain(timeout=0.3))
        with_short = [out async for out in short]
        with_long = [out async for out in long]
        await drain
        with pytest.raises(EngineNotRunningError, match="shutting down"):
            await async_engine.add_requests([("late", ids("Hi"), greedy(2))])
        return with_short[-1], with_long[-1]

    short, long = run(scenario, async_engine)
    assert short.outputs[0].finish_reason == "length"
    assert long.outputs[0].finish_reason == "abort"
    assert async_engine.stats.kv_usage.used_blocks == 0


def test_a_failing_core_fails_its_callers_and_refuses_new_requests(make_engine, monkeypatch):
    engine = make_engine()
    async_engine = AsyncLLMEngine.from_engine(engine)

    def broken_step():
        raise RuntimeError("scheduler bug")

    monkeypatch.setattr(engine, "step_with_deltas", broken_step)   # what the core loop calls

    async def scenario():
        with pytest.raises(EngineNotRunningError, match="scheduler bug"):   # at once, or from the stream
            outputs = await async_engine.add_requests([("a", ids("Hi"), greedy(3))])
            await outputs.get()
        with pytest.raises(EngineNotRunningError, match="not running"):
            await async_engine.add_requests([("b", ids("Hi"), greedy(3))])

    run(scenario, async_engine)
    assert not async_engine.is_running


def test_the_core_aborts_the_requests_of_an_api_process_that_is_gone(make_engine, tmp_path):
    import threading
    import time

    import msgspec
    import zmq

    from nanovllm.engine.core import AddRequests, CoreAddresses, EngineCore, EngineRequest, Shutdown, StepOutputs

    engine = make_engine()
    addresses = CoreAddresses(f"ipc://{tmp_path}/in", [f"ipc://{tmp_path}/out0", f"ipc://{tmp_path}/out1"])
    context = zmq.Context()
    core = EngineCore(engine, context, addresses)
    core.unreachable_grace = 0.0   # gone at once (a starting API process would get a few seconds)
    loop = threading.Thread(target=core.run_busy_loop)
    requests, outputs = context.socket(zmq.PUSH), context.socket(zmq.PULL)
    outputs.setsockopt(zmq.RCVTIMEO, 30_000)   # a core stuck on the missing process fails the test, not hangs it
    requests.connect(addresses.input)
    # API process 0 connects, and the loop starts only once its connection is up: with no grace, a
    # connection still under way on a busy machine would count as gone too. API process 1 never connects.
    monitor = core.output_sockets[0].get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    outputs.connect(addresses.outputs[0])
    assert monitor.poll(30_000), "API process 0 never connected"
    core.output_sockets[0].disable_monitor()
    monitor.close(linger=0)
    encode, decode = msgspec.msgpack.encode, msgspec.msgpack.Decoder(StepOutputs).decode
    requests.send(encode(AddRequests(1, [EngineRequest("orphan", ids("Hi"), greedy(50), time.time())], True, True)))
    requests.send(encode(AddRequests(0, [EngineRequest("kept", ids("Hi"), greedy(5), time.time())], True, True)))
    loop.start()
    finished = []
    while not finished:
        finished = [out for out in decode(outputs.recv()).outputs if out.finished]
    requests.send(encode(Shutdown()))
    loop.join(timeout=30)
    core.close()
    context.destroy(linger=0)
    assert [out.request_id for out in finished] == ["kept"] and finished[0].outputs[0].finish_reason == "length"
    assert not engine.has_unfinished_requests()   # the orphan was aborted, not left running for no one
    assert engine.scheduler.block_manager.usage().used_blocks == 0


def test_each_api_process_gets_the_deltas_of_its_own_requests_only(make_engine, tmp_path):
    import threading
    import time

    import msgspec
    import zmq

    from nanovllm.engine.core import AddRequests, CoreAddresses, EngineCore, EngineRequest, Shutdown, StepOutputs

    lengths = {"a0": 5, "b0": 3, "a1": 4, "b1": 6}   # request id -> max_tokens; the digit is its API process
    specs = [(request_id, ids(f"Hi {request_id}"), greedy(max_tokens, n=2))
             for request_id, max_tokens in lengths.items()]
    reference = make_engine()
    reference.add_requests(specs, stream=False)
    expected = {}
    while reference.has_unfinished_requests():
        expected.update({(out.request_id, completion.index): completion.token_ids
                         for out in reference.step() for completion in out.outputs})

    engine = make_engine()
    addresses = CoreAddresses(f"ipc://{tmp_path}/in", [f"ipc://{tmp_path}/out0", f"ipc://{tmp_path}/out1"])
    context = zmq.Context()
    core = EngineCore(engine, context, addresses)
    requests = context.socket(zmq.PUSH)
    requests.connect(addresses.input)
    clients = [context.socket(zmq.PULL) for _ in addresses.outputs]
    for client, address in zip(clients, addresses.outputs):
        client.setsockopt(zmq.RCVTIMEO, 30_000)
        client.connect(address)
    encode, decode = msgspec.msgpack.encode, msgspec.msgpack.Decoder(StepOutputs).decode
    for request_id, prompt, params in specs:
        requests.send(encode(AddRequests(int(request_id[1]), [EngineRequest(request_id, prompt, params, time.time())],
                                         stream=True, delta=True)))
    loop = threading.Thread(target=core.run_busy_loop)
    loop.start()
    tokens: dict[tuple[str, int], list[int]] = {}   # (request id, sample) -> tokens its API process received
    for index, client in enumerate(clients):
        unfinished = {request_id for request_id in lengths if request_id.endswith(str(index))}
        while unfinished:
            message = decode(client.recv())
            for output in message.deltas.outputs() + message.outputs:
                assert output.request_id.endswith(str(index)), "a delta went to another API process"
                for completion in output.outputs:
                    tokens.setdefault((output.request_id, completion.index), []).extend(completion.token_ids)
                if output.finished:
                    unfinished.remove(output.request_id)
    requests.send(encode(Shutdown()))
    loop.join(timeout=30)
    core.close()
    context.destroy(linger=0)
    assert tokens == expected and len(set(map(tuple, expected.values()))) == len(lengths)


def test_the_reader_lets_streams_read_while_the_core_keeps_sending(make_engine, tmp_path):
    """Awaiting a message that is already there does not yield to the event loop: a reader that only
    awaited would hand a stream nothing until the core paused, then everything at once."""
    import time

    import msgspec
    import zmq

    from nanovllm.engine.async_engine import MAX_MESSAGES_PER_TURN, OutputStream
    from nanovllm.engine.core import CoreAddresses, StepOutputs, core_info
    from nanovllm.outputs import StepDeltas

    addresses = CoreAddresses(f"ipc://{tmp_path}/in", [f"ipc://{tmp_path}/out0"])
    context = zmq.Context()
    core_side = context.socket(zmq.PUSH)
    core_side.bind(addresses.outputs[0])
    num_messages = 3 * MAX_MESSAGES_PER_TURN
    client = AsyncLLMEngine(core_info(make_engine()), addresses)

    async def scenario():
        client.start()   # the reader task starts at the next await
        stream = client._streams["r"] = OutputStream(client, ["r"])
        for step in range(num_messages):   # a busy core: every step's message waits before the reader runs
            deltas = StepDeltas()
            deltas.add("r", [step], "", 0.0, None)
            core_side.send(msgspec.msgpack.encode(StepOutputs([], deltas, [], [], 0)))
        time.sleep(0.5)   # delivered to the reader's socket, without yielding to the event loop
        reads = []
        while sum(reads) < num_messages:
            reads.append(sum(len(output.outputs[0].token_ids) for output in await stream.get()))
        client._reader.cancel()
        client._context.destroy(linger=0)
        return reads

    reads = asyncio.run(scenario())
    core_side.close(linger=0)
    context.term()
    assert sum(reads) == num_messages and len(reads) >= 3 and max(reads) <= MAX_MESSAGES_PER_TURN
