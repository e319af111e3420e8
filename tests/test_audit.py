"""`isaerft audit` end to end, and a small version of the planted-feature recovery benchmark."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import make_model, make_tokenizer

from peft_isaerft.audit import parse_sae_argument, read_rows
from peft_isaerft.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_audit_cli_writes_adapter_and_reports(sae_factory, tmp_path, capsys) -> None:
    model_dir = tmp_path / "model"
    make_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "data.jsonl"
    rows = [{"text": "the sea is calm tonight."}, {"prompt": "where is the boat? ", "completion": "on the sea."}] * 8
    data.write_text("\n".join(json.dumps(r) for r in rows))
    sae = sae_factory(hook="blocks.1.hook_resid_post")
    code = main(
        [
            "audit",
            "--model",
            str(model_dir),
            "--sae",
            str(sae),
            "--data",
            str(data),
            "--output",
            str(tmp_path / "out"),
            "--steps",
            "5",
            "--top-k",
            "4",
        ]
    )
    assert code == 0
    out = tmp_path / "out"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    report = json.loads((out / "report.json").read_text())
    assert 0 < len(report) <= 4 and report[0]["effect"] >= report[-1]["effect"]
    assert (out / "report.html").read_text().startswith("<!doctype html>")
    assert "blocks.1.hook_resid_post" in capsys.readouterr().out


def test_audit_inputs_are_validated(tmp_path) -> None:
    assert parse_sae_argument("gemma-scope-2b-pt-res-canonical/layer_20/width_16k/canonical") == {
        "release": "gemma-scope-2b-pt-res-canonical",
        "sae_id": "layer_20/width_16k/canonical",
    }
    assert parse_sae_argument(str(tmp_path)) == {"path": str(tmp_path)}
    with pytest.raises(ValueError, match="RELEASE/SAE_ID"):
        parse_sae_argument("not-a-folder")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "only a prompt"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1 needs a 'text' field"):
        read_rows(bad)


def test_small_recovery_benchmark_finds_planted_features(tmp_path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import recovery

    result = recovery.main(["--quick", "--output", str(tmp_path / "recovery.json")])
    for row in result["table"]:
        # the audit names at least 2 of the 3 planted latents, and beats both data-only baselines
        assert row["audit"] >= 2 / 3, row
        assert row["audit"] >= row["dataset_diffing"] and row["audit"] >= row["lora_projection"], row
