"""The benchmark workloads of docs/benchmarks.md, as lists of requests.

A request here is only what sets the work: the prompt's token ids and how many
tokens to generate (EOS is ignored, so every request produces exactly
`max_tokens`). Prompts are random token ids: with EOS ignored, what the tokens
say does not change the speed, and token ids mean the same to every engine.

- `throughput`: the workload of nano-vllm's bench.py, so figures compare with
  the published ones. `random.seed(0)`; 256 prompts of `randint(100, 1024)`
  ids, each id `randint(0, 10000)`; then, in order, one
  `max_tokens = randint(100, 1024)` per request: 133,966 output tokens.
  Temperature 0.6, all submitted at once.
- `throughput-fixed`: the same prompts, every output exactly 512 tokens.
- `random`: `num_prompts` prompts of exactly `input_len` ids, `output_len` each.
- `latency`: one request alone, prompt 128, output 256, greedy; one prompt
  per run (the first a warm-up), so the prefix cache cannot shorten a prefill.
- `cpu`: on a small CPU: `latency`, then 16 concurrent requests of prompt 64 /
  output 128.

`--structured-output-ratio R` puts a share R of a `throughput` or `random`
workload's requests under `BENCH_JSON_SCHEMA` (spread evenly: 0.5 is every
second request); the grammar's end allows only EOS, which is ignored, so the
token count stays the workload's.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

DATASETS = ("throughput", "throughput-fixed", "random")
THROUGHPUT_NUM_PROMPTS = 256
THROUGHPUT_TEMPERATURE = 0.6
MAX_TOKEN_ID = 10000          # bench.py draws prompt ids from [0, 10000]
BENCH_JSON_SCHEMA = {"type": "object",
                     "properties": {"title": {"type": "string"},
                                    "notes": {"type": "array", "items": {"type": "string"}},
                                    "score": {"type": "integer"}},
                     "required": ["title", "notes", "score"]}


@dataclass(frozen=True)
class Request:
    prompt_token_ids: list[int]
    max_tokens: int


@dataclass
class Workload:
    name: str
    requests: list[Request]
    temperature: float
    structured_output_ratio: float = 0.0   # the share of requests under BENCH_JSON_SCHEMA

    def constrained(self, index: int) -> bool:
        """Whether request `index` runs under the schema: the ratio's share, spread evenly."""
        ratio = self.structured_output_ratio
        return int((index + 1) * ratio) > int(index * ratio)

    @property
    def shape(self) -> list[tuple[int, int]]:
        """(prompt_len, output_len) of every request: all the roofline needs."""
        return [(len(r.prompt_token_ids), r.max_tokens) for r in self.requests]

    @property
    def input_tokens(self) -> int:
        return sum(len(r.prompt_token_ids) for r in self.requests)

    @property
    def output_tokens(self) -> int:
        return sum(r.max_tokens for r in self.requests)

    def describe(self) -> dict:
        lengths = [len(r.prompt_token_ids) for r in self.requests]
        outputs = [r.max_tokens for r in self.requests]
        described = {"name": self.name, "num_requests": len(self.requests), "temperature": self.temperature,
                     "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                     "prompt_len_range": [min(lengths), max(lengths)], "output_len_range": [min(outputs), max(outputs)]}
        if self.structured_output_ratio:
            described["structured_output_ratio"] = self.structured_output_ratio
        return described


def throughput_workload(num_prompts: int = THROUGHPUT_NUM_PROMPTS, vocab_size: int | None = None,
                        fixed_output_len: int | None = None) -> Workload:
    """bench.py's workload (see the module docstring). A model whose vocabulary has no id 10000
    (a tiny test model) takes each id modulo its vocab_size; lengths stay the same.
    fixed_output_len: every output that long instead (the `throughput-fixed` workload: 512)."""
    _check_positive(num_prompts=num_prompts)
    rng = random.Random(0)
    prompts = [[rng.randint(0, MAX_TOKEN_ID) for _ in range(rng.randint(100, 1024))] for _ in range(num_prompts)]
    output_lens = [rng.randint(100, 1024) for _ in range(num_prompts)]
    if fixed_output_len is not None:
        output_lens = [fixed_output_len] * num_prompts
    if vocab_size is not None and vocab_size <= MAX_TOKEN_ID:
        prompts = [[token_id % vocab_size for token_id in prompt] for prompt in prompts]
    name = "throughput" if fixed_output_len is None else "throughput-fixed"
    return Workload(name, [Request(p, n) for p, n in zip(prompts, output_lens)], THROUGHPUT_TEMPERATURE)


def random_workload(num_prompts: int, input_len: int, output_len: int, vocab_size: int,
                    temperature: float = THROUGHPUT_TEMPERATURE, name: str = "random", seed: int = 0) -> Workload:
    """`num_prompts` prompts of `input_len` random ids below min(vocab_size, 10001), `output_len` tokens each."""
    _check_positive(num_prompts=num_prompts, input_len=input_len, output_len=output_len)
    rng = random.Random(seed)
    high = min(vocab_size - 1, MAX_TOKEN_ID)
    requests = [Request([rng.randint(0, high) for _ in range(input_len)], output_len) for _ in range(num_prompts)]
    return Workload(name, requests, temperature)


def latency_workload(vocab_size: int, input_len: int = 128, output_len: int = 256, num_runs: int = 1) -> Workload:
    """The `latency` workload: one greedy request at a time, `num_runs` timed after one warm-up. Each run
    has a prompt of its own, so none finds the previous run's prompt in the prefix cache."""
    return random_workload(num_runs + 1, input_len, output_len, vocab_size, temperature=0.0, name="latency")


def cpu_batch_workload(vocab_size: int, num_prompts: int = 16, input_len: int = 64, output_len: int = 128) -> Workload:
    """The concurrent half of the `cpu` workload ("batch"): 16 greedy requests of prompt 64 / output 128."""
    return random_workload(num_prompts, input_len, output_len, vocab_size, temperature=0.0, name="batch")


def dataset_workload(dataset: str, num_prompts: int | None, input_len: int | None, output_len: int | None,
                     vocab_size: int) -> Workload:
    """The workload a `throughput` or `serve` command line names."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    if dataset == "random":
        if input_len is None or output_len is None:
            raise ValueError("the random dataset needs --input-len and --output-len")
        return random_workload(num_prompts or THROUGHPUT_NUM_PROMPTS, input_len, output_len, vocab_size)
    if input_len is not None or (dataset == "throughput" and output_len is not None):
        raise ValueError(f"the {dataset} dataset draws its own lengths; --input-len/--output-len go with "
                         "--dataset random (or --output-len with throughput-fixed)")
    fixed = (output_len or 512) if dataset == "throughput-fixed" else None
    return throughput_workload(num_prompts or THROUGHPUT_NUM_PROMPTS, vocab_size, fixed)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
