"""Files peft-isaerft keeps or writes: the cache folder (``$XDG_CACHE_HOME/peft_isaerft``, default ``~/.cache``) and
output folders written in full or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """The package's cache folder, or a sub-folder of it (not created here)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root, "peft_isaerft", *parts)


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Write a folder in full or not at all.

    Yields an empty staging folder beside ``final``; when the block finishes it replaces ``final`` (two renames on
    one file system), and when the block fails or the process is interrupted ``final`` keeps its previous contents and
    no half-written folder takes its place. Leftovers of a killed run are cleared by the next one.

    Example:
        >>> with atomic_directory("audit") as staging:  # doctest: +SKIP
        ...     (staging / "report.json").write_text("[]")
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _recover(final)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = final.parent / f".{final.name}.previous"
    if final.exists():
        final.rename(previous)
    staging.rename(final)
    shutil.rmtree(previous, ignore_errors=True)


def _recover(final: Path) -> None:
    """Undo what a run killed mid-way left: restore a moved-away previous folder, drop stale staging folders."""
    previous = final.parent / f".{final.name}.previous"
    if previous.exists():
        if final.exists():
            shutil.rmtree(previous, ignore_errors=True)
        else:
            previous.rename(final)
    for stale in final.parent.glob(f".{final.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
