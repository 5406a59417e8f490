"""`nano-vllm`: one command, three jobs.

    nano-vllm run   [MODEL] ...   generate text, watch the engine work (visualizer)
    nano-vllm serve [MODEL] ...   OpenAI-compatible HTTP server
    nano-vllm bench KIND ...      throughput / latency / serving benchmarks

Each subcommand lives in its own module with `add_arguments(parser)` and
`main(args) -> int`; they are imported only when chosen, so `--help` is quick.
Errors a user can cause (a missing model, a prompt over the context, a bad flag
value) end as one line on stderr and exit code 2, never a traceback
(set NANO_VLLM_DEBUG=1 to see it).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

SUBCOMMANDS = {
    "run": ("nanovllm.viz.run_command", "generate text with a live view of attention, KV blocks and the scheduler"),
    "serve": ("nanovllm.server.cli", "start the OpenAI-compatible server"),
    "bench": ("nanovllm.bench.cli", "throughput, latency and serving benchmarks against the roofline"),
}


class UserError(Exception):
    """An error the user can fix; printed as one line without a traceback."""


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, object | None]:
    parser = argparse.ArgumentParser(prog="nano-vllm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    module = None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(sub_parser)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, module = build_parser(argv)
    args = parser.parse_args(argv)
    if module is None:
        parser.print_help()
        return 2
    from nanovllm.model.errors import ModelLoadError
    try:
        return int(module.main(args) or 0)
    except (UserError, ModelLoadError, ValueError, FileNotFoundError) as e:
        if os.environ.get("NANO_VLLM_DEBUG"):
            raise
        print(f"nano-vllm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:   # `nano-vllm run ... | head`: the reader left; nothing to report
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    # Import ourselves by name so that `python -m nanovllm.cli` catches the same UserError
    # class the subcommands raise (this file runs as __main__, a second copy of the module).
    from nanovllm.cli import main as package_main
    sys.exit(package_main())
