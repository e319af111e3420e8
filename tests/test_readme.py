"""The README's quickstart runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs_as_written(capsys) -> None:
    text = README.read_text()
    section = text[text.index("## Quickstart") :]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    namespace: dict = {}
    exec(compile(code, "README quickstart", "exec"), namespace)
    out = capsys.readouterr().out
    assert "trainable params: 1,024" in out
    assert "latent" in out and "hook" in out  # the rendered report table
    assert type(namespace["reloaded"]).__name__.startswith("PeftModel")
