"""Run a `nano-vllm` command with module constants set first: an A/B run of a switch in one process.

    python tools/bench_with.py nanovllm.ops.quant_linear.W4_ROWS_FROM_PRODUCER=True -- \\
        bench latency --dummy llama-3.2-1b --quantization w4a16 --json on.json

Each setting is MODULE.NAME=VALUE with VALUE a Python literal; the module must already have NAME.
"""
from __future__ import annotations

import ast
import importlib
import sys


def apply(setting: str) -> None:
    target, equals, value = setting.partition("=")
    module_name, _, name = target.rpartition(".")
    if not equals or not module_name:
        raise SystemExit(f"a setting is MODULE.NAME=VALUE; got {setting!r}")
    module = importlib.import_module(module_name)
    if not hasattr(module, name):
        raise SystemExit(f"{module_name} has no {name}")
    setattr(module, name, ast.literal_eval(value))
    print(f"{module_name}.{name} = {getattr(module, name)!r}", file=sys.stderr)


def main(argv: list[str]) -> int:
    if "--" not in argv:
        raise SystemExit(__doc__)
    split = argv.index("--")
    for setting in argv[:split]:
        apply(setting)
    from nanovllm.cli import main as cli
    return cli(argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
