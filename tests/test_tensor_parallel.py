"""Tensor parallelism on the CPU: two gloo ranks give one rank's greedy tokens and log-probabilities,
shards hold the right slices, and the worker processes start and stop cleanly (spawned by the engine
or by torchrun).

Tokens alone are a weak oracle: a rank that skips an all-reduce can still pick the same argmax. The
log-probabilities of the sampled and top-3 tokens must agree too, to float32 summation-order noise."""
from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.config import EngineConfig
from nanovllm.model.loader import load_model

PROMPTS = ["The capital of France is", "a", "0123456789" * 5]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
ENGINE_ARGS = dict(device="cpu", max_model_len=256, max_num_batched_tokens=32)   # 32: long prompts go in chunks

# (TINY_MODELS name, overrides): GQA 2:1 untied; Qwen3 (q/k norm, tied); a vocabulary that 2 ranks split unevenly.
SPLITTABLE = {
    "llama-gqa2": ("llama-gqa4", dict(num_key_value_heads=2)),
    "qwen3": ("qwen3", {}),
    "qwen3-vocab321": ("qwen3", dict(vocab_size=321)),
}


GREEDY_LOGPROBS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3)
LOGPROB_ATOL = 1e-4   # two float32 ranks sum in another order: measured under 1e-5 apart


def greedy_tokens(llm: LLM) -> list[list[int]]:
    return [output.outputs[0].token_ids for output in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def greedy_logprobs(llm: LLM) -> list[list[dict[int, float]]]:
    """Per prompt, per generated token: {token id: log-probability} of the sampled and top-3 tokens."""
    return [output.outputs[0].logprobs for output in llm.generate(PROMPTS, GREEDY_LOGPROBS, use_tqdm=False)]


def assert_logprobs_close(actual: list[list[dict[int, float]]], expected: list[list[dict[int, float]]],
                          atol: float = LOGPROB_ATOL) -> None:
    assert len(actual) == len(expected)
    for prompt, (ours, theirs) in enumerate(zip(actual, expected)):
        assert [sorted(step) for step in ours] == [sorted(step) for step in theirs], f"prompt {prompt}: tokens"
        for step, (a, b) in enumerate(zip(ours, theirs)):
            worst = max(abs(a[token] - b[token]) for token in b)
            assert worst < atol, f"prompt {prompt}, step {step}: log-probabilities {worst:.3g} apart"


def rank_processes() -> list:
    """This process's children but the grammar processes that engines of other tests' structured outputs
    started (each ends when its engine is collected, which may not have happened yet)."""
    return [child for child in multiprocessing.active_children() if child.name != "grammar-masks"]


def assert_no_children_left() -> None:
    assert rank_processes() == []
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("model", SPLITTABLE)
def test_two_ranks_give_the_greedy_tokens_of_one_and_exit_cleanly(tiny_model_factory, model):
    name, overrides = SPLITTABLE[model]
    path = str(tiny_model_factory(name, **overrides))
    one = LLM(path, **ENGINE_ARGS)
    expected, expected_logprobs = greedy_tokens(one), greedy_logprobs(one)
    llm = LLM(path, tensor_parallel_size=2, **ENGINE_ARGS)
    try:
        runner = llm.engine.runner
        assert runner.kv_cache.shape[4] == 1             # 2 KV heads over 2 ranks: one each
        assert runner.model.lm_head.weight.shape[0] == -(-overrides.get("vocab_size", 320) // 2)
        assert greedy_tokens(llm) == expected
        assert_logprobs_close(greedy_logprobs(llm), expected_logprobs)   # the KV and prefix caches stay consistent
        workers = runner.workers.processes
        assert len(workers) == 1 and workers[0].is_alive()
    finally:
        llm.engine.shutdown()
    assert workers[0].exitcode == 0                      # left through SHUTDOWN, not killed
    assert_no_children_left()


def test_two_ranks_give_the_prompt_logprobs_of_one(tiny_model_factory):
    """Prompt log-probabilities ride in the step's logits pass on every rank (the vocabulary is split):
    a 50-token prompt in chunks of 32, beside a prompt that samples, gives one rank's entries."""
    path = str(tiny_model_factory("qwen3", vocab_size=321))
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, prompt_logprobs=3)

    def prompt_logprobs(llm: LLM) -> list[list[dict[int, float]]]:
        outputs = llm.generate(PROMPTS, [params, GREEDY, params], use_tqdm=False)
        return [output.prompt_logprobs[1:] for output in outputs if output.prompt_logprobs]

    expected = prompt_logprobs(LLM(path, **ENGINE_ARGS))
    assert [len(entries) for entries in expected] == [len("The capital of France is") - 1, 49]
    llm = LLM(path, tensor_parallel_size=2, **ENGINE_ARGS)
    try:
        assert_logprobs_close(prompt_logprobs(llm), expected)
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("engine_args", [{}, dict(num_kv_blocks=24, block_size=4)], ids=["", "preempting"])
def test_async_scheduling_with_two_ranks_gives_the_outputs_of_one_rank(tiny_model_factory, engine_args):
    """With async scheduling the newest token of each decode row is still on rank 0 when the next step goes
    out; every rank takes it from one broadcast of rank 0's sample buffer. Greedy, seeded and n=2 sampling,
    penalties (which complete the step before theirs first), prompt log-probabilities, a regular
    expression (its masks read the newest token), prompts in chunks: the outputs of one rank, scheduled
    synchronously."""
    path = str(tiny_model_factory("qwen3", vocab_size=321))
    # Requests that end at different steps, so that a row of the last step's samples is not the row of
    # input_ids its sequence takes next (a penalty runs its steps synchronously, so it ends early)
    params = [SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0.9, seed=7, max_tokens=5, ignore_eos=True, n=2),
              SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, repetition_penalty=1.5),
              SamplingParams(temperature=0.0, max_tokens=11, ignore_eos=True, prompt_logprobs=2),
              SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=1, max_tokens=12, structured_outputs={"regex": "[0-9]+"})]
    prompts = PROMPTS + ["xyz", "hello", "digits:"]

    def outputs(llm: LLM) -> list:
        return [[(c.token_ids, c.text, c.finish_reason, c.logprobs) for c in out.outputs] + [out.prompt_logprobs]
                for out in llm.generate(prompts, params, use_tqdm=False)]

    one = outputs(LLM(path, **ENGINE_ARGS, **engine_args))
    llm = LLM(path, tensor_parallel_size=2, async_scheduling=True, **ENGINE_ARGS, **engine_args)
    seen_pending = []
    execute_step = llm.engine.runner._execute_step

    def counting(step):
        seen_pending.append(step.pending_index.shape[0])
        return execute_step(step)

    llm.engine.runner._execute_step = counting
    try:
        two = outputs(llm)
        preemptions = llm.engine.get_stats().num_preemptions
    finally:
        llm.engine.shutdown()
    assert max(seen_pending) > 0, "no step took a token still on the device: async scheduling did not run"
    assert (preemptions > 0) == bool(engine_args), "the preempting case did not preempt"
    assert len(two) == len(one)
    for ours, theirs in zip(two, one):
        assert [c[:3] for c in ours[:-1]] == [c[:3] for c in theirs[:-1]]
        for a, b in zip(ours[:-1], theirs[:-1]):
            if b[3] is not None:
                assert_logprobs_close([a[3]], [b[3]])
        if theirs[-1] is not None:
            assert_logprobs_close([ours[-1][1:]], [theirs[-1][1:]])
    assert_no_children_left()


def test_each_rank_holds_its_heads_features_and_vocabulary_rows(tiny_model_factory):
    path = tiny_model_factory("qwen3", vocab_size=321)
    full, config = load_model(str(path))
    shards = [load_model(str(path), tp_rank=rank, tp_size=2)[0] for rank in range(2)]
    q, kv, inter = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim, \
        config.intermediate_size
    full_qkv = full.layers[1].self_attn.qkv_proj.weight
    full_q, full_k, full_v = full_qkv.split([q, kv, kv])
    for rank, shard in enumerate(shards):
        attn, mlp = shard.layers[1].self_attn, shard.layers[1].mlp
        rows = lambda size: slice(rank * size // 2, (rank + 1) * size // 2)   # noqa: E731
        assert torch.equal(attn.qkv_proj.weight, torch.cat([full_q[rows(q)], full_k[rows(kv)], full_v[rows(kv)]]))
        assert torch.equal(attn.o_proj.weight, full.layers[1].self_attn.o_proj.weight[:, rows(q)])
        gate, up = full.layers[1].mlp.gate_up_proj.weight.split([inter, inter])
        assert torch.equal(mlp.gate_up_proj.weight, torch.cat([gate[rows(inter)], up[rows(inter)]]))
        assert torch.equal(mlp.down_proj.weight, full.layers[1].mlp.down_proj.weight[:, rows(inter)])
        assert torch.equal(attn.q_norm.weight, full.layers[1].self_attn.q_norm.weight)   # replicated
        assert all(type(m) is torch.nn.Linear for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj))
    # 321 rows: rank 0 holds 0..160, rank 1 holds 161..320 and one zero padding row; the LM head is tied.
    embed = full.embed_tokens.weight
    assert torch.equal(shards[0].embed_tokens.weight, embed[:161])
    assert torch.equal(shards[1].embed_tokens.weight[:160], embed[161:])
    assert not shards[1].embed_tokens.weight[160].any()
    assert shards[1].lm_head.weight is shards[1].embed_tokens.weight


class RecordingPeerAllReduce:
    """Stands in for ops/all_reduce_triton.PeerAllReduce: takes every all-reduce, records its slot, sums nothing."""

    def __init__(self):
        self.slots: list[int] = []

    def takes(self, x: torch.Tensor) -> bool:
        return True

    def all_reduce(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        self.slots.append(slot)
        return x


def test_no_two_all_reduces_in_a_row_share_a_peer_slot_within_or_across_forwards(tiny_model_factory):
    """The peer all-reduce may reuse a slot only after an all-reduce in another one: a fast rank would
    otherwise overwrite what a slow one still reads. Forwards run back to back (a decode graph replayed),
    so the last all-reduce of one and the first of the next count too."""
    from nanovllm.ops.attention import AttentionMetadata

    shard, config = load_model(str(tiny_model_factory("qwen3", vocab_size=321)), tp_rank=0, tp_size=2)
    shard.parallel.peer = peer = RecordingPeerAllReduce()
    kv_heads = config.num_key_value_heads // 2
    kv_caches = [(torch.zeros(4, 16, kv_heads, config.head_dim), torch.zeros(4, 16, kv_heads, config.head_dim))
                 for _ in range(config.num_hidden_layers)]
    for start, num_new in [(0, 5), (5, 1), (6, 1)]:          # a prefill, then two decode steps
        end = start + num_new
        metadata = AttentionMetadata(query_start_loc=torch.tensor([0, num_new], dtype=torch.int32),
                                     seq_lens=torch.tensor([end], dtype=torch.int32),
                                     slot_mapping=torch.arange(start, end),
                                     block_tables=torch.tensor([[0]], dtype=torch.int32),
                                     max_query_len=num_new, max_seq_len=end)
        with torch.inference_mode():
            shard(torch.arange(start, end), torch.arange(start, end), metadata, kv_caches)
    assert len(peer.slots) == 3 * (1 + 2 * config.num_hidden_layers)    # the embedding's, then two a layer
    assert all(a != b for a, b in zip(peer.slots, peer.slots[1:])), peer.slots


def test_ranks_in_processes_sum_through_each_others_buffers_round_after_round():
    """The peer all-reduce's signals for real, between processes (tools/peer_all_reduce_cpu.py): each
    runs one rank's kernel under the interpreter, sends its signals into the others' memory and spins
    until theirs arrive, over rounds of several sizes and every slot in turn. A wrong flag, slot or
    order hangs or fails it."""
    pytest.importorskip("triton")
    tool = Path(__file__).resolve().parents[1] / "tools" / "peer_all_reduce_cpu.py"
    result = subprocess.run([sys.executable, str(tool), "--ranks", "3", "--rounds", "7", "--timeout", "240"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count(": the reference sum") == 3 * 7 and result.stdout.count("flags all zero again") == 3


@pytest.mark.parametrize("failed", [False, True])
def test_a_failed_group_ends_the_peer_all_reduces_waiting_for_a_dead_rank(failed):
    """A kernel waiting for a dead worker's signal would spin forever: rank 0 aborts it on a failure
    (and only then, since the sums of an aborted all-reduce are wrong). A clean stop frees the buffers
    instead; after a failure a kernel may still be reading them. Either way every CUDA graph (decode
    and mixed steps) is released before the group goes: NCCL's teardown waits for graphs that hold it."""
    from nanovllm.runner.tp_worker import WorkerGroup

    class Graphs:
        released = False

        def release(self) -> None:
            self.released = True

    class Peer(RecordingPeerAllReduce):
        aborted = closed = False

        def abort(self) -> None:
            self.aborted = True

        def close(self) -> None:
            self.closed = True

    class Steps:    # the shared-memory queue, which takes the SHUTDOWN message of a clean stop
        def write(self, messages, timeout_s: float) -> None:
            pass

        def close(self) -> None:
            pass

    graphs = [Graphs(), Graphs()]
    group = WorkerGroup(torch.device("cpu"), None, owns_process_group=False, peer=Peer(), steps=Steps(),
                        graphs=list(graphs), error="worker rank 1 exited" if failed else None)
    group.shutdown()
    assert group.peer.aborted == failed and group.peer.closed != failed   # a clean stop unmaps the buffers
    assert all(g.released for g in graphs) and group.graphs == []


def test_safetensors_are_read_as_lazy_slices(tiny_llama):
    from nanovllm.model.loader import _hf_weights

    name, tensor = next(iter(_hf_weights(Path(tiny_llama))))
    assert not isinstance(tensor, torch.Tensor) and len(tensor.get_shape()) >= 1   # nothing read yet
    assert tuple(tensor[0:1].shape)[0] == 1


def test_kv_heads_that_do_not_split_evenly_raise_before_any_worker_starts(tiny_llama):
    with pytest.raises(ValueError, match="does not divide the model's 1 KV heads"):
        LLM(str(tiny_llama), tensor_parallel_size=2, **ENGINE_ARGS)   # llama-gqa4 has one KV head
    assert_no_children_left()


def test_tensor_parallel_size_must_be_a_positive_integer():
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer"):
        EngineConfig(tensor_parallel_size=0)


def test_the_peer_all_reduce_is_refused_on_the_cpu_and_an_unknown_all_reduce_named():
    with pytest.raises(ValueError, match="all_reduce='peer' reads the other GPUs' memory, so it needs device='cuda'"):
        EngineConfig(device="cpu", tensor_parallel_size=2, all_reduce="peer")
    with pytest.raises(ValueError, match="all_reduce must be one of auto, peer, got 'nccl'"):
        EngineConfig(device="cpu", all_reduce="nccl")


def test_ranks_that_cannot_map_each_others_memory_all_raise_a_sentence_naming_the_way_out():
    from nanovllm.model.parallel import ParallelState
    from nanovllm.runner.tp_worker import start_peer_all_reduce

    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:    # the CPU has no peer memory: torch refuses to map it, and every rank (here one) says so
        with pytest.raises(RuntimeError, match="all_reduce='peer' could not map .* pass all_reduce='auto'"):
            start_peer_all_reduce(ParallelState(0, 1, torch.distributed.group.WORLD), torch.device("cpu"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_worker_that_dies_fails_the_requests_with_a_clear_error(tiny_model_factory, async_scheduling):
    check_a_worker_that_dies_between_steps(str(tiny_model_factory("qwen3")),
                                           dict(ENGINE_ARGS, async_scheduling=async_scheduling))


def check_a_worker_that_dies_between_steps(path: str, engine_args: dict) -> None:
    """(Also run on two GPUs by tests/gpu/test_tensor_parallel_gpu.py.)"""
    llm = LLM(path, tensor_parallel_size=2, **engine_args)
    try:
        [worker] = llm.engine.runner.workers.processes
        assert greedy_tokens(llm)
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(timeout=10)
        with pytest.raises(RuntimeError, match=r"WorkerDiedError: tensor-parallel worker rank 1 .* code -9"):
            llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        with pytest.raises(RuntimeError, match="worker rank 1"):   # and every later request, at once
            llm.generate("again", GREEDY, use_tqdm=False)
    finally:
        llm.engine.shutdown()
    assert_no_children_left()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_worker_killed_during_a_step_is_named_in_the_error(tiny_model_factory, async_scheduling):
    path = str(tiny_model_factory("qwen3"))
    llm = LLM(path, tensor_parallel_size=2, async_scheduling=async_scheduling, **ENGINE_ARGS)
    [worker] = llm.engine.runner.workers.processes
    killed = []

    def kill_before_the_forward(*args):   # the broadcast has gone out; the forward's all-reduce finds no peer
        if not killed:
            os.kill(worker.pid, signal.SIGKILL)
            worker.join(timeout=10)
            killed.append(True)
        return execute(*args)

    execute = llm.engine.runner._execute
    llm.engine.runner._execute = kill_before_the_forward
    try:
        with pytest.raises(RuntimeError, match="worker rank 1 .* exited with code -9"):
            llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    finally:
        llm.engine.shutdown()
    assert_no_children_left()


@pytest.fixture
def error_files(tmp_path, monkeypatch):
    """-> a function listing the spawned workers' torch error files, which go to tmp_path here."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))   # torch makes them in the parent's temporary folder
    return lambda: list(tmp_path.glob("pytorch-errorfile-*"))


def test_a_worker_that_raises_is_named_with_its_error_and_leaves_no_file_behind(tiny_model_factory, error_files):
    from nanovllm.runner.tp_worker import HEADER_SIZE, STEP

    llm = LLM(str(tiny_model_factory("qwen3")), tensor_parallel_size=2, **ENGINE_ARGS)
    workers = llm.engine.runner.workers
    [worker] = workers.processes
    try:
        header = torch.tensor([STEP, 5] + [1] * (HEADER_SIZE - 2))   # a step whose payload is missing
        workers.steps.write([header])
        worker.join(timeout=30)
        assert worker.exitcode == 1
        assert error_files(), "the worker left no error file to read"
        with pytest.raises(RuntimeError, match=r"worker rank 1 .* code 1 after raising RuntimeError: a step "
                                               r"message of 8 int64s does not match its header"):
            llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    finally:
        llm.engine.shutdown()
    assert not error_files()
    assert_no_children_left()


def test_spawned_workers_read_their_steps_from_shared_memory_which_goes_with_them(tiny_model_factory, monkeypatch):
    path = str(tiny_model_factory("qwen3"))
    llm = LLM(path, tensor_parallel_size=2, **ENGINE_ARGS)
    steps = llm.engine.runner.workers.steps

    def no_broadcast(*args, **kwargs):
        raise AssertionError("rank 0 broadcast a step; spawned workers read theirs from the shared-memory queue")

    monkeypatch.setattr(torch.distributed, "broadcast", no_broadcast)
    try:
        assert greedy_tokens(llm)
        assert steps.num_written >= GREEDY.max_tokens
    finally:
        llm.engine.shutdown()
    assert steps.closed
    with pytest.raises(FileNotFoundError):
        SharedMemory(name=steps.name)
    assert_no_children_left()


def test_torchrun_with_two_processes_gives_the_greedy_tokens_of_one_rank(tiny_model_factory, tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    path = str(tiny_model_factory("llama-gqa4", num_key_value_heads=2))
    expected = greedy_tokens(LLM(path, **ENGINE_ARGS))
    command = [torchrun, "--nproc-per-node", "2", "-m", "nanovllm.tp_main", path,
               "--tensor-parallel-size", "2", "--device", "cpu", "--max-model-len", "256",
               "--max-num-batched-tokens", "32", "--max-tokens", str(GREEDY.max_tokens)]
    for prompt in PROMPTS:
        command += ["--prompt", prompt]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=tmp_path,   # torchrun's
                            env=dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmp_path)))  # logs: tmp_path
    assert result.returncode == 0, result.stderr[-3000:]
    printed = [[int(t) for t in re.findall(r"\d+", line.split("]")[0])]
               for line in result.stdout.splitlines() if line.startswith("[")]
    assert printed == expected


def test_a_worker_that_fails_to_load_its_shard_stops_the_start_with_its_traceback(tiny_model_factory, tmp_path,
                                                                                 monkeypatch, error_files):
    from nanovllm.runner import model_runner

    path = tmp_path / "model"
    shutil.copytree(tiny_model_factory("qwen3"), path)
    start = model_runner.WorkerGroup.start

    def start_after_damaging_the_weights(*args):   # rank 0 has loaded; the worker will read a truncated file
        weights = path / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        return start(*args)

    monkeypatch.setattr(model_runner.WorkerGroup, "start", start_after_damaging_the_weights)
    with pytest.raises(RuntimeError, match=r"(?s)failed to load its shard:\nrank 1: .*ModelLoadError.*truncated"):
        LLM(str(path), tensor_parallel_size=2, **ENGINE_ARGS)
    assert not error_files(), "the worker's error file was left behind"
    assert_no_children_left()


def test_a_worker_that_fails_to_start_raises_its_error_and_leaves_no_file_behind(error_files):
    from nanovllm.runner.model_runner import serve_rank
    from nanovllm.runner.tp_worker import _spawn_workers

    config = EngineConfig(device="cpu", tensor_parallel_size=2)
    with pytest.raises(RuntimeError, match="(?s)worker failed to start.*FileNotFoundError"):
        _spawn_workers(config, serve_rank, "nano-vllm-no-such-queue")   # the worker cannot attach the step queue
    assert not error_files(), "the worker's error file was left behind"
    assert_no_children_left()


def test_a_kv_budget_too_small_for_one_block_raises_and_stops_the_workers(tiny_model_factory):
    with pytest.raises(ValueError, match="holds no block"):
        LLM(str(tiny_model_factory("qwen3")), tensor_parallel_size=2, kv_cache_memory=1, **ENGINE_ARGS)
    assert_no_children_left()


def test_an_engine_started_after_another_shut_down_survives_the_first_being_collected(tiny_model_factory):
    import gc

    path = str(tiny_model_factory("qwen3"))
    first = LLM(path, tensor_parallel_size=2, **ENGINE_ARGS)
    expected = greedy_tokens(first)
    first.engine.shutdown()
    second = LLM(path, tensor_parallel_size=2, **ENGINE_ARGS)
    try:
        del first
        gc.collect()                                     # the first engine's finalizer runs now
        assert greedy_tokens(second) == expected
    finally:
        second.engine.shutdown()
    assert_no_children_left()


def test_a_second_tensor_parallel_engine_in_the_same_process_is_refused_while_the_first_runs(tiny_model_factory):
    path = str(tiny_model_factory("qwen3"))
    first = LLM(path, tensor_parallel_size=2, **ENGINE_ARGS)
    try:
        expected = greedy_tokens(first)
        with pytest.raises(RuntimeError, match="process group already exists.*shut down the other"):
            LLM(path, tensor_parallel_size=2, **ENGINE_ARGS)
        assert len(rank_processes()) == 1
        assert greedy_tokens(first) == expected
    finally:
        first.engine.shutdown()
    assert_no_children_left()


def test_a_script_read_from_stdin_starts_its_workers(tiny_model_factory, tmp_path):
    """`python - < script.py` has no `__main__` file for a spawned worker to re-run; the workers start anyway."""
    path = str(tiny_model_factory("qwen3"))
    expected = greedy_tokens(LLM(path, **ENGINE_ARGS))
    script = (f"from nanovllm import LLM, SamplingParams\n"
              f"llm = LLM({path!r}, tensor_parallel_size=2, **{ENGINE_ARGS!r})\n"
              f"outputs = llm.generate({PROMPTS!r}, SamplingParams(temperature=0.0, max_tokens={GREEDY.max_tokens}, "
              f"ignore_eos=True), use_tqdm=False)\n"
              f"print([output.outputs[0].token_ids for output in outputs])\n"
              f"llm.engine.shutdown()\n")
    result = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, timeout=180,
                            cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == str(expected)


def _host_steps():
    """Steps of every shape the wire format carries: one decode row; a prefill chunk beside decodes, with
    block tables of unequal length padded with -1, prompt rows asked to score their prompt after the rows
    that sample, and decode rows whose token is still on rank 0's device (async scheduling)."""
    from nanovllm.runner.tp_worker import HostStep

    yield HostStep(input_ids=[41], positions=[9], slot_mapping=[25], query_start_loc=[0, 1], seq_lens=[10],
                   block_tables=[[3]], logits_indices=[0], max_query_len=1, pending_index=[], pending_row=[])
    yield HostStep(input_ids=[5, 6, 7, 8, 11, 12], positions=[16, 17, 18, 19, 4, 40],
                   slot_mapping=[96, 97, 98, 99, 36, 136], query_start_loc=[0, 4, 5, 6], seq_lens=[20, 5, 41],
                   block_tables=[[2, 5], [4], [7, 1, 8]],
                   logits_indices=[3, 4, 5, 0, 1], max_query_len=4, pending_index=[4, 5], pending_row=[2, 0])


@pytest.mark.parametrize("step", list(_host_steps()), ids=["decode", "mixed"])
def test_rank_0_and_the_worker_unpack_the_tensors_the_step_lists_say(step):
    from nanovllm.runner import tp_worker
    from nanovllm.runner.shm_queue import ShmQueueReader, ShmQueueWriter

    max_blocks = max(len(table) for table in step.block_tables)
    step = step._replace(block_tables=[table + [-1] * (max_blocks - len(table)) for table in step.block_tables])
    writer = ShmQueueWriter(num_readers=1, capacity_bytes=4096)
    reader = ShmQueueReader(writer.name, 0)
    group = tp_worker.WorkerGroup(torch.device("cpu"), None, False, steps=writer)
    old_reader, tp_worker._steps_from_engine = tp_worker._steps_from_engine, reader
    try:
        ours = group.send_step(step)
        theirs = tp_worker.receive_step(torch.device("cpu"))
    finally:
        tp_worker._steps_from_engine = old_reader
        reader.close()
        writer.close()
    expected = {"input_ids": torch.tensor(step.input_ids), "positions": torch.tensor(step.positions),
                "slot_mapping": torch.tensor(step.slot_mapping),
                "query_start_loc": torch.tensor(step.query_start_loc, dtype=torch.int32),
                "seq_lens": torch.tensor(step.seq_lens, dtype=torch.int32),
                "block_tables": torch.tensor(step.block_tables, dtype=torch.int32),
                "logits_indices": torch.tensor(step.logits_indices),
                "pending_index": torch.tensor(step.pending_index, dtype=torch.int64),
                "pending_row": torch.tensor(step.pending_row, dtype=torch.int64)}
    for rank, (input_ids, positions, metadata, logits_indices, pending_index, pending_row) in (("rank 0", ours),
                                                                                               ("worker", theirs)):
        got = {"input_ids": input_ids, "positions": positions, "slot_mapping": metadata.slot_mapping,
               "query_start_loc": metadata.query_start_loc, "seq_lens": metadata.seq_lens,
               "block_tables": metadata.block_tables, "logits_indices": logits_indices,
               "pending_index": pending_index, "pending_row": pending_row}
        for name, tensor in expected.items():
            assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), f"{rank}: {name}"
        assert (metadata.max_query_len, metadata.max_seq_len) == (step.max_query_len, max(step.seq_lens)), rank


def test_the_int64_parts_of_a_step_stay_16_byte_aligned_on_the_device_whatever_the_token_count():
    """The ranks run input_ids, positions, slot_mapping and logits_indices as views of the copied payload; a
    Triton kernel compiles another copy of itself for a pointer that is only 8-byte aligned."""
    from nanovllm.runner import tp_worker

    for num_tokens in (1, 2, 3, 7):
        step = tp_worker.HostStep(input_ids=list(range(num_tokens)), positions=list(range(num_tokens)),
                                  slot_mapping=list(range(num_tokens)), query_start_loc=[0, num_tokens],
                                  seq_lens=[num_tokens], block_tables=[[0]], logits_indices=[num_tokens - 1],
                                  max_query_len=num_tokens, pending_index=[], pending_row=[])
        message = tp_worker.step_message(step)
        payload = torch.from_numpy(message[tp_worker.HEADER_SIZE:]).clone()    # a fresh, aligned allocation
        input_ids, positions, metadata, logits_indices, _, _ = tp_worker._unpack_step(
            message[:tp_worker.HEADER_SIZE].tolist(), payload)
        for name, tensor in (("input_ids", input_ids), ("positions", positions),
                             ("slot_mapping", metadata.slot_mapping), ("logits_indices", logits_indices)):
            assert (tensor.data_ptr() - payload.data_ptr()) % 16 == 0, (num_tokens, name)
            assert tensor.is_contiguous()
        assert torch.equal(input_ids, torch.arange(num_tokens)) and logits_indices.tolist() == [num_tokens - 1]
