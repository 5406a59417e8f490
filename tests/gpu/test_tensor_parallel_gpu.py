"""Tensor parallelism on two CUDA GPUs over NCCL: the greedy tokens of one GPU, with CUDA graphs (of
decode steps and of steps with prefill chunks, each holding the NCCL all-reduces) and without, with
async scheduling; quantized models; torchrun; a worker that dies; the peer all-reduce.
Run on a machine with two GPUs: `python3 -m pytest -q -m gpu tests/gpu/test_tensor_parallel_gpu.py`.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from nanovllm import LLM
from test_tensor_parallel import (GREEDY, PROMPTS, SPLITTABLE, assert_logprobs_close, assert_no_children_left,
                                  check_a_worker_that_dies_between_steps, greedy_logprobs, greedy_tokens)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]

# float32 on both sides so that the split sums agree to the last greedy token.
ENGINE_ARGS = dict(device="cuda", dtype="float32", max_model_len=256, max_num_batched_tokens=32, max_num_seqs=8,
                   num_kv_blocks=256)


# Each SPLITTABLE model once; graphs (the all-reduces captured) for two of them, eager for the third.
@pytest.mark.parametrize("model, enforce_eager", [("llama-gqa2", False), ("qwen3-vocab321", False), ("qwen3", True)])
def test_two_gpus_give_the_greedy_tokens_of_one(tiny_model_factory, model, enforce_eager):
    name, overrides = SPLITTABLE[model]
    path = str(tiny_model_factory(name, **overrides))
    one = LLM(path, enforce_eager=enforce_eager, **ENGINE_ARGS)
    expected, expected_logprobs = greedy_tokens(one), greedy_logprobs(one)
    del one
    llm = LLM(path, tensor_parallel_size=2, enforce_eager=enforce_eager, **ENGINE_ARGS)
    try:
        runner = llm.engine.runner
        assert (runner.decode_graphs is None) == enforce_eager
        assert (runner.mixed_graphs is None) == enforce_eager       # the prompts' steps replay graphs too
        assert runner.kv_cache.shape[4] == 1 and runner.kv_cache.device == torch.device("cuda", 0)
        assert greedy_tokens(llm) == expected
        assert_logprobs_close(greedy_logprobs(llm), expected_logprobs, atol=1e-3)   # the caches stay consistent
        [worker] = runner.workers.processes
    finally:
        llm.engine.shutdown()
    assert worker.exitcode == 0
    assert_no_children_left()


@pytest.mark.parametrize("enforce_eager", [False, True])
def test_async_scheduling_on_two_gpus_gives_the_greedy_tokens_of_one(tiny_model_factory, enforce_eager):
    """The newest tokens stay on rank 0's GPU between steps and reach every rank through one NCCL
    broadcast queued after the sampling; nothing waits in a device sync."""
    path = str(tiny_model_factory("qwen3"))
    one = LLM(path, enforce_eager=enforce_eager, **ENGINE_ARGS)
    expected, expected_logprobs = greedy_tokens(one), greedy_logprobs(one)
    del one
    llm = LLM(path, tensor_parallel_size=2, async_scheduling=True, enforce_eager=enforce_eager, **ENGINE_ARGS)
    try:
        assert llm.engine.config.async_scheduling
        assert greedy_tokens(llm) == expected
        assert_logprobs_close(greedy_logprobs(llm), expected_logprobs, atol=1e-3)
    finally:
        llm.engine.shutdown()
    assert_no_children_left()


def test_bfloat16_two_gpus_generate(tiny_model_factory):
    path = str(tiny_model_factory("qwen3"))
    llm = LLM(path, tensor_parallel_size=2, **{**ENGINE_ARGS, "dtype": "bfloat16"})
    try:
        outputs = greedy_tokens(llm)
        assert [len(tokens) for tokens in outputs] == [GREEDY.max_tokens] * len(PROMPTS)
        assert greedy_tokens(llm) == outputs
    finally:
        llm.engine.shutdown()
    assert_no_children_left()


@pytest.mark.parametrize("fmt", ["gguf-q4_k_m", "online-fp8"])
def test_quantized_models_on_two_gpus_start_as_one_does(fmt, tiny_model_factory, tmp_path, monkeypatch):
    """bfloat16, CUDA graphs: a Q4_K_M-like GGUF (kept quantized by default on CUDA: W8A16 and W4A16
    kernels) and online FP8 (W8A8 at prefill, the one-row GEMV at decode) split over two GPUs.
    Rounding differs from one GPU (bfloat16 partial sums; FP8 rounds each rank's half of o_proj's
    and down_proj's input rows), so only each prompt's first token is held to one GPU's; the rest
    must be full and the same when run again."""
    from test_tensor_parallel_quantized import MODEL, checkpoint

    monkeypatch.setenv("NANO_VLLM_CACHE", str(tmp_path / "cache"))
    src = tiny_model_factory(MODEL[0], **MODEL[1])
    path, kwargs = checkpoint(fmt, src, tmp_path)
    kwargs = {key: value for key, value in kwargs.items() if value != "gguf"}   # CUDA keeps the blocks itself
    engine_args = {**ENGINE_ARGS, "dtype": "bfloat16", "tokenizer": str(src), **kwargs}
    one = LLM(path, **engine_args)
    expected = greedy_tokens(one)
    del one
    llm = LLM(path, tensor_parallel_size=2, **engine_args)
    try:
        layer = type(llm.engine.runner.model.layers[0].mlp.gate_up_proj).__name__
        assert layer == {"gguf-q4_k_m": "W4A16Linear", "online-fp8": "Fp8Linear"}[fmt]
        outputs = greedy_tokens(llm)
        assert [tokens[0] for tokens in outputs] == [tokens[0] for tokens in expected]
        assert [len(tokens) for tokens in outputs] == [GREEDY.max_tokens] * len(PROMPTS)
        assert greedy_tokens(llm) == outputs
    finally:
        llm.engine.shutdown()
    assert_no_children_left()


def test_torchrun_on_two_gpus_gives_the_greedy_tokens_of_one(tiny_model_factory, tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    path = str(tiny_model_factory("llama-gqa4", num_key_value_heads=2))
    one = LLM(path, **ENGINE_ARGS)
    expected = greedy_tokens(one)
    del one
    command = [torchrun, "--nproc-per-node", "2", "-m", "nanovllm.tp_main", path,
               "--tensor-parallel-size", "2", "--device", "cuda", "--dtype", "float32", "--max-model-len", "256",
               "--max-num-batched-tokens", "32", "--max-num-seqs", "8", "--max-tokens", str(GREEDY.max_tokens)]
    for prompt in PROMPTS:
        command += ["--prompt", prompt]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert result.returncode == 0, result.stderr[-3000:]
    printed = [[int(t) for t in re.findall(r"\d+", line.split("]")[0])]
               for line in result.stdout.splitlines() if line.startswith("[")]
    assert printed == expected


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_gpu_worker_that_dies_between_steps_fails_the_requests_with_a_clear_error(tiny_model_factory,
                                                                                     async_scheduling):
    check_a_worker_that_dies_between_steps(str(tiny_model_factory("qwen3")),
                                           dict(ENGINE_ARGS, async_scheduling=async_scheduling))


KILL_DURING_A_STEP = """
import os, signal, sys
from nanovllm import LLM, SamplingParams
llm = LLM(sys.argv[1], tensor_parallel_size=2, device="cuda", dtype="float32", max_model_len=256,
          max_num_seqs=8, num_kv_blocks=256, async_scheduling=sys.argv[2] == "async", all_reduce=sys.argv[3])
[worker] = llm.engine.runner.workers.processes
execute = llm.engine.runner._execute
def kill_before_the_forward(*args):   # the step's broadcast has gone out; the all-reduce finds no peer
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(timeout=10)
    return execute(*args)
llm.engine.runner._execute = kill_before_the_forward
try:
    llm.generate(["a", "b"], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
except RuntimeError as error:
    print("ERROR:", error, flush=True)
llm.engine.shutdown()
print("EXITED", flush=True)
"""


@pytest.mark.parametrize("scheduling, all_reduce", [("sync", "auto"), ("async", "auto"), ("sync", "peer")])
def test_a_gpu_worker_killed_during_a_step_is_named_in_the_error_and_nothing_hangs(tiny_model_factory, tmp_path,
                                                                                   scheduling, all_reduce):
    """NCCL, or the peer all-reduce's kernel, would wait for the dead peer forever: rank 0 must notice and
    give up on its own (with async scheduling, in the wait for the step's samples), and end the kernel."""
    path = str(tiny_model_factory("qwen3"))
    result = subprocess.run([sys.executable, "-c", KILL_DURING_A_STEP, path, scheduling, all_reduce],
                            capture_output=True,
                            text=True, timeout=180, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert re.search(r"ERROR: .*worker rank 1 .* exited with code -9", result.stdout), \
        result.stdout[-2000:] + result.stderr[-3000:]
    assert "EXITED" in result.stdout and result.returncode == 0, result.stderr[-3000:]


# The peer all-reduce last: a kernel that hangs here costs none of the tests above.

def test_the_peer_all_reduce_gives_the_reference_sums_on_two_gpus_and_an_abort_ends_it():
    """tools/all_reduce_probe.py --check: each rank's sums equal every rank's x added in float32 in rank
    order, eagerly and in a replayed graph, with the flags zero after; a lone kernel ends at the abort."""
    result = subprocess.run([sys.executable, "tools/all_reduce_probe.py", "--check", "--batches", "1", "7", "64",
                             "256", "--methods", "peer"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.count("checked") == 4, result.stdout + result.stderr[-3000:]


@pytest.mark.parametrize("enforce_eager", [False, True])
def test_the_peer_all_reduce_on_two_gpus_gives_the_greedy_tokens_of_one(tiny_model_factory, enforce_eager):
    path = str(tiny_model_factory("qwen3", vocab_size=321))     # the embedding's all-reduce too
    one = LLM(path, enforce_eager=enforce_eager, **ENGINE_ARGS)
    expected, expected_logprobs = greedy_tokens(one), greedy_logprobs(one)
    del one
    llm = LLM(path, tensor_parallel_size=2, all_reduce="peer", enforce_eager=enforce_eager, **ENGINE_ARGS)
    try:
        assert llm.engine.runner.parallel.peer is not None
        assert greedy_tokens(llm) == expected
        assert_logprobs_close(greedy_logprobs(llm), expected_logprobs, atol=1e-3)
    finally:
        llm.engine.shutdown()
    assert_no_children_left()
