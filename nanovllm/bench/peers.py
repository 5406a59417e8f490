"""Peers: other engines run on the same model and the same workload, in the same process.

A figure alone says little; beside another engine's figure on the same machine,
weights and requests it says how the engine's choices pay. Two peers:

- **HF transformers** on the very weights nano-vllm loads (a HF directory as
  is; a GGUF file through nano-vllm's own dequantized tensors, so both engines
  see the same floats; a dummy model as the same config with random weights).
  On CUDA it runs its continuous-batching manager (what `generate_batch`
  drives) with `attn_implementation="paged|sdpa"`; on the CPU the plain
  `generate`, one padded-free batch of equal-length prompts.
- **llama.cpp** through `llama-cpp-python`, on the GGUF file itself (as stored,
  e.g. Q4_1), when that package is installed (it compiles from source:
  `pip install llama-cpp-python`, about 5 minutes on 2 cores with
  `CMAKE_ARGS="-DLLAVA_BUILD=OFF"`). On a CPU with AMX, its default native
  build runs ggml's AMX kernel, which has crashed on the first prompt in a VM;
  docs/reference/cpu-kernels.md gives the flags of a build without it. Its
  high-level API runs one sequence at a time, so it is a peer for `latency`
  only.

Every peer ignores EOS and produces exactly the tokens each request asks for.
"""
from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from nanovllm.bench.latency import LatencyResult, LatencyRun
from nanovllm.bench.throughput import WARMUP_MAX_TOKENS, ThroughputResult
from nanovllm.bench.workloads import Workload
from nanovllm.model.config import ModelConfig

PEERS = ("hf", "llama.cpp")
HF_CUDA_ATTENTION = "paged|sdpa"


class PeerUnavailable(Exception):
    """A peer that cannot run this model or workload here; the benchmark goes on without it."""


@dataclass
class PeerSettings:
    model: str | None
    load_format: str
    device: str
    dtype: torch.dtype
    num_threads: int


def peer_version(peer: str) -> str | None:
    package = {"hf": "transformers", "llama.cpp": "llama_cpp"}[peer]
    if importlib.util.find_spec(package) is None:
        return None
    return getattr(__import__(package), "__version__", "unknown")


# ---- HF transformers ------------------------------------------------------------------------

class HFPeer:
    name = "hf"

    def __init__(self, settings: PeerSettings):
        self.settings = settings
        self.model = load_hf_model(settings)

    def describe(self) -> dict:
        return {"peer": "hf", "version": peer_version("hf"), "dtype": str(self.settings.dtype),
                "method": "continuous batching (init_continuous_batching), paged|sdpa"
                if self.settings.device == "cuda" else "generate, sdpa"}

    def throughput(self, workload: Workload, use_tqdm: bool = True) -> ThroughputResult:
        if self.settings.device == "cuda":
            return self._continuous_batching(workload, use_tqdm)
        return self._generate_batch_cpu(workload)

    def latency(self, workload: Workload, use_tqdm: bool = True) -> LatencyResult:
        runs = []
        for i, request in enumerate(tqdm(workload.requests, desc="hf latency", disable=not use_tqdm,
                                         dynamic_ncols=True)):
            input_ids = torch.tensor([request.prompt_token_ids], device=self.settings.device)   # [1, P]
            streamer = _TokenClock()
            start = time.perf_counter()
            self._generate(input_ids, request.max_tokens, workload.temperature, streamer=streamer)
            if i > 0:   # run 0 is the warm-up
                runs.append(LatencyRun.from_token_times(start, streamer.token_times))
        return LatencyResult(runs)

    @torch.no_grad()
    def _generate(self, input_ids: torch.Tensor, num_tokens: int, temperature: float, **kwargs: Any) -> torch.Tensor:
        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
            dict(do_sample=False)
        return self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=num_tokens,
                                   min_new_tokens=num_tokens, pad_token_id=0, **sampling, **kwargs)

    def _generate_batch_cpu(self, workload: Workload) -> ThroughputResult:
        prompt_lens = {len(r.prompt_token_ids) for r in workload.requests}
        output_lens = {r.max_tokens for r in workload.requests}
        if len(prompt_lens) > 1 or len(output_lens) > 1:
            raise PeerUnavailable("HF generate on the CPU runs one batch of equal prompts and outputs; use "
                                  "--dataset random (--input-len/--output-len) for an HF figure on the CPU")
        input_ids = torch.tensor([r.prompt_token_ids for r in workload.requests])   # [B, P]
        self._generate(input_ids[:1], min(workload.requests[0].max_tokens, WARMUP_MAX_TOKENS), workload.temperature)
        start = time.perf_counter()
        output = self._generate(input_ids, output_lens.pop(), workload.temperature)   # [B, P + O]
        elapsed = time.perf_counter() - start
        generated = output.shape[0] * (output.shape[1] - input_ids.shape[1])
        return ThroughputResult(elapsed, len(workload.requests), workload.input_tokens, generated)

    @torch.no_grad()
    def _continuous_batching(self, workload: Workload, use_tqdm: bool) -> ThroughputResult:
        from transformers import GenerationConfig
        from transformers.generation.continuous_batching.utils import WorkloadHints

        sampling = dict(do_sample=True, temperature=workload.temperature, top_k=0, top_p=1.0) \
            if workload.temperature > 0 else dict(do_sample=False)
        max_new_tokens = max(r.max_tokens for r in workload.requests)
        generation_config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=-1, pad_token_id=0,
                                             **sampling)
        hints = WorkloadHints(max_prompt_length=max(len(r.prompt_token_ids) for r in workload.requests),
                              max_generated_length=max_new_tokens, num_requests=len(workload.requests))
        first = workload.requests[0]
        self.model.set_attn_implementation(HF_CUDA_ATTENTION)
        try:
            with self.model.continuous_batching_context_manager(generation_config=generation_config,
                                                                workload_hints=hints) as manager:
                self._cb_run(manager, [(first.prompt_token_ids, min(first.max_tokens, WARMUP_MAX_TOKENS))], False)
                start = time.perf_counter()
                generated = self._cb_run(manager, [(r.prompt_token_ids, r.max_tokens) for r in workload.requests],
                                         use_tqdm)
                elapsed = time.perf_counter() - start
        finally:
            self.model.set_attn_implementation("sdpa")
        return ThroughputResult(elapsed, len(workload.requests), workload.input_tokens, generated)

    @staticmethod
    def _cb_run(manager: Any, requests: list[tuple[list[int], int]], use_tqdm: bool) -> int:
        """Submit every request to the running manager, wait for all; -> tokens generated."""
        pending = {manager.add_request(prompt, max_new_tokens=num_tokens, eos_token_id=-1)
                   for prompt, num_tokens in requests}
        generated = 0
        with tqdm(total=len(pending), desc="hf continuous batching", disable=not use_tqdm,
                  dynamic_ncols=True) as bar:
            while pending:
                result = manager.get_result(timeout=1)
                if result is None:
                    if not manager.is_running():
                        raise RuntimeError("the transformers continuous-batching thread stopped before every "
                                           "request finished")
                    continue
                if result.request_id in pending and result.is_finished():
                    if result.error is not None:
                        raise RuntimeError(f"transformers failed request {result.request_id}: {result.error}")
                    pending.discard(result.request_id)
                    generated += len(result.generated_tokens)
                    bar.update(1)
        return generated


class _TokenClock:
    """A transformers streamer that notes when each new token arrives (the first `put` is the prompt)."""

    def __init__(self):
        self.token_times: list[float] = []
        self._seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if self._seen_prompt:
            self.token_times.append(time.perf_counter())
        self._seen_prompt = True

    def end(self) -> None:
        pass


def load_hf_model(settings: PeerSettings) -> Any:
    """A transformers model with nano-vllm's weights for `settings.model` (see the module docstring)."""
    import transformers

    from nanovllm.model.loader import load_model_config, resolve_model

    device, dtype = settings.device, settings.dtype
    attention = "sdpa"   # generate's; the continuous-batching run switches to HF_CUDA_ATTENTION
    if settings.load_format == "dummy":
        config = load_model_config(settings.model, "dummy")
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(hf_config(config), dtype=dtype,
                                                                  attn_implementation=attention)
        return model.eval()
    path = Path(resolve_model(settings.model))
    if path.is_dir():
        return transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=attention).to(device).eval()
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise PeerUnavailable(f"the HF peer runs HF directories, GGUF files and dummy models, not {path.name}")
    from nanovllm.model.gguf import gguf_weights

    config = load_model_config(str(path), "gguf")
    model = transformers.AutoModelForCausalLM.from_config(hf_config(config), dtype=dtype,
                                                          attn_implementation=attention)
    missing, unexpected = model.load_state_dict(dict(gguf_weights(str(path), config)), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise PeerUnavailable(f"nano-vllm's tensors of {path.name} do not fit transformers' model: "
                              f"missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.to(device).eval()


def hf_config(config: ModelConfig) -> Any:
    """The transformers config of the same shape as a ModelConfig."""
    import transformers

    extra = {"attention_bias": config.attention_bias} if config.architecture in ("llama", "mistral") else {}
    return transformers.AutoConfig.for_model(
        config.architecture, vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim, max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta, rope_scaling=config.rope_scaling,
        tie_word_embeddings=config.tie_word_embeddings, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_ids[0] if config.eos_token_ids else None, **extra)


# ---- llama.cpp ------------------------------------------------------------------------------

class LlamaCppPeer:
    name = "llama.cpp"

    def __init__(self, settings: PeerSettings, max_context: int):
        if peer_version("llama.cpp") is None:
            raise PeerUnavailable("llama-cpp-python is not installed (pip install llama-cpp-python; it compiles "
                                  "llama.cpp from source)")
        if settings.device != "cpu" or settings.load_format == "dummy":
            raise PeerUnavailable("the llama.cpp peer runs on the CPU, on a GGUF file")
        from nanovllm.model.loader import resolve_model

        path = Path(resolve_model(settings.model))
        if not path.is_file() or path.open("rb").read(4) != b"GGUF":
            raise PeerUnavailable(f"the llama.cpp peer needs a GGUF file, not {path.name}")
        import llama_cpp

        self.path = path
        self.num_threads = settings.num_threads
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=max_context, n_threads=settings.num_threads,
                                   n_threads_batch=settings.num_threads, n_batch=512, seed=0, verbose=False)

    def describe(self) -> dict:
        return {"peer": "llama.cpp", "version": peer_version("llama.cpp"), "weights": f"{self.path.name} as stored",
                "num_threads": self.num_threads, "method": "Llama.generate, one sequence"}

    def throughput(self, workload: Workload, use_tqdm: bool = True) -> ThroughputResult:
        raise PeerUnavailable("llama-cpp-python's high-level API runs one sequence at a time; it is a peer for "
                              "latency only")

    def latency(self, workload: Workload, use_tqdm: bool = True) -> LatencyResult:
        runs = []
        for i, request in enumerate(tqdm(workload.requests, desc="llama.cpp latency", disable=not use_tqdm,
                                         dynamic_ncols=True)):
            self.llm.reset()   # no KV reuse between runs: every run prefills the whole prompt
            token_times = []
            start = time.perf_counter()
            for _ in self.llm.generate(request.prompt_token_ids, temp=workload.temperature, top_k=1 if
                                       workload.temperature == 0 else 0, top_p=1.0, min_p=0.0, reset=True):
                token_times.append(time.perf_counter())
                if len(token_times) == request.max_tokens:
                    break
            if i > 0:
                runs.append(LatencyRun.from_token_times(start, token_times))
        return LatencyResult(runs)


def make_peer(peer: str, settings: PeerSettings, max_context: int) -> HFPeer | LlamaCppPeer:
    if peer == "hf":
        return HFPeer(settings)
    if peer == "llama.cpp":
        return LlamaCppPeer(settings, max_context)
    raise ValueError(f"peer must be one of {', '.join(PEERS)} or none, got {peer!r}")
