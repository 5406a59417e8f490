"""The teaching chapters in docs/ are tested, so they cannot drift from the code.

A *command* is a line starting with `$ ` inside a fenced code block of docs/*.md,
continued over the next lines while a quote is open or the line ends with a
backslash (so a multi-line `python -c "..."` is one command). The lines after
it, up to the next command or the end of the block, are the output the chapter
quotes. Each command runs here on the CPU, as printed, and every quoted line
must still appear in what it prints, in the order quoted, with runs of spaces
collapsed and long hex ids (request ids) left out; a line that is just `...`
marks a cut. Numbers must match: a run on the CPU is deterministic (greedy
tokens, shapes, block counts, probabilities). Only marked blocks are relaxed:
in a block marked `<!-- timings vary -->` each time and rate (a number before
s, ms, us, tok/s, tokens/s, GB/s or TFLOP/s) is replaced by a placeholder, and
in a block marked `<!-- numbers vary -->` (a benchmark, whose every figure
follows from timings) every number is.

Markers are HTML comments on the lines right before a block, one per line. A
block marked `<!-- gpu-only -->` is not run (it needs a GPU). A
block marked `<!-- server-only -->` starts with `nano-vllm serve ...`:
the server is started on a free port, the block's other commands (`curl`
against it) run, their output is compared the same way, and the server is
stopped; its numbers vary (the server's log lines and responses carry the
time). Any other command must be `nano-vllm ...` or `python ...`, so nothing
else hides in the docs unrun.

Links are checked too, in docs/ (with docs/reference/), README.md,
CHANGELOG.md and benchmarks/README.md: every relative link names a path that
exists inside the repository (a fresh clone has nothing beside it), every
backticked repository path (`nanovllm/ops/quant.py`, `tools/run-gpu.sh`) and
`python -m` module exists, and a link whose text is a backticked name
(`Scheduler.schedule`) names something defined in the linked file. A backticked
call such as `BlockManager.allocate_slots()` or
`nanovllm/engine/scheduler.py::schedule` must be defined in the package.
README.md's own commands are checked without running them: each
`nano-vllm ...` parses with the real command line (a real subcommand, flags it
accepts) and each `make ...` names a target of the Makefile.
"""
from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PACKAGE = ROOT / "nanovllm"
SERVER_MARKER = "<!-- server-only -->"
SKIP_MARKERS = ("<!-- gpu-only -->", SERVER_MARKER)
NUMBER = r"\d+(\.\d+)?(e[-+]?\d+)?"
VARYING = {   # marker -> the numbers it lets vary
    "<!-- numbers vary -->": re.compile(NUMBER),
    "<!-- timings vary -->": re.compile(NUMBER + r"(?=\s?(s|ms|us|µs|tok/s|tokens/s|GB/s|TFLOP/s)(\W|$))"),
}
MARKER = re.compile(r"^<!--.*-->$")
RUNNABLE = re.compile(r"^(\w+=\S+\s+)*(nano-vllm|python3?)\b")   # optional VAR=value prefixes
COMMAND_TIMEOUT_S = 300
PARALLEL_COMMANDS = 2        # two commands at a time (each with OMP_NUM_THREADS=1) on two cores


@dataclass
class QuotedCommand:
    doc: str                  # file name under docs/
    line: int                 # 1-based line of the `$ ` prompt
    block: int                # which fenced block of the file (0-based)
    command: str
    quoted_output: list[str] = field(default_factory=list)
    marker: str | None = None  # the gpu-only or server-only marker of its block, if any
    varying: re.Pattern[str] | None = None   # the numbers its block's marker lets vary (VARYING)

    @property
    def skipped(self) -> bool:
        """Not run by the per-command test (gpu-only; server-only blocks have their own test)."""
        return self.marker is not None

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def _is_complete(command: str) -> bool:
    if command.endswith("\\"):
        return False
    try:
        shlex.split(command)
    except ValueError:        # an open quote: the command goes on over the next line
        return False
    return True


def parse_commands(path: Path) -> list[QuotedCommand]:
    """The `$ ` commands of a markdown file's fenced blocks, each with the output lines quoted after it."""
    commands: list[QuotedCommand] = []
    lines = path.read_text().splitlines()
    in_block = False
    markers: list[str] = []              # the marker lines since the last prose line or block
    marker: str | None = None
    varying: re.Pattern[str] | None = None
    block = -1
    current: QuotedCommand | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            if in_block:
                in_block, current = False, None
            else:
                in_block, block = True, block + 1
                marker = next((m for m in markers if m in SKIP_MARKERS), None)
                varying = next((VARYING[m] for m in markers if m in VARYING), None)
                if marker == SERVER_MARKER:   # a server's log lines and responses carry the time
                    varying = VARYING["<!-- numbers vary -->"]
                markers = []
            i += 1
            continue
        if not in_block:
            if MARKER.match(line.strip()):
                markers.append(line.strip())
            elif line.strip():
                markers = []
            i += 1
            continue
        if line.startswith("$ "):
            start = i
            command = line[2:]
            while not _is_complete(command) and i + 1 < len(lines):
                i += 1
                command += "\n" + lines[i]
            current = QuotedCommand(_doc_name(path), start + 1, block, command.strip(), marker=marker,
                                    varying=varying)
            commands.append(current)
        elif current is not None and line.strip():
            current.quoted_output.append(line)
        i += 1
    return commands


def _doc_name(path: Path) -> str:
    """The file's path under docs/ (reference/x.md), or its name if it lies elsewhere."""
    return path.relative_to(DOCS).as_posix() if path.is_relative_to(DOCS) else path.name


def chapters() -> list[Path]:
    return sorted(DOCS.glob("0*.md"))


def all_docs() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def linked_files() -> list[Path]:
    """Every Markdown file a reader of the repository follows links in."""
    return all_docs() + [path for path in (ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "benchmarks" / "README.md")
                         if path.exists()]


def all_commands() -> list[QuotedCommand]:
    return [command for doc in all_docs() for command in parse_commands(doc)]


def normalize(line: str, varying: re.Pattern[str] | None = None) -> str:
    """Collapse whitespace, put H for every long hex id (request ids) and N for every number `varying` matches."""
    line = re.sub(r"[0-9a-f]{16,}", "H", line.strip())
    if varying is not None:
        line = varying.sub("N", line)
    return " ".join(line.split())


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")   # the venv's nano-vllm
    env.pop("NANO_VLLM_DEBUG", None)
    return env


def _run(command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", command], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=COMMAND_TIMEOUT_S)


def missing_lines(quoted: QuotedCommand, printed_text: str) -> list[str]:
    """The quoted output lines (but `...` cuts) that the printed text does not contain in the quoted order:
    each must come after the line the one before it matched."""
    printed = [normalize(line, quoted.varying) for line in printed_text.splitlines()]
    missing, position = [], 0
    for line in quoted.quoted_output:
        if line.strip() == "...":
            continue
        wanted = normalize(line, quoted.varying)
        if wanted in printed[position:]:
            position += printed[position:].index(wanted) + 1
        else:
            missing.append(line)
    return missing


@pytest.fixture(scope="module")
def command_outputs(request: pytest.FixtureRequest) -> dict[str, subprocess.CompletedProcess[str]]:
    """Run each distinct command of the selected tests once, two at a time, and keep what it printed."""
    selected = [item.callspec.params["quoted"] for item in request.session.items
                if hasattr(item, "callspec") and "quoted" in item.callspec.params]
    unique = list(dict.fromkeys(quoted.command for quoted in selected if RUNNABLE.match(quoted.command)))
    with ThreadPoolExecutor(PARALLEL_COMMANDS) as pool:
        return dict(zip(unique, pool.map(_run, unique)))


RUN_COMMANDS = [c for c in all_commands() if not c.skipped]


@pytest.mark.parametrize("quoted", RUN_COMMANDS, ids=[c.id for c in RUN_COMMANDS])
def test_quoted_command_runs_and_prints_what_the_doc_quotes(
        quoted: QuotedCommand, command_outputs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    assert RUNNABLE.match(quoted.command), (
        f"{quoted.id}: `{quoted.command.splitlines()[0]}` is neither nano-vllm nor python; "
        "run those only, or mark the block <!-- server-only --> / <!-- gpu-only -->")
    result = command_outputs[quoted.command]   # run by the fixture only when the check above holds
    assert result.returncode == 0, f"{quoted.id}: exit code {result.returncode}\n{result.stdout[-3000:]}"
    assert any(line.strip() != "..." for line in quoted.quoted_output), \
        f"{quoted.id}: the doc quotes no output for this command"
    missing = missing_lines(quoted, result.stdout)
    assert not missing, (f"{quoted.id}: quoted lines no longer printed:\n" + "\n".join(missing)
                         + "\n--- the command printed:\n" + result.stdout[-3000:])


def server_blocks() -> list[list[QuotedCommand]]:
    """The commands of each server-only block, in order."""
    blocks: dict[tuple[str, int], list[QuotedCommand]] = {}
    for command in all_commands():
        if command.marker == SERVER_MARKER:
            blocks.setdefault((command.doc, command.block), []).append(command)
    return list(blocks.values())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_healthy(server: subprocess.Popen, port: int, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.poll() is None, f"the server exited with code {server.returncode} before it was healthy"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"the server on port {port} was not healthy after {timeout_s} s")


SERVER_BLOCKS = server_blocks()


@pytest.mark.parametrize("block", SERVER_BLOCKS, ids=[block[0].id for block in SERVER_BLOCKS])
def test_quoted_server_answers_the_quoted_requests(block: list[QuotedCommand], tmp_path: Path) -> None:
    serve, *requests = block
    doc_port = re.search(r"--port (\d+)", serve.command)
    assert serve.command.startswith("nano-vllm serve ") and doc_port, \
        f"{serve.id}: a server-only block starts with `nano-vllm serve ... --port N`"
    assert requests, f"{serve.id}: the block sends the server no request"
    for request in requests:
        assert request.command.startswith("curl "), f"{request.id}: a server-only block sends requests with curl"
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    port = _free_port()

    def on_free_port(command: str) -> str:
        return re.sub(rf"(--port |:){doc_port.group(1)}\b", rf"\g<1>{port}", command)

    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(["bash", "-c", "exec " + on_free_port(serve.command)], cwd=ROOT, env=_env(),
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_until_healthy(server, port)
        for request in requests:
            result = _run(on_free_port(request.command))
            assert result.returncode == 0, f"{request.id}: exit code {result.returncode}\n{result.stdout[-3000:]}"
            missing = missing_lines(request, result.stdout)
            assert not missing, (f"{request.id}: quoted lines no longer printed:\n" + "\n".join(missing)
                                 + "\n--- the command printed:\n" + result.stdout[-3000:])
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    missing = missing_lines(serve, log_path.read_text())
    assert not missing, f"{serve.id}: the server's quoted lines no longer printed:\n" + "\n".join(missing)


def test_every_chapter_quotes_a_command_the_tests_run() -> None:
    assert chapters(), "no chapters in docs/"
    for chapter in chapters():
        runnable = [c for c in parse_commands(chapter) if not c.skipped]
        assert runnable, f"{chapter.name} quotes no command that this test runs"


def test_reading_path_links_every_chapter() -> None:
    readme = (DOCS / "README.md").read_text()
    for chapter in chapters():
        assert f"({chapter.name})" in readme, f"docs/README.md does not link {chapter.name}"


def test_parser_joins_a_multiline_command_and_skips_marked_blocks(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text('```console\n$ python -c "\nprint(1)\n"\n1\n```\n\n<!-- gpu-only -->\n'
                   '```console\n$ nano-vllm bench latency\nTTFT\n```\n')
    first, second = parse_commands(doc)
    assert (first.command, first.quoted_output, first.marker) == ('python -c "\nprint(1)\n"', ["1"], None)
    assert (second.command, second.quoted_output, second.marker) == ("nano-vllm bench latency", ["TTFT"],
                                                                     "<!-- gpu-only -->")


def test_markers_on_consecutive_lines_all_apply_and_prose_clears_them(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text("<!-- gpu-only -->\n<!-- numbers vary -->\n```console\n$ nano-vllm bench latency\nTTFT\n```\n\n"
                   "<!-- numbers vary -->\nSome prose.\n\n```console\n$ python x\n1\n```\n")
    marked, plain = parse_commands(doc)
    assert (marked.marker, marked.varying) == ("<!-- gpu-only -->", VARYING["<!-- numbers vary -->"])
    assert (plain.marker, plain.varying) == (None, None)


def test_normalize_keeps_numbers_unless_they_vary_and_ignores_spacing_and_ids() -> None:
    assert normalize("| # used   24 slots   2.3% |") == normalize("| # used 24 slots 2.3% |")
    assert normalize("| # used   24 slots   2.3% |") != normalize("| # used 1008 slots  98.4% |")
    numbers, timings = VARYING["<!-- numbers vary -->"], VARYING["<!-- timings vary -->"]
    assert normalize("decode 5.17 tok/s", numbers) == normalize("decode 9.9 tok/s", numbers)
    assert normalize("decode 5.17 tok/s", numbers) != normalize("prefill 5.17 tok/s", numbers)
    assert normalize("48 tokens in 1.36 s (8 steps) | 31.2 tok/s", timings) == \
        normalize("48 tokens in 2.47 s (8 steps) | 19.3 tok/s", timings)
    assert normalize("48 tokens in 1.36 s (8 steps)", timings) != normalize("48 tokens in 1.36 s (16 steps)", timings)
    assert normalize("peak KV 9.4% (6/64 blocks)", timings) != normalize("peak KV 100.0% (64/64 blocks)", timings)
    assert normalize('{"id":"cmpl-238afd521563450b953c093d462781a6"}') == normalize('{"id":"cmpl-9879f31fd91448da92b5b1d6e28b6926"}')


def test_quoted_lines_must_appear_in_their_order_with_their_numbers(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text("```console\n$ python x\ntop_k=2 [0.716, 0.284]\n...\ntop_p=0.8 [0.627]\n```\n\n"
                   "<!-- numbers vary -->\n```console\n$ python y\ndecode 5.17 tok/s\n```\n")
    exact, varying = parse_commands(doc)
    assert not missing_lines(exact, "top_k=2 [0.716, 0.284]\nmore\ntop_p=0.8 [0.627]\n")
    assert missing_lines(exact, "top_k=2 [0.716, 0.284]\ntop_p=0.8 [0.600]\n") == ["top_p=0.8 [0.627]"]
    assert missing_lines(exact, "top_p=0.8 [0.627]\ntop_k=2 [0.716, 0.284]\n") == ["top_p=0.8 [0.627]"]
    assert (exact.varying, varying.varying) == (None, VARYING["<!-- numbers vary -->"])
    assert not missing_lines(varying, "decode 6.02 tok/s\n")


# ---- links and names -------------------------------------------------------------------------

LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
NAME = re.compile(r"^`([A-Za-z_][\w.]*)`$")
CALL = re.compile(r"`([A-Za-z_][\w.]*)\(\)`")
PATH_NAME = re.compile(r"`([\w/.-]+\.py)::([A-Za-z_][\w.]*)`")
EXTERNAL = ("torch.", "tl.", "F.", "triton.", "np.", "asyncio.", "os.", "sys.")


def defines(source: str, name: str) -> bool:
    """True if `name` is a function, class, method, field or assignment in the source."""
    pattern = rf"^\s*(async\s+def|def|class)\s+{re.escape(name)}\b|^\s*{re.escape(name)}\s*[:=]"
    return re.search(pattern, source, re.MULTILINE) is not None


@functools.cache
def package_sources() -> str:
    return "\n".join(path.read_text() for path in sorted(PACKAGE.rglob("*.py")))


def _links(doc: Path) -> list[tuple[str, str]]:
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.DOTALL)   # code blocks hold no links
    return LINK.findall(text)


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@pytest.mark.parametrize("doc", linked_files(), ids=_name)
def test_relative_links_point_to_existing_paths_inside_the_repository(doc: Path) -> None:
    for text, target in _links(doc):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path = (doc.parent / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT), f"{_name(doc)}: [{text}]({target}) leads out of the repository"
        assert path.exists(), f"{_name(doc)}: [{text}]({target}) points to a missing path"


CITED_PATH = re.compile(r"(?<![\w/.~-])((?:nanovllm|tests|tools|benchmarks|docs)/[\w./-]*[\w/])")
CITED_MODULE = re.compile(r"python3? -m (nanovllm[\w.]*)")


def _backticked(doc: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.DOTALL)
    return re.findall(r"`([^`\n]+)`", text)


@pytest.mark.parametrize("doc", linked_files(), ids=_name)
def test_cited_repository_paths_and_modules_exist(doc: Path) -> None:
    text = doc.read_text()
    for span in _backticked(doc):
        for cited in CITED_PATH.findall(span):
            assert (ROOT / cited.split("::")[0]).exists(), f"{_name(doc)}: `{span}` cites {cited}, which does not exist"
    for module in CITED_MODULE.findall(text):
        parts = module.split(".")
        assert (ROOT.joinpath(*parts).with_suffix(".py").exists() or (ROOT.joinpath(*parts) / "__init__.py").exists()), \
            f"{_name(doc)}: `python -m {module}` names no module of the package"


def readme_commands() -> list[str]:
    """The `nano-vllm ...` and `make ...` commands README.md shows, in code blocks and inline."""
    text = (ROOT / "README.md").read_text()
    commands, in_block = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_block = not in_block
        elif in_block:
            commands.append(line.removeprefix("$ ").split("  #")[0].strip())
    commands += re.findall(r"`((?:nano-vllm|make)(?: [^`]*)?)`", re.sub(r"```.*?```", "", text, flags=re.DOTALL))
    return [command for command in dict.fromkeys(commands) if re.match(r"^(nano-vllm|make)\b", command)]


def check_command(command: str) -> None:
    """Raise AssertionError unless the command parses as a real `nano-vllm` subcommand or `make` target."""
    from nanovllm.cli import SUBCOMMANDS, build_parser

    program, *argv = shlex.split(command)
    if program == "make":
        targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.MULTILINE))
        missing = [arg for arg in argv if "=" not in arg and arg not in targets]
        assert not missing, f"`{command}`: no Makefile target {missing}"
        return
    assert argv and argv[0] in SUBCOMMANDS, f"`{command}`: no nano-vllm subcommand {argv[:1]}"
    if len(argv) == 1:   # the subcommand named, as in "`nano-vllm bench` measures ..."
        return
    parser, _ = build_parser(argv)
    try:
        parser.parse_args(argv)
    except SystemExit:
        raise AssertionError(f"`{command}` does not parse: a flag or value the command line does not accept") from None


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_names_a_real_subcommand_with_valid_flags(command: str) -> None:
    check_command(command)


@pytest.mark.parametrize("command", ["nano-vllm bench lateny", "nano-vllm run --demoo", "make tests",
                                     "nano-vllm runn -i x", "nano-vllm bench report --chek"])
def test_the_command_check_refuses_a_misspelt_command(command: str, capsys) -> None:
    with pytest.raises(AssertionError):
        check_command(command)


@pytest.mark.parametrize("doc", linked_files(), ids=_name)
def test_linked_names_are_defined_in_the_linked_file(doc: Path) -> None:
    for text, target in _links(doc):
        name = NAME.match(text)
        if name is None or not target.split("#")[0].endswith(".py") or re.match(r"^[a-z]+:", target):
            continue
        source = (doc.parent / target.split("#")[0]).read_text()
        for part in name.group(1).split("."):
            assert defines(source, part), f"{doc.name}: `{part}` (in [{text}]) is not defined in {target}"


@pytest.mark.parametrize("doc", all_docs(), ids=lambda p: p.name)
def test_backticked_calls_name_code_that_exists(doc: Path) -> None:
    text = doc.read_text()
    for path, name in PATH_NAME.findall(text):
        source = (ROOT / path).read_text()
        for part in name.split("."):
            assert defines(source, part), f"{doc.name}: `{part}` is not defined in {path}"
    for call in CALL.findall(text):
        if call.startswith(EXTERNAL):
            continue
        for part in call.split("."):
            assert defines(package_sources(), part), f"{doc.name}: `{call}()` names `{part}`, defined nowhere in nanovllm/"
