"""The compiled CPU kernels' cache is named by every kernel source, so an edit to one file cannot leave
another file's cached kernel running the old code it inlined."""
from __future__ import annotations

import re
import shutil

import pytest

numba = pytest.importorskip("numba")

from nanovllm.ops import numba_cache  # noqa: E402
from nanovllm.ops.numba_cache import KERNEL_SOURCES, PACKAGE, kernel_cache_dir, sources_digest  # noqa: E402


def test_a_change_to_any_kernel_source_changes_the_cache_folder(tmp_path):
    for name in KERNEL_SOURCES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(PACKAGE / name, tmp_path / name)
    before = sources_digest(tmp_path)
    assert before == sources_digest()
    for name in KERNEL_SOURCES:
        text = (tmp_path / name).read_text()
        (tmp_path / name).write_text(text + "\n")
        assert sources_digest(tmp_path) != before, name
        (tmp_path / name).write_text(text)
    assert sources_digest(tmp_path) == before


def test_every_cached_kernel_is_compiled_through_kernel_and_its_file_is_digested():
    uses = {str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
            if re.search(r"^@kernel\(", path.read_text(), re.MULTILINE)}
    assert uses and uses <= set(KERNEL_SOURCES)
    for path in PACKAGE.rglob("*.py"):
        if path != PACKAGE / "ops" / "numba_cache.py":
            assert "cache=True" not in path.read_text(), f"{path.name}: cache through numba_cache.kernel"


def test_kernels_are_cached_in_the_digested_folder_and_numbas_setting_is_left_alone():
    from nanovllm.model import llama_numba
    from nanovllm.ops import quant_numba
    for function in (quant_numba._tile, llama_numba._forward_rank):
        assert function._cache._cache_path.startswith(kernel_cache_dir())
    assert kernel_cache_dir().endswith(sources_digest())
    before = numba.config.CACHE_DIR
    numba_cache.kernel(boundscheck=False)(lambda x: x + 1)
    assert numba.config.CACHE_DIR == before != kernel_cache_dir()    # other numba users keep their cache


def test_the_folder_in_use_is_touched_and_digest_folders_unused_for_30_days_are_removed(tmp_path):
    day = 86400.0
    now = numba_cache.time.time()
    folders = {name: tmp_path / name for name in ("0123456789abcdef", "fedcba9876543210", "00000000000000aa",
                                                     "not-a-digest", "0123456789abcdeg")}
    for name, folder in folders.items():
        folder.mkdir()
        (folder / "index").write_bytes(b"x")
        old = now - 31 * day if name != "00000000000000aa" else now - 29 * day
        numba_cache.os.utime(folder, (old, old))
    (tmp_path / "ffffffffffffffff").write_bytes(b"a file, not a folder")
    numba_cache.os.utime(tmp_path / "ffffffffffffffff", (now - 40 * day, now - 40 * day))
    in_use = folders["0123456789abcdef"]
    numba_cache.prune_stale(in_use)
    left = {path.name for path in tmp_path.iterdir()}
    assert left == {"0123456789abcdef", "00000000000000aa", "not-a-digest", "0123456789abcdeg", "ffffffffffffffff"}
    assert in_use.stat().st_mtime > now - day and (in_use / "index").exists()
    numba_cache.prune_stale(tmp_path / "1111111111111111")    # a new folder is made
    assert (tmp_path / "1111111111111111").is_dir()
