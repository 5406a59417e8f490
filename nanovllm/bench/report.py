"""The benchmark's output: one table, a JSON file with every number behind it, and the tables of all runs.

Each row of the table is one figure of one workload on one device: nano-vllm's
measured value, the roofline's value, the fraction of the roofline reached, and
each peer's value with nano-vllm's speed relative to it (x1.50 = nano-vllm is
1.5 times as fast). For times (TTFT) lower is better, so the fraction is
roofline / measured and the ratio peer / measured: both stay "higher is better".

A saved run is one JSON file in benchmarks/results/ (its fields: docs/benchmarks.md).
`nano-vllm bench report` turns every such file into benchmarks/README.md (all
runs) and the project README's performance table (the latest run of each
workload, model, card and figure), byte for byte the same from the same files.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanovllm.bench.workloads import THROUGHPUT_NUM_PROMPTS


@dataclass
class Figure:
    workload: str
    device_name: str
    name: str                      # e.g. "output tok/s"
    measured: float
    roofline: float
    higher_is_better: bool = True
    peers: dict[str, float | None] = field(default_factory=dict)   # peer -> its value (None: did not run)
    headline: bool = True          # False: listed in benchmarks/README.md only, not in the project README

    @property
    def fraction(self) -> float:
        """Of the roofline, in (0, 1] unless a ceiling was under-measured."""
        return self.measured / self.roofline if self.higher_is_better else self.roofline / self.measured

    def ratio(self, peer: str) -> float | None:
        """nano-vllm's speed over the peer's (> 1: nano-vllm is faster)."""
        value = self.peers.get(peer)
        if value is None:
            return None
        return self.measured / value if self.higher_is_better else value / self.measured

    def as_dict(self) -> dict:
        return {"workload": self.workload, "device": self.device_name, "figure": self.name,
                "measured": self.measured, "roofline": self.roofline, "fraction_of_roofline": self.fraction,
                "higher_is_better": self.higher_is_better, "peers": dict(self.peers),
                "ratio_to_peer": {peer: self.ratio(peer) for peer in self.peers}, "headline": self.headline}


TABLE_COLUMNS = ("workload", "device", "figure", "nano-vllm", "roofline", "fraction")


def format_table(figures: list[Figure]) -> str:
    """A Markdown pipe table (readable in a terminal as it is)."""
    peers = list(dict.fromkeys(peer for figure in figures for peer in figure.peers))
    header = list(TABLE_COLUMNS) + [column for peer in peers for column in (peer, f"nano-vllm / {peer}")]
    rows = []
    for figure in figures:
        row = [figure.workload, figure.device_name, figure.name, _number(figure.measured),
               _number(figure.roofline), f"{figure.fraction:.1%}"]
        for peer in peers:
            value, ratio = figure.peers.get(peer), figure.ratio(peer)
            row += ["—" if value is None else _number(value), "—" if ratio is None else f"x{ratio:.2f}"]
        rows.append(row)
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(line, widths)) + " |"
             for line in [header, *rows]]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(lines)


def _number(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


# ---- where and what ran ---------------------------------------------------------------------

def machine_info(device: str) -> dict:
    from nanovllm.bench.roofline import cpu_model_name

    info = {"platform": platform.platform(), "cpu": cpu_model_name(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": device}
    if device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                    gpu_memory_bytes=torch.cuda.get_device_properties(0).total_memory)
    return info


def versions() -> dict:
    import transformers

    import nanovllm
    from nanovllm.bench.peers import peer_version

    return {"python": sys.version.split()[0], "nano_vllm": nanovllm.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "llama_cpp_python": peer_version("llama.cpp")}


def git_commit() -> str | None:
    """$NANO_VLLM_GIT_COMMIT where it is set: a working tree copied to another machine names the commit it
    was copied from, which the copy's own git metadata, if it has any, need not know. Else HEAD of the
    checkout nano-vllm runs from, "+dirty" if it has uncommitted changes; None outside a git checkout."""
    if named := os.environ.get("NANO_VLLM_GIT_COMMIT"):
        return named
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def source_digest(package: Path | None = None) -> str:
    """sha256 (first 16 hex digits) of the nanovllm package's .py files, path and content, in path
    order: names the code a result ran, also where the checkout's git metadata does not (a working
    tree copied to another machine reports its base commit "+dirty"). `git stash; python -c "from
    nanovllm.bench.report import source_digest; print(source_digest())"` recomputes it for any tree."""
    package = package or Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def card_name(device: str, device_name: str, num_threads: int) -> str:
    """What ran a result, as the tables print it: "NVIDIA H200", "2 x NVIDIA H200" (the ceilings' name of
    a tensor-parallel group), "<CPU model> (2 threads)"."""
    return f"{device_name} ({num_threads} threads)" if device == "cpu" else device_name


def result_stem(result: dict) -> str:
    """<YYYY-MM-DD>-<card>-<kind>-<model>, e.g. 2026-11-28-nvidia-h200-throughput-llama-3.2-1b
    (-batch-invariant after it for a run with --batch-invariant, -json-schema-50 for one with half its
    requests under a JSON schema)."""
    model = Path(result["model"]["name"]).name   # a model given as a path: its folder or file name
    ratio = _structured_output_ratio(result)
    parts = [result["card"], result["kind"], model] + (["batch-invariant"] if _batch_invariant(result) else []) \
        + ([f"json-schema-{round(100 * ratio)}"] if ratio else [])
    return "-".join([result["date"][:10]] + [_slug(part) for part in parts])


def _batch_invariant(result: dict) -> bool:
    return bool((result.get("engine_config") or {}).get("batch_invariant"))


def _structured_output_ratio(result: dict) -> float:
    return max((workload.get("structured_output_ratio", 0.0) for workload in (result.get("workloads") or {}).values()),
               default=0.0)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower().replace("(r)", "")).strip("-.") or "x"


def save_result(result: dict, directory: Path) -> Path:
    """Write result to directory/<stem>.json, never over an earlier run (-run2, -run3, ... on a clash)."""
    directory.mkdir(parents=True, exist_ok=True)
    stem, run = result_stem(result), 1
    path = directory / f"{stem}.json"
    while path.exists():
        run += 1
        path = directory / f"{stem}-run{run}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


# ---- the tables of every saved run ---------------------------------------------------------

RESULTS_DIR = Path("benchmarks") / "results"


def repository_root() -> Path:
    """The checkout nano-vllm runs from (where benchmarks/ lies), else the current directory."""
    checkout = Path(__file__).resolve().parents[2]
    return checkout if (checkout / "benchmarks").is_dir() else Path.cwd()


TABLE_BEGIN = "<!-- performance-table: generated by `nano-vllm bench report` from benchmarks/results/ -->"
TABLE_END = "<!-- /performance-table -->"
SCHEMA = 1
REQUIRED = ("schema", "date", "card", "kind", "model", "git_commit", "source_digest", "command", "figures")
FIGURE_REQUIRED = ("workload", "figure", "measured", "roofline", "fraction_of_roofline", "higher_is_better", "peers")


@dataclass(frozen=True)
class Row:
    """One figure of one saved run, as the generated tables print it."""
    date: str
    workload: str
    model: str
    card: str
    figure: str
    measured: float
    roofline: float
    fraction: float
    peers: str
    commit: str
    file: str
    headline: bool
    baseline: bool = False      # the run is another tree or setting measured beside the product for an A/B

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.workload, self.model, self.card, self.figure)


def load_results(directory: Path) -> list[tuple[str, dict]]:
    """(file name, result) of every JSON file in directory, in name order; ValueError names a bad file."""
    results = []
    for path in sorted(directory.glob("*.json")):
        result = json.loads(path.read_text(encoding="utf-8"))
        missing = [key for key in REQUIRED if key not in result]
        missing += [f"figures[{i}].{key}" for i, figure in enumerate(result.get("figures", []))
                    for key in FIGURE_REQUIRED if key not in figure]
        if missing or result["schema"] != SCHEMA or "name" not in result["model"]:
            raise ValueError(f"{path}: not a schema-{SCHEMA} result (missing {', '.join(missing) or 'model.name'}); "
                             "see docs/benchmarks.md for the fields a result needs")
        results.append((path.name, result))
    return results


def model_label(model: dict, batch_invariant: bool = False, structured_output_ratio: float = 0.0,
                engine_config: dict | None = None) -> str:
    """"llama-3.2-1b, dummy weights, bfloat16": the name and, where known, the weights and their dtype
    (and "batch-invariant" for a run with --batch-invariant, "50% under a JSON schema" for a run with
    --structured-output-ratio 0.5, the quantization and the KV cache's dtype where the engine's
    configuration names them and the dtype does not, and "peer all-reduce" for --all-reduce peer)."""
    load_format, dtype = model.get("load_format"), model.get("dtype") or ""
    dtype = dtype.replace(" (quantized at load)", "")   # how earlier results wrote "fp8 weights"
    quantization = (engine_config or {}).get("quantization")
    kv_cache_dtype = (engine_config or {}).get("kv_cache_dtype")
    details = ["dummy weights" if load_format == "dummy" else None, dtype or None,
               f"{quantization} weights" if quantization not in (None, "none") and quantization not in dtype else None,
               f"{kv_cache_dtype} KV cache" if kv_cache_dtype not in (None, "auto") else None,
               "batch-invariant" if batch_invariant else None,
               "peer all-reduce" if (engine_config or {}).get("all_reduce") == "peer" else None,
               f"{structured_output_ratio:.0%} under a JSON schema" if structured_output_ratio else None]
    return ", ".join([model["name"]] + [detail for detail in details if detail not in (None, "auto")])


def workload_label(name: str, result: dict) -> str:
    """"random 512 x 256/256" for the `random` dataset, whose runs differ only in their shape (requests x
    prompt/output tokens), and "throughput, 64 requests" for bench.py's workload cut short, so that runs
    of different shapes get rows of their own; any other name as it is."""
    workload = (result.get("workloads") or {}).get(name) or {}
    num_requests = workload.get("num_requests", THROUGHPUT_NUM_PROMPTS)
    if name in ("throughput", "throughput-fixed") and num_requests != THROUGHPUT_NUM_PROMPTS:
        return f"{name}, {num_requests} requests"
    prompt_lens, output_lens = workload.get("prompt_len_range"), workload.get("output_len_range")
    if name != "random" or not prompt_lens or not output_lens:
        return name
    prompt_len = prompt_lens[0] if prompt_lens[0] == prompt_lens[1] else "{}-{}".format(*prompt_lens)
    output_len = output_lens[0] if output_lens[0] == output_lens[1] else "{}-{}".format(*output_lens)
    return f"{name} {workload['num_requests']} x {prompt_len}/{output_len}"


def result_rows(results: list[tuple[str, dict]]) -> list[Row]:
    rows = []
    for file, result in results:
        model = model_label(result["model"], _batch_invariant(result), _structured_output_ratio(result),
                            result.get("engine_config"))
        for figure in result["figures"]:
            rows.append(Row(date=result["date"], workload=workload_label(figure["workload"], result), model=model,
                            card=result["card"], figure=figure["figure"], measured=figure["measured"],
                            roofline=figure["roofline"], fraction=figure["fraction_of_roofline"],
                            peers=_peer_text(figure), commit=(result["git_commit"] or "")[:7]
                            + ("+dirty" if (result["git_commit"] or "").endswith("+dirty") else ""),
                            file=file, headline=figure.get("headline", True),
                            baseline=bool(result.get("baseline"))))
    return rows


def _peer_text(figure: dict) -> str:
    """"hf 17.5 (x2.33), llama.cpp 63.7 (x0.64)": each peer's value and nano-vllm's speed relative to it."""
    parts = []
    for peer, value in figure["peers"].items():
        if value is None:
            continue
        ratio = figure["measured"] / value if figure["higher_is_better"] else value / figure["measured"]
        parts.append(f"{peer} {_number(value)} (x{ratio:.2f})")
    return ", ".join(parts)


def _pipe_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def latest_rows(rows: list[Row]) -> list[Row]:
    """The latest headline row of each (workload, model, card, figure), ordered by model, card, workload;
    an A/B baseline (a result with "baseline" set) is never the latest, whenever it ran."""
    latest: dict[tuple[str, str, str, str], Row] = {}
    for row in rows:
        if row.headline and not row.baseline and (row.key not in latest or row.date >= latest[row.key].date):
            latest[row.key] = row
    return sorted(latest.values(), key=lambda row: (row.model.lower(), row.card, row.workload, row.figure))


def performance_table(rows: list[Row], link_prefix: str) -> str:
    """The project README's table: the latest run of each workload, with a link to its file."""
    return _pipe_table(
        ["workload", "model", "card", "nano-vllm", "roofline", "fraction", "peer", "run"],
        [[f"`{row.workload}`", row.model, row.card, f"{_number(row.measured)} {row.figure}", _number(row.roofline),
          f"{row.fraction:.1%}", row.peers, f"[{row.date[:10]}]({link_prefix}{row.file})"]
         for row in latest_rows(rows)])


def results_readme(rows: list[Row]) -> str:
    """benchmarks/README.md: what the folder holds, then every saved figure, newest first."""
    every = sorted(rows, key=lambda row: (row.date, row.file), reverse=True)
    return "\n".join([
        "# Benchmark results",
        "",
        "Generated by `nano-vllm bench report` from the files in [results/](results/): one JSON file per",
        "measured run, its fields described in [docs/benchmarks.md](../docs/benchmarks.md), which also",
        "defines the workloads and the roofline. Do not edit this file by hand; add a result",
        "(`nano-vllm bench KIND ... --save`) and run `nano-vllm bench report`.",
        "",
        "## Latest run of each workload",
        "",
        performance_table(rows, "results/"),
        "",
        "## Every run, newest first",
        "",
        _pipe_table(["date", "workload", "model", "card", "figure", "nano-vllm", "roofline", "fraction", "peer",
                     "commit", "file"],
                    [[row.date[:16].replace("T", " "), f"`{row.workload}`", row.model, row.card, row.figure,
                      _number(row.measured), _number(row.roofline), f"{row.fraction:.1%}", row.peers,
                      (f"`{row.commit}`" if row.commit else "") + (" (A/B baseline)" if row.baseline else ""),
                      f"[{row.file}](results/{row.file})"]
                     for row in every]),
        "",
    ])


def with_performance_table(readme: str, table: str) -> str:
    """readme with the text between the performance-table markers replaced by table."""
    if TABLE_BEGIN not in readme or TABLE_END not in readme:
        raise ValueError(f"README.md has no performance-table markers; put {TABLE_BEGIN} and {TABLE_END} "
                         "on lines of their own where the table goes")
    head, rest = readme.split(TABLE_BEGIN, 1)
    _, tail = rest.split(TABLE_END, 1)
    return f"{head}{TABLE_BEGIN}\n{table}\n{TABLE_END}{tail}"


def generated_files(root: Path | None = None) -> dict[Path, str]:
    """Each file `nano-vllm bench report` writes under root (the repository), with the text it should hold."""
    root = root or repository_root()
    rows = result_rows(load_results(root / RESULTS_DIR))
    readme = root / "README.md"
    return {root / "benchmarks" / "README.md": results_readme(rows),
            readme: with_performance_table(readme.read_text(encoding="utf-8"), performance_table(rows, f"{RESULTS_DIR}/"))}


def write_report(root: Path | None = None, check: bool = False) -> list[Path]:
    """Regenerate the tables (or, with check, only compare them); -> the files that were (or are) out of date."""
    stale = []
    for path, text in generated_files(root).items():
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            stale.append(path)
            if not check:
                path.write_text(text, encoding="utf-8")
    return stale
