"""The repository stands on its own: no file names a path of the machine it was written on, and the
words are the product's (what it is and does), not notes about how or where it was made."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIPPED_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis", "build", "dist", ".baseline",
                ".mutmut-cache", "mutants"}

# An absolute path on some machine: one under the roots work, tmp, root, home or Users (but not a URL
# path such as http://host/v1/tmp, nor ~/.cache).
MACHINE_PATH = re.compile(r"(?<![\w.~:/$-])/(work|tmp|root|home|Users)/")
# How the project was made rather than what it is: work sittings, machine loans, tracker numbers,
# versions of notes, the people and tools around it. (This file is checked too: its patterns and
# examples are spelled so that they do not match themselves, e.g. ses{2}ion.)
MAKING_WORDS = re.compile(
    r"""(?<![."=])(?<!per\ )\bses{2}ions?\b(?![."])   # a numbered or "this" sitting (not pytest's scope)
      | \blea(?:se|ses|sed)\b
      | \bdevice[ -](machine|tool)s?\b | \bnvidia-[ahb]\d+-x\d\b   # the lending machines and their kinds
      | \bissues?\ \#?\d+
      | \bthe\ lead\b | \blead's\b | \bhelpers'?\ test
      | (?-i:\bNOTES\b) | \(v\d\) | \bv\d\ to\ v\d\b""",
    re.IGNORECASE | re.VERBOSE)


def repository_files() -> list[Path]:
    """The files a clone holds: git's list (committed, or new and not ignored), else a walk of the tree."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.splitlines()
        return [ROOT / name for name in listed if (ROOT / name).is_file()]
    except (OSError, subprocess.CalledProcessError):
        return [path for path in ROOT.rglob("*")
                if path.is_file() and not SKIPPED_DIRS.intersection(path.relative_to(ROOT).parts)]


def text_of(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None   # a binary file


def findings(pattern: re.Pattern[str]) -> list[str]:
    found = []
    for path in repository_files():
        for number, line in enumerate((text_of(path) or "").splitlines(), start=1):
            match = pattern.search(line)
            if match:
                found.append(f"{path.relative_to(ROOT)}:{number}: {match.group(0)!r} in {line.strip()[:120]}")
    return found


def test_no_file_names_an_absolute_path_of_a_machine():
    found = findings(MACHINE_PATH)
    assert not found, "machine paths (write a relative path, or one under $TMPDIR / ~):\n" + "\n".join(found)


def test_the_words_are_the_products():
    found = findings(MAKING_WORDS)
    assert not found, "words about how the project was made, not what it is:\n" + "\n".join(found)


# The examples are written in two pieces, so that this file does not carry the words it looks for.
@pytest.mark.parametrize("line, flagged", [
    ("the figures of ses" "sion 6", True),
    ("results of this GPU ses" "sion", True),
    ("Run on the device " "machine: `pytest`", True),
    ("on an nvidia-h200" "-x2 machine", True),
    ("one lea" "se to the next", True),
    ("see iss" "ue 23", True),
    ("NO" "TES v8 item 5", True),
    ("a decode step (v" "8)", True),
    ("@pytest.fixture(scope=\"ses" "sion\")", False),
    ("request.ses" "sion.items", False),
    ("a model directory (cached per ses" "sion)", False),
    ("vLLM v1's scheduler", False),
    ("v1, v2 = tl.load(a), tl.load(b)", False),
])
def test_the_word_check_flags_notes_and_spares_code(line, flagged):
    assert bool(MAKING_WORDS.search(line)) == flagged


@pytest.mark.parametrize("line, flagged", [
    ("files under /wo" "rk/main/.venv", True),
    ("cd /tm" "p/x && run", True),
    ("/ro" "ot/out/r.json", True),
    ("http://127.0.0.1:8000/v1/completions", False),
    ("~/.cache/nano-vllm/", False),
    ("$OUT/tm" "p/x", False),
])
def test_the_path_check_flags_machine_paths_only(line, flagged):
    assert bool(MACHINE_PATH.search(line)) == flagged
