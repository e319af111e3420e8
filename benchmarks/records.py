"""How every benchmark writes its results: one JSON file, written whole or not at all."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: Path, result: dict[str, Any]) -> None:
    """Write ``result`` as indented JSON to ``path``, making its folder. The file is written whole or not at all: a run
    cut while writing leaves the previous file, which the documentation's tables may still be read from.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> write_json(folder / "results" / "run.json", {"seconds": 1.5})
        >>> json.loads((folder / "results" / "run.json").read_text())
        {'seconds': 1.5}
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(result, indent=1))
    partial.replace(path)
