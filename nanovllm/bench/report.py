"""The benchmark's output: one table, and a JSON file with every number behind it.

Each row of the table is one figure of one workload on one device: nano-vllm's
measured value, the roofline's value, the fraction of the roofline reached, and
each peer's value with nano-vllm's speed relative to it (x1.50 = nano-vllm is
1.5 times as fast). For times (TTFT) lower is better, so the fraction is
roofline / measured and the ratio peer / measured: both stay "higher is better".
"""
from __future__ import annotations

import datetime
import hashlib
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Figure:
    workload: str
    device_name: str
    name: str                      # e.g. "output tok/s"
    measured: float
    roofline: float
    higher_is_better: bool = True
    peers: dict[str, float | None] = field(default_factory=dict)   # peer -> its value (None: did not run)

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
                "ratio_to_peer": {peer: self.ratio(peer) for peer in self.peers}}


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
    """HEAD of the checkout nano-vllm runs from, "+dirty" if it has uncommitted changes; outside a git
    checkout (a copy sent to another machine) $NANO_VLLM_GIT_COMMIT, else None."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return os.environ.get("NANO_VLLM_GIT_COMMIT")
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


def result_stem(device: str, device_name: str, workload: str, date: datetime.date | None = None) -> str:
    """<YYYY-MM-DD>-<card or "cpu">-<workload>, e.g. 2026-11-28-nvidia-h100-80gb-hbm3-throughput."""
    date = date or datetime.date.today()
    machine = "cpu" if device == "cpu" else re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    return f"{date.isoformat()}-{machine}-{workload}"


def markdown_report(result: dict) -> str:
    """The .md beside a saved JSON: the table, how to reproduce it, what it ran on."""
    machine, ceilings = result["machine"], result["ceilings"]
    lines = [f"# nano-vllm bench {result['kind']}: {result['model']['name']} on {ceilings['device_name']}", "",
             result["table"], "",
             f"- command: `{result['command']}`",
             f"- date: {result['date']}; git commit {result['git_commit']}, "
             f"source digest {result.get('source_digest')}",
             f"- machine: {machine['cpu']} ({machine['cpu_count']} cores, {machine['torch_threads']} torch threads)"
             + (f"; {machine['gpu']}" if "gpu" in machine else "")
             + f"; 1-minute load average {machine['load_average_1min']['start']:.1f} at the start, "
               f"{machine['load_average_1min']['end']:.1f} at the end",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v),
             f"- ceilings measured in the run (the better of before and after): copy "
             f"{ceilings['memory_bandwidth_GBps']:.1f} GB/s, {ceilings['dtype']} matmul "
             f"{ceilings['peak_TFLOPs'] * 1e3:.1f} GFLOP/s",
             f"- model: {result['model']['name']} ({result['model']['load_format']}, {result['model']['dtype']}, "
             f"{result['model']['params'] / 1e6:.1f} M parameters)"]
    for name, workload in result["workloads"].items():
        roofline = workload["roofline"]
        lines.append(f"- workload {name}: {workload['num_requests']} requests, {workload['input_tokens']} prompt "
                     f"and {workload['output_tokens']} output tokens; roofline {roofline['time_s']:.3g} s over "
                     f"{roofline['num_steps']} steps ({roofline['memory_bound_steps']} memory-bound)")
    for peer, info in result["peers"].items():
        lines.append(f"- peer {peer}: " + ", ".join(f"{k} {v}" for k, v in info.items() if k != "peer"))
    for note in result.get("notes", []):
        lines.append(f"- note: {note}")
    return "\n".join(lines) + "\n"
