"""`torchrun --nproc-per-node N -m nanovllm.tp_main MODEL --tensor-parallel-size N --prompt ...`

The launcher starts every rank of a tensor-parallel group (on one machine or
several). Rank 0 runs the engine: it generates greedily and prints each
completion's token ids and text. The other ranks serve it
(`nanovllm.runner.model_runner.run_worker`) until rank 0 shuts down.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from nanovllm import LLM, SamplingParams
from nanovllm.engine_args import add_engine_args, engine_config_from_args
from nanovllm.runner.model_runner import run_worker
from nanovllm.runner.tp_worker import launched_by_torchrun


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m nanovllm.tp_main",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    parser.add_argument("--max-tokens", type=int, default=16)
    add_engine_args(parser)
    args = parser.parse_args(argv)
    config = engine_config_from_args(args, model=args.model)
    if not launched_by_torchrun():
        parser.error("start this module with torchrun (it reads RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)")
    if int(os.environ.get("RANK", "0")) != 0:
        run_worker(config)
        return 0
    llm = LLM(**dataclasses.asdict(config))
    outputs = llm.generate(args.prompt, SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True),
                           use_tqdm=False)
    for output in outputs:
        print(f"{output.outputs[0].token_ids} {output.outputs[0].text!r}", flush=True)
    llm.engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
