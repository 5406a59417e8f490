"""Throughput with half the requests under a JSON schema against none constrained.

The cost of structured outputs in a full batch: each constrained row's grammar matcher
takes its last token and fills its bitmask on the host every step, the mask is applied
on the device, and the engine completes a constrained step before scheduling the next
(the matcher needs the token), which gives up async scheduling's overlap. Both runs
generate the same number of tokens (EOS ignored; a grammar that has finished allows
only EOS). Dummy weights of a built-in config, with a real tokenizer's vocabulary for
the grammar (the embedded SmolLM2's when installed, else a byte-level one).

    python benchmarks/structured_throughput.py --dummy llama-3.2-1b --json OUT.json
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time

from nanovllm.bench.harness import generate
from nanovllm.config import EngineConfig
from nanovllm.engine.engine import LLMEngine
from nanovllm.sampling_params import SamplingParams

SCHEMA = {"type": "object", "properties": {"title": {"type": "string"},
                                           "notes": {"type": "array", "items": {"type": "string"}},
                                           "score": {"type": "integer"}},
          "required": ["title", "notes", "score"]}


def tokenizer_path() -> str:
    from nanovllm.model.loader import resolve_model
    try:
        return resolve_model(None)   # the embedded SmolLM2 GGUF: its tokenizer
    except (ValueError, OSError):
        import sys
        from pathlib import Path
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from conftest import save_byte_tokenizer
        directory = tempfile.mkdtemp()
        save_byte_tokenizer(Path(directory))
        return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dummy", default="llama-3.2-1b")
    parser.add_argument("--num-requests", type=int, default=512)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    tokenizer = tokenizer_path()
    engine = LLMEngine(EngineConfig(model=args.dummy, load_format="dummy", tokenizer=tokenizer))
    vocab = min(engine.tokenizer.vocab_size, engine.model_config.vocab_size)
    rng = random.Random(0)
    prompts = [[rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(args.num_requests)]

    def params(constrained: bool, seed: int) -> SamplingParams:
        return SamplingParams(temperature=1.0, seed=seed, max_tokens=args.output_len, ignore_eos=True,
                              structured_outputs={"json": SCHEMA} if constrained else None)

    generate(engine, prompts[:8], [params(i % 2 == 0, i) for i in range(8)])   # warm-up: kernels, grammar
    results = {}
    for name, share in (("none", 0), ("half", 2), ("none_again", 0)):
        batch = [params(share and i % share == 0, i) for i in range(args.num_requests)]
        start = time.perf_counter()
        outputs = generate(engine, prompts, batch)
        elapsed = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        results[name] = {"elapsed_s": elapsed, "output_tokens": tokens, "output_tokens_per_s": tokens / elapsed}
        print(f"{name}: {tokens / elapsed:,.0f} output tok/s ({elapsed:.2f} s)", flush=True)
    baseline = max(results["none"]["output_tokens_per_s"], results["none_again"]["output_tokens_per_s"])
    results["loss_half_constrained"] = 1 - results["half"]["output_tokens_per_s"] / baseline
    results["config"] = {**vars(args), "tokenizer": tokenizer, "async_scheduling": engine.config.async_scheduling}
    print(f"half constrained loses {100 * results['loss_half_constrained']:.1f}% (target: at most 10%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
