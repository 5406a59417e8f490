"""The roofline: how fast a workload could possibly run on this machine.

A step of the engine moves bytes (weights, KV cache) and does arithmetic
(matrix products, attention). Neither can go faster than the machine allows,
so a step takes at least

    max(bytes / BW, flops / PEAK)

where BW (bytes/s) and PEAK (FLOP/s) are measured here, in the same process:
the better of a large copy (bytes read + written over the time) and a large
matrix-vector product (whose reads outrun a copy on a CPU), and a large
matrix product in the engine's dtype.

What one step costs, for chunks of `num_new_tokens` tokens appended to
sequences that already hold `num_computed_tokens` in the KV cache:

    bytes = every weight matrix once (layers, final norm, LM head)
          + the embedding rows gathered (one row per new token)
          + the KV cache read: every cached token of every sequence, once
          + the KV written: every new token     (KV at its stored size: 1 byte an
                                                 element for an FP8 cache)
    flops = 2 x linear parameters x new tokens          (the layers' matmuls)
          + 2 x vocab x hidden x sampled rows           (the LM head runs only on the
                                                         rows that sample a token)
          + 4 x head_dim x num_heads x layers x context (attention: QK^T and PV,
            for each new token, over its context        2 flops per multiply-add)

Activations are not counted: they are small beside weights and KV, and a
lower bound may leave them out. Counting the LM head on every prompt token
instead (2 x all parameters x tokens) lowers the roofline of `throughput` by
1.3% (Qwen3-0.6B) and 4.8% (Llama-3.2-1B), to docs/benchmarks.md's reference
figures (35,300 and 67,500 output tok/s on an H200); engines skip those rows,
so the bound here skips them too.

The ceilings are measured twice, before the benchmark and after it, and the
better of each is used: on a shared machine a busy moment can only slow a
measurement down.

A whole workload's bound follows the lower-bound schedule of docs/benchmarks.md:
all requests prefill together in one step (which samples each request's first
token), then every request decodes in lock-step, one token a step, leaving when
it has its output. The sum of the step bounds is the least time the workload can
take; `output tokens / that time` is the roofline throughput, and a measured
throughput divided by it is the *fraction of roofline*, in (0, 1].
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch

from nanovllm.config import DTYPES
from nanovllm.model.config import ModelConfig


# ---- the machine ----------------------------------------------------------------------------

@dataclass
class Ceilings:
    """What the machine moved and computed at best, measured in this process."""
    device: str                    # "cpu" | "cuda"
    device_name: str               # the card, or the CPU's model name
    memory_bandwidth: float        # bytes/s the roofline uses: the better of the two below
    peak_flops: float              # FLOP/s of a large matrix product in `dtype`
    dtype: str
    num_threads: int               # torch CPU threads in use
    copy_bandwidth: float = 0.0    # (bytes read + bytes written) / time of a large copy
    gemv_bandwidth: float = 0.0    # matrix bytes / time of a large matrix-vector product (reads only)
    copy_bytes: int = 0            # size of the copied buffer and of the matrix
    matmul_size: int = 0           # n of the n x n x n product

    def best(self, other: "Ceilings") -> "Ceilings":
        """The higher bandwidth and the higher FLOP/s of two measurements of the same machine: a busy
        moment can only slow a measurement down, so the best one is the closer to the machine's limit."""
        return dataclasses.replace(
            self, memory_bandwidth=max(self.memory_bandwidth, other.memory_bandwidth),
            peak_flops=max(self.peak_flops, other.peak_flops),
            copy_bandwidth=max(self.copy_bandwidth, other.copy_bandwidth),
            gemv_bandwidth=max(self.gemv_bandwidth, other.gemv_bandwidth))

    def over(self, num_devices: int) -> "Ceilings":
        """The ceilings of num_devices such cards working together (tensor parallel: each rank reads
        and computes 1/N of every step, so the bound is that of one card with N times the rates;
        the all-reduces between them are not counted, so the bound stays a lower one)."""
        if num_devices == 1:
            return self
        return dataclasses.replace(
            self, device_name=f"{num_devices} x {self.device_name}",
            memory_bandwidth=self.memory_bandwidth * num_devices, peak_flops=self.peak_flops * num_devices,
            copy_bandwidth=self.copy_bandwidth * num_devices, gemv_bandwidth=self.gemv_bandwidth * num_devices)

    def as_dict(self) -> dict:
        return {"device": self.device, "device_name": self.device_name,
                "memory_bandwidth_GBps": self.memory_bandwidth / 1e9, "peak_TFLOPs": self.peak_flops / 1e12,
                "copy_bandwidth_GBps": self.copy_bandwidth / 1e9, "gemv_bandwidth_GBps": self.gemv_bandwidth / 1e9,
                "dtype": self.dtype, "num_threads": self.num_threads, "copy_bytes": self.copy_bytes,
                "matmul_size": self.matmul_size}


def cpu_model_name() -> str:
    """The "model name" line of /proc/cpuinfo (the CPU's marketing name), or the platform's guess."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else cpu_model_name()


def measure_ceilings(device: str, dtype: torch.dtype, copy_bytes: int | None = None,
                     matmul_size: int | None = None, repeats: int | None = None) -> Ceilings:
    """Measure memory bandwidth and matmul FLOP/s on `device`; best of `repeats` timed runs after one warm-up
    (default 10 on CUDA, 30 on the CPU, where other processes take time slices from some of them).

    Bandwidth is the better of a large copy (bytes read + written) and a large
    matrix-vector product in `dtype` (the matrix's bytes, read once: a decode
    step's pattern). On a GPU the copy is the higher; on a CPU a copy also reads
    each destination line before writing it (write-allocate), traffic its
    read + written count does not see, so reads alone go faster.
    Defaults: on CUDA 1 GiB buffers and an 8192^3 product; on the CPU 256 MiB
    (past the caches) and a 1536^3 product over torch's threads, halved while one
    product takes more than CPU_MATMUL_SECONDS (bfloat16 on a CPU without bfloat16
    instructions runs at a few gigaflops a second: 1536^3 took 6 s a product).
    On the CPU each measurement also stops once its timed calls have taken
    CPU_TIMING_SECONDS, after three at least.
    """
    on_cuda = device == "cuda"
    repeats = repeats or (10 if on_cuda else 30)
    copy_bytes = copy_bytes or (1 << 30 if on_cuda else 256 << 20)
    matmul_size = matmul_size or (8192 if on_cuda else 1536)
    src = torch.ones(copy_bytes // 4, dtype=torch.float32, device=device)   # [copy_bytes / 4]
    dst = torch.empty_like(src)
    copy_time = _best_time(lambda: dst.copy_(src), device, repeats)
    del src, dst
    gemv_dtype = dtype if on_cuda else torch.float32    # torch's fastest matrix-vector product on a CPU
    element_size = torch.tensor([], dtype=gemv_dtype).element_size()
    cols = 4096
    rows = copy_bytes // (cols * element_size)
    matrix = torch.ones(rows, cols, dtype=gemv_dtype, device=device)        # [rows, 4096]
    vector = torch.ones(cols, dtype=gemv_dtype, device=device)              # [4096]
    gemv_time = _best_time(lambda: torch.mv(matrix, vector), device, repeats)
    del matrix, vector
    a = torch.randn(matmul_size, matmul_size, device=device).to(dtype)      # [n, n]
    b = torch.randn(matmul_size, matmul_size, device=device).to(dtype)      # [n, n]
    while not on_cuda and matmul_size > 256 and _seconds(lambda: torch.mm(a, b)) > CPU_MATMUL_SECONDS:
        matmul_size //= 2
        a, b = a[:matmul_size, :matmul_size].contiguous(), b[:matmul_size, :matmul_size].contiguous()
    matmul_time = _best_time(lambda: torch.mm(a, b), device, repeats)
    copy_bandwidth = 2 * copy_bytes / copy_time
    gemv_bandwidth = rows * cols * element_size / gemv_time
    return Ceilings(
        device=device, device_name=device_name(device),
        memory_bandwidth=max(copy_bandwidth, gemv_bandwidth),
        peak_flops=2 * matmul_size ** 3 / matmul_time,
        dtype=str(dtype).removeprefix("torch."), num_threads=torch.get_num_threads(),
        copy_bandwidth=copy_bandwidth, gemv_bandwidth=gemv_bandwidth,
        copy_bytes=copy_bytes, matmul_size=matmul_size,
    )


CPU_MATMUL_SECONDS = 0.5     # the CPU's matmul ceiling halves its product's size until one takes at most this
CPU_TIMING_SECONDS = 3.0     # and each CPU measurement stops after this many seconds of timed calls (3 at least)


def _seconds(fn) -> float:
    """Seconds of one call of fn() (on the CPU)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _best_time(fn, device: str, repeats: int) -> float:
    """The shortest of `repeats` timings of fn() (seconds), after one untimed call; on the CPU, fewer
    once the timed calls add up to CPU_TIMING_SECONDS (three at least)."""
    fn()
    best, spent = float("inf"), 0.0
    for done in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
        if device != "cuda" and done >= 2 and spent >= CPU_TIMING_SECONDS:
            break
    return best


# ---- the model ------------------------------------------------------------------------------

# Bytes per weight of the CPU's packed formats (nanovllm/ops/quant.py): int8 one byte (its per-row
# scale left out); int4 half a byte plus a bfloat16 scale and zero per group of 32. The engine also
# keeps a bfloat16 copy for steps of many rows; a step that reads it reads more, so counting the
# packed bytes keeps the bound a bound. Their matmuls run in bfloat16 where the CPU has it (see `matmul_dtype`).
WEIGHT_FORMAT_BYTES = {"int8": 1.0, "int4": 0.5 + 4 / 32}


def matmul_dtype(engine_dtype: str) -> torch.dtype:
    """The dtype the engine's matmuls run in, whose peak the roofline uses: the engine's dtype; for the
    packed CPU formats bfloat16 (their kernels and their prefill copy take bfloat16) where the CPU
    multiplies it with its own instructions, else float32's, the higher peak there. Without them a
    bfloat16 product is emulated at a few gigaflops a second, while the packed kernels widen their codes
    and multiply in float32, so bfloat16's peak would be no bound on them: on an AVX2 AMD EPYC it put the
    decode's roofline at 3 tok/s against 44 measured."""
    if engine_dtype in WEIGHT_FORMAT_BYTES:
        from nanovllm.ops.quant import onednn_bfloat16_supported
        return torch.bfloat16 if onednn_bfloat16_supported() else torch.float32
    return DTYPES[engine_dtype]


@dataclass(frozen=True)
class ModelCost:
    """The sizes that set a step's bytes and flops, counted from a ModelConfig."""
    linear_params: int         # weights of the layers' matmuls (q, k, v, o, gate, up, down), biases included
    norm_params: int           # RMSNorm weights (read, not multiplied)
    lm_head_params: int        # vocab x hidden
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int                   # activations, KV cache, norms, embedding rows
    matmul_weight_bytes: float         # per parameter of the linears and the LM head, as stored
    linear_weight_bytes: float | None = None   # per parameter of the layers' linears if quantized apart (GPU
                                               # formats: FP8, 4-bit)
    lm_head_weight_bytes: float | None = None  # per parameter of the LM head if quantized with them
    kv_element_bytes: int | None = None        # per element of the KV cache if stored apart from dtype_bytes
                                               # (kv_cache_dtype="fp8": 1)

    @classmethod
    def from_config(cls, config: ModelConfig, dtype_bytes: int, matmul_weight_bytes: float | None = None,
                    linear_weight_bytes: float | None = None,
                    lm_head_weight_bytes: float | None = None,
                    kv_element_bytes: int | None = None) -> "ModelCost":
        """matmul_weight_bytes: bytes per matmul weight if stored apart from `dtype_bytes` (a packed
        CPU format, see WEIGHT_FORMAT_BYTES); linear_weight_bytes and lm_head_weight_bytes: bytes per
        weight of the decoder's linear layers and of the LM head as a quantized GPU model stores them
        (QuantizationMethod.bytes_per_weight), None where they keep matmul_weight_bytes;
        kv_element_bytes: bytes per KV-cache element when the cache stores another dtype (FP8)."""
        hidden, head_dim = config.hidden_size, config.head_dim
        q_size = config.num_attention_heads * head_dim
        kv_size = config.num_key_value_heads * head_dim
        attention = hidden * (q_size + 2 * kv_size) + q_size * hidden
        if config.attention_bias:
            attention += q_size + 2 * kv_size
        mlp = 3 * hidden * config.intermediate_size
        norms = 2 * hidden + (2 * head_dim if config.qk_norm else 0)
        return cls(
            linear_params=config.num_hidden_layers * (attention + mlp),
            norm_params=config.num_hidden_layers * norms + hidden,
            lm_head_params=config.vocab_size * hidden,
            hidden_size=hidden, num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads,
            head_dim=head_dim, dtype_bytes=dtype_bytes,
            matmul_weight_bytes=dtype_bytes if matmul_weight_bytes is None else matmul_weight_bytes,
            linear_weight_bytes=linear_weight_bytes, lm_head_weight_bytes=lm_head_weight_bytes,
            kv_element_bytes=kv_element_bytes,
        )

    @property
    def weight_bytes(self) -> int:
        """Every weight a step reads in full: layers, norms and the LM head (a tied LM head is the
        embedding matrix, read here in full; the embedding gather is counted per token). Each at its
        stored size: a quantized model's linears at linear_weight_bytes."""
        linear_bytes = self.matmul_weight_bytes if self.linear_weight_bytes is None else self.linear_weight_bytes
        head_bytes = self.matmul_weight_bytes if self.lm_head_weight_bytes is None else self.lm_head_weight_bytes
        return round(self.linear_params * linear_bytes + self.lm_head_params * head_bytes
                     + self.norm_params * self.dtype_bytes)

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token in every layer, at the cache's stored size."""
        element_bytes = self.dtype_bytes if self.kv_element_bytes is None else self.kv_element_bytes
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element_bytes

    @property
    def attention_flops_per_context_token(self) -> int:
        """QK^T and PV for one query against one context token, in every layer."""
        return 4 * self.head_dim * self.num_heads * self.num_layers


# ---- steps and schedules --------------------------------------------------------------------

@dataclass(frozen=True)
class Chunk:
    """`num_new_tokens` tokens of one sequence computed in a step, after `num_computed_tokens` cached ones."""
    num_computed_tokens: int
    num_new_tokens: int
    samples: bool = True       # whether the chunk's last token produces an output token (the LM head runs)


@dataclass
class StepCost:
    bytes: int
    flops: int

    def seconds(self, ceilings: Ceilings) -> float:
        return max(self.bytes / ceilings.memory_bandwidth, self.flops / ceilings.peak_flops)


def step_cost(cost: ModelCost, chunks: list[Chunk]) -> StepCost:
    """Bytes moved and flops done by one step running `chunks` (see the module docstring)."""
    new_tokens = sum(c.num_new_tokens for c in chunks)
    cached_tokens = sum(c.num_computed_tokens for c in chunks)
    sampled_rows = sum(c.samples for c in chunks)
    # Token p (0-based position) attends to p + 1 tokens; a chunk covers positions c .. c + n - 1.
    context = sum(c.num_new_tokens * c.num_computed_tokens + c.num_new_tokens * (c.num_new_tokens + 1) // 2
                  for c in chunks)
    bytes_moved = (cost.weight_bytes
                   + new_tokens * cost.hidden_size * cost.dtype_bytes
                   + (cached_tokens + new_tokens) * cost.kv_bytes_per_token)
    flops = (2 * cost.linear_params * new_tokens
             + 2 * cost.lm_head_params * sampled_rows
             + cost.attention_flops_per_context_token * context)
    return StepCost(bytes=bytes_moved, flops=flops)


def lockstep_schedule(requests: list[tuple[int, int]]) -> list[list[Chunk]]:
    """The lower-bound schedule of (prompt_len, output_len) requests: one step prefills every prompt
    (sampling each first token), then step k = 1, 2, ... feeds each request's k-th output token
    while the request still needs more (output_len > k)."""
    for prompt_len, output_len in requests:
        if prompt_len < 1 or output_len < 1:
            raise ValueError(f"a request needs a prompt and an output of at least one token, "
                             f"got prompt_len={prompt_len}, output_len={output_len}")
    steps = [[Chunk(0, prompt_len) for prompt_len, _ in requests]]
    for k in range(1, max(output_len for _, output_len in requests)):
        steps.append([Chunk(prompt_len + k - 1, 1) for prompt_len, output_len in requests if output_len > k])
    return steps


@dataclass
class Roofline:
    """The bound of one workload on one machine."""
    time: float                    # seconds: the sum of every step's bound
    prefill_time: float            # the first step's bound (the least time to first token)
    num_steps: int
    num_requests: int
    input_tokens: int
    output_tokens: int
    bytes: int                     # over all steps
    flops: int
    memory_bound_steps: int        # steps whose bound is bytes / BW
    step_times: list[float] = field(repr=False, default_factory=list)

    @property
    def output_throughput(self) -> float:
        """Output tokens/s if every step ran at its bound."""
        return self.output_tokens / self.time

    @property
    def decode_throughput(self) -> float:
        """Tokens/s of the decode steps alone (excluding the first token, which the prefill step samples);
        the bound on one request's decode speed."""
        decode_time = self.time - self.prefill_time
        return (self.output_tokens - self.num_requests) / decode_time if decode_time > 0 else float("inf")

    def as_dict(self) -> dict:
        return {"time_s": self.time, "prefill_time_s": self.prefill_time, "num_steps": self.num_steps,
                "num_requests": self.num_requests, "input_tokens": self.input_tokens,
                "output_tokens": self.output_tokens, "bytes": self.bytes, "flops": self.flops,
                "memory_bound_steps": self.memory_bound_steps,
                "output_tokens_per_second": self.output_throughput,
                "decode_tokens_per_second": self.decode_throughput}


def workload_roofline(cost: ModelCost, ceilings: Ceilings, requests: list[tuple[int, int]]) -> Roofline:
    """The lower-bound time of (prompt_len, output_len) requests run by the lock-step schedule."""
    step_times, total_bytes, total_flops, memory_bound = [], 0, 0, 0
    for chunks in lockstep_schedule(requests):
        step = step_cost(cost, chunks)
        memory_time, compute_time = step.bytes / ceilings.memory_bandwidth, step.flops / ceilings.peak_flops
        step_times.append(max(memory_time, compute_time))
        memory_bound += memory_time >= compute_time
        total_bytes += step.bytes
        total_flops += step.flops
    return Roofline(
        time=sum(step_times), prefill_time=step_times[0], num_steps=len(step_times),
        num_requests=len(requests), input_tokens=sum(p for p, _ in requests),
        output_tokens=sum(o for _, o in requests), bytes=total_bytes, flops=total_flops,
        memory_bound_steps=memory_bound, step_times=step_times,
    )
