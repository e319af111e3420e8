"""Where peft-isaerft keeps files between runs: ``$XDG_CACHE_HOME/peft_isaerft`` (default ``~/.cache``)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """The package's cache folder, or a sub-folder of it (not created here)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root, "peft_isaerft", *parts)
