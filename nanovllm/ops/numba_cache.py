"""The compiled CPU kernels' disk cache, made anew whenever any kernel source changes.

numba's `cache=True` stamps a function's cache with the time and size of the file that defines it, and
nothing else. Our kernels compile functions of other files into themselves: `llama_numba._forward_rank`
inlines `quant_numba._tile` and `attention_numba._attend_into`. After an edit of quant_numba.py alone
(or an update that rewrites it), the cached forward would still run the old tile. So `kernel(...)`,
numba's `njit(cache=True, ...)`, puts the cache in a folder named by a digest of every kernel source
file (`KERNEL_SOURCES`): a change to any of them starts an empty folder, and the first call compiles.
The folders sit under numba's own cache folder where one is set ($NUMBA_CACHE_DIR), else under
nano-vllm's (`config.cache_dir()`), at a few MB each (up to about 30). Under nano-vllm's, each process
that uses one touches it, and removes the others that no process has used for `STALE_DAYS` days: the
caches of older versions and of edits since undone.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import time
from pathlib import Path

import numba

from nanovllm.config import cache_dir

PACKAGE = Path(__file__).resolve().parent.parent
KERNEL_SOURCES = ("ops/numba_cache.py", "ops/numba_ir.py", "ops/attention_numba.py", "ops/quant_numba.py",
                  "ops/sampling_numba.py", "model/llama_numba.py")
STALE_DAYS = 30
DIGEST_NAME = re.compile(r"[0-9a-f]{16}")


def sources_digest(root: Path = PACKAGE, names: tuple[str, ...] = KERNEL_SOURCES) -> str:
    """The first 16 hex digits of sha256 over the kernel sources under root, name and bytes."""
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode() + b"\0" + (root / name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@functools.cache
def kernel_cache_dir() -> str:
    """Where this tree's kernels are cached: <$NUMBA_CACHE_DIR or cache_dir()/numba>/<sources_digest()>.
    Under cache_dir(), the folder is marked used now and stale siblings go (`prune_stale`)."""
    if numba.config.CACHE_DIR:
        return str(Path(numba.config.CACHE_DIR) / sources_digest())
    folder = cache_dir() / "numba" / sources_digest()
    prune_stale(folder)
    return str(folder)


def prune_stale(folder: Path, max_age_s: float = STALE_DAYS * 86400.0) -> None:
    """Make `folder` (created if need be) and set its time to now; remove each sibling named like a digest
    whose time is older than max_age_s. A process that still uses a removed folder recompiles what it
    has not loaded yet. Failures are ignored: the cache is an optimization."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.utime(folder)
        deadline = time.time() - max_age_s
        for sibling in folder.parent.iterdir():
            if (DIGEST_NAME.fullmatch(sibling.name) and sibling.is_dir()
                    and sibling.stat().st_mtime < deadline):
                shutil.rmtree(sibling, ignore_errors=True)
    except OSError:
        pass


def kernel(**options):
    """`numba.njit(cache=True, error_model="numpy", **options)`, cached in `kernel_cache_dir()`.

    numba picks a function's cache folder when it is decorated, from `numba.config.CACHE_DIR`, which is
    set for that moment only. The numpy error model lets a float division by zero give inf or nan, as
    numpy does; numba's default (Python's) tests every divisor to raise ZeroDivisionError, and that
    branch keeps LLVM from vectorizing the loop (SiLU's `gate / (1 + exp(-gate))` ran one value at a time)."""
    def compile_cached(function):
        previous = numba.config.CACHE_DIR
        numba.config.CACHE_DIR = kernel_cache_dir()
        try:
            return numba.njit(cache=True, **{"error_model": "numpy", **options})(function)
        finally:
            numba.config.CACHE_DIR = previous
    return compile_cached
