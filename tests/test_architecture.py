"""The floors of docs/architecture.md hold: every import points down (or stays on its floor), and no
module imports itself back through others. Imports inside functions count; those under
`if TYPE_CHECKING:` name a type for annotations only and never run, so they do not."""
from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nanovllm"

# Highest floor first; a module belongs to the floor of the longest prefix that names it.
FLOORS: list[tuple[str, tuple[str, ...]]] = [
    ("interfaces", ("nanovllm.cli", "nanovllm.server", "nanovllm.viz", "nanovllm.bench", "nanovllm.engine_args",
                    "nanovllm.tp_main")),
    ("engine", ("nanovllm", "nanovllm.llm", "nanovllm.engine", "nanovllm.tokenizer")),
    ("runner", ("nanovllm.runner", "nanovllm.structured")),
    ("model", ("nanovllm.model",)),
    ("ops", ("nanovllm.ops",)),
    ("values", ("nanovllm.config", "nanovllm.sampling_params", "nanovllm.outputs", "nanovllm.model.config",
                "nanovllm.model.errors", "nanovllm.model.embedded", "nanovllm.structured.params")),
]


def floor_of(module: str) -> int:
    """0 for the top floor; larger numbers lie lower."""
    matches = [(len(prefix), level) for level, (_, prefixes) in enumerate(FLOORS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    if not matches:
        raise AssertionError(f"{module} lies on no floor; add it to FLOORS and to docs/architecture.md")
    return max(matches)[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(source: str, this: str, is_package: bool, modules: set[str]) -> set[str]:
    """The package's modules that module `this` imports when it runs (at any depth), skipping TYPE_CHECKING."""
    tree = ast.parse(source)
    for node in ast.walk(tree):   # drop the bodies of `if TYPE_CHECKING:`
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = []
    package = this.split(".") if is_package else this.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name in modules and name != this}


@functools.lru_cache(maxsize=1)
def import_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {module: runtime_imports(path.read_text(encoding="utf-8"), module, path.name == "__init__.py", set(paths))
            for module, path in paths.items()}


def test_every_import_points_down_or_stays_on_its_floor():
    upward = [f"{module} ({FLOORS[floor_of(module)][0]}) imports {target} ({FLOORS[floor_of(target)][0]})"
              for module, targets in import_graph().items() for target in targets
              if floor_of(target) < floor_of(module)]
    assert not upward, "imports that point up a floor:\n" + "\n".join(sorted(upward))


def test_no_module_imports_itself_back():
    graph = import_graph()

    def reaches(start: str, goal: str) -> list[str] | None:   # a path start -> ... -> goal, depth first
        stack, seen = [(start, [start])], set()
        while stack:
            module, path = stack.pop()
            for target in graph[module]:
                if target == goal:
                    return path + [goal]
                if target not in seen:
                    seen.add(target)
                    stack.append((target, path + [target]))
        return None

    loops = [" -> ".join(loop) for module in sorted(graph) if (loop := reaches(module, module))]
    assert not loops, "import loops:\n" + "\n".join(loops)


@pytest.mark.parametrize("source, expected", [
    ("from nanovllm.ops.attention import AttentionMetadata\n", {"nanovllm.ops.attention"}),
    ("def f():\n    from nanovllm.engine import engine\n", {"nanovllm.engine", "nanovllm.engine.engine"}),
    ("if TYPE_CHECKING:\n    from nanovllm.engine.scheduler import Batch\n", set()),
])
def test_the_check_reads_module_and_function_imports_but_not_type_checking_ones(source, expected):
    assert runtime_imports(source, "nanovllm.runner.probe", False, set(import_graph())) == expected


def test_the_check_resolves_relative_imports():
    assert runtime_imports("from ..ops import attention\n", "nanovllm.runner.probe", False,
                           set(import_graph())) == {"nanovllm.ops", "nanovllm.ops.attention"}
