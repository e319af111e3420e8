"""The examples/ scripts (SFT, DPO, GRPO with an ISaeRFT adapter, unlearning with a clamp, then `isaerft report`) run
as shipped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("script", ["sft.py", "dpo.py", "grpo.py", "unlearn.py"])
def test_example_trains_and_reports(script, tmp_path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(EXAMPLES / script), "--output", str(tmp_path), "--steps", "2"],
                            cwd=EXAMPLES, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert "blocks.1.hook_resid_post" in result.stdout  # the report table
