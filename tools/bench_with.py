"""Run a `nano-vllm` command with module constants set first: an A/B run of a switch in one process.

    python tools/bench_with.py nanovllm.ops.activation.PARTIALS_INTO_SILU=False -- \\
        bench latency --dummy llama-3.2-1b --quantization w4a16 --json off.json

Each setting is MODULE.NAME=VALUE with VALUE a Python literal; the module must already have NAME.
A result written with --json records the settings ("settings") and this command line ("command"), so
that a saved run says what it ran with.
"""
from __future__ import annotations

import ast
import importlib
import json
import shlex
import sys
from pathlib import Path


def parse_setting(setting: str) -> tuple[object, str, object]:
    """MODULE.NAME=VALUE -> (the module, NAME, the value), checking that the module has NAME."""
    target, equals, value = setting.partition("=")
    module_name, _, name = target.rpartition(".")
    if not equals or not module_name:
        raise SystemExit(f"a setting is MODULE.NAME=VALUE; got {setting!r}")
    module = importlib.import_module(module_name)
    if not hasattr(module, name):
        raise SystemExit(f"{module_name} has no {name}")
    return module, name, ast.literal_eval(value)


def apply(setting: str) -> tuple[str, object]:
    """Set MODULE.NAME to VALUE -> ("MODULE.NAME", the value)."""
    module, name, value = parse_setting(setting)
    setattr(module, name, value)
    target = f"{module.__name__}.{name}"
    print(f"{target} = {getattr(module, name)!r}", file=sys.stderr)
    return target, getattr(module, name)


def record_settings(json_path: Path, settings: dict[str, object], command: str) -> None:
    """Add the settings and the command line to the bench result at json_path."""
    result = json.loads(json_path.read_text(encoding="utf-8"))
    result["settings"] = settings
    result["command"] = command
    json_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str]) -> int:
    if "--" not in argv:
        raise SystemExit(__doc__)
    split = argv.index("--")
    settings = dict(apply(setting) for setting in argv[:split])
    from nanovllm.bench.cli import portable_arguments
    from nanovllm.cli import main as cli
    status = cli(argv[split + 1:])
    rest = argv[split + 1:]
    if "--json" in rest and rest.index("--json") + 1 < len(rest) and Path(rest[rest.index("--json") + 1]).exists():
        record_settings(Path(rest[rest.index("--json") + 1]), settings,      # (no machine's paths in a result)
                        "python tools/bench_with.py " + shlex.join(portable_arguments(argv)))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
