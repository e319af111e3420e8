"""Nothing silently wrong: SAE fingerprints, non-finite guards, and a command line that answers bad input with a
message instead of a traceback (driven through the real `isaerft` entry point)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import make_model, make_sae
from peft import LoraConfig, PeftModel, get_peft_model
from sae_lens import SAE

from peft_isaerft import ISaeRFTConfig, feature_report
from peft_isaerft.guards import NonFiniteAdapterError
from peft_isaerft.saes import clear_sae_cache, sae_fingerprint


@pytest.fixture
def adapter(sae_factory, tmp_path):
    """An adapter that references its SAE by path (not bundled), as adapters saved with bundle_saes=False do."""
    sae_folder = sae_factory(hook="blocks.1.hook_resid_post")
    model = get_peft_model(make_model("llama"), ISaeRFTConfig(saes=[{"path": str(sae_folder)}], init_weights=False,
                                                              bundle_saes=False))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", sae_folder


def _replace_sae(sae_folder, seed: int = 7) -> None:
    """Another SAE of the same width in the same folder, as a retrained or re-downloaded cache would be."""
    shutil.rmtree(sae_folder)
    make_sae(sae_folder, hook="blocks.1.hook_resid_post", seed=seed)
    clear_sae_cache()


def test_saved_adapter_records_a_fingerprint_per_sae(adapter) -> None:
    folder, sae_folder = adapter
    recorded = json.loads((folder / "adapter_config.json").read_text())["sae_fingerprints"]
    assert len(recorded) == 1 and recorded[0]["d_sae"] == 128 and recorded[0]["architecture"] == "standard"
    assert set(recorded[0]["digests"]) == {"W_enc", "W_dec", "b_enc"} and recorded[0]["sae_lens"]
    assert recorded[0]["digests"] == sae_fingerprint(SAE.load_from_disk(str(sae_folder)))["digests"]


def test_fingerprint_ignores_layout_and_run_dtype_but_not_values(sae_factory) -> None:
    sae = SAE.load_from_disk(str(sae_factory()))
    before = sae_fingerprint(sae)
    sae.W_enc.data = sae.W_enc.data.T.contiguous().T  # the splice's row-per-latent layout
    assert sae_fingerprint(sae) == before
    with torch.no_grad():
        sae.W_dec[3, 0] += 1.0  # one value, at a sampled position (all are, at this size)
    assert sae_fingerprint(sae)["digests"]["W_dec"] != before["digests"]["W_dec"]


def test_loading_over_a_replaced_sae_is_an_error_naming_it(adapter) -> None:
    folder, sae_folder = adapter
    _replace_sae(sae_folder)
    expected = r"is not the SAE this adapter was trained with: W_dec has other values; W_enc has other values"
    with pytest.raises(ValueError, match=expected) as err:
        PeftModel.from_pretrained(make_model("llama"), folder)
    assert str(sae_folder) in str(err.value) and "blocks.1.hook_resid_post" in str(err.value)
    with pytest.raises(ValueError, match="not the SAE this adapter was trained with"):
        feature_report(folder)
    # the explicit opt-out loads it, and still says what differs
    model = PeftModel.from_pretrained(make_model("llama"), folder, verify_sae_fingerprints=False)
    assert model.peft_config["default"].sae_fingerprints[0]["digests"]  # the record of the original is kept
    assert feature_report(folder, verify_sae_fingerprints=False)


def test_a_bundled_sae_that_was_tampered_with_is_refused_too(sae_factory, tmp_path) -> None:
    sae_folder = sae_factory(hook="blocks.1.hook_resid_post")
    model = get_peft_model(make_model("llama"), ISaeRFTConfig(saes=[{"path": str(sae_folder)}], init_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    _replace_sae(sae_folder)  # the original changes: the bundled copy does not, so the adapter still loads
    PeftModel.from_pretrained(make_model("llama"), tmp_path / "adapter")
    bundled = tmp_path / "adapter" / "sae_0"
    _replace_sae(bundled)
    with pytest.raises(ValueError, match="not the SAE this adapter was trained with"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path / "adapter")


def test_an_adapter_saved_before_fingerprints_loads_with_one_warning(adapter, caplog) -> None:
    folder, _ = adapter
    config = json.loads((folder / "adapter_config.json").read_text())
    del config["sae_fingerprints"], config["verify_sae_fingerprints"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING):
        PeftModel.from_pretrained(make_model("llama"), folder)
    assert sum("without an SAE fingerprint" in r.message for r in caplog.records) == 1


def test_bad_fingerprint_records_are_refused(sae_factory) -> None:
    with pytest.raises(ValueError, match="sae_fingerprints must list one fingerprint"):
        ISaeRFTConfig(saes=[{"path": str(sae_factory())}], sae_fingerprints=[{}, {}])


def _nan_after(model, steps: int = 3):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 60, (2, 12))
    for step in range(1, steps + 1):
        loss = model(input_ids=ids, labels=ids).loss
        if step == steps:
            loss = loss * float("nan")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_a_step_that_makes_an_adapter_non_finite_stops_training_and_names_it(sae_factory) -> None:
    folder = sae_factory(hook="blocks.1.hook_resid_post")
    model = get_peft_model(make_model("llama"), ISaeRFTConfig(saes=[{"path": str(folder)}]))
    with pytest.raises(NonFiniteAdapterError, match=r"adapter 'default' at blocks\.1\.hook_resid_post.*step 3"):
        _nan_after(model)


def test_the_trainer_stops_at_the_step_too(sae_factory, tmp_path) -> None:
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    class NanAtStepTwo(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return loss * float("nan") if self.state.global_step == 1 else loss

    folder = sae_factory(hook="blocks.1.hook_resid_post")
    model = get_peft_model(make_model("llama"), ISaeRFTConfig(saes=[{"path": str(folder)}]))
    ids = torch.randint(3, 60, (8, 12)).tolist()
    args = TrainingArguments(str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True, max_grad_norm=0.0)
    trainer = NanAtStepTwo(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}))
    with pytest.raises(NonFiniteAdapterError, match="after optimizer step 2"):
        trainer.train()


def test_non_finite_adapters_are_not_saved_unless_forced_and_reports_flag_them(sae_factory, tmp_path) -> None:
    folder = sae_factory(hook="blocks.1.hook_resid_post")
    model = get_peft_model(make_model("llama"), ISaeRFTConfig(saes=[{"path": str(folder)}], init_weights=False))
    with torch.no_grad():
        model.base_model.model.model.layers[1].isaerft_scale["default"][5] = float("nan")
    with pytest.raises(NonFiniteAdapterError, match=r"isaerft_scale: 1 of 128 values"):
        model.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    model.save_pretrained(tmp_path / "adapter", allow_non_finite=True)
    records = feature_report(tmp_path / "adapter", top_k=3)
    assert records[0].latent == 5 and records[0].label.startswith("NON-FINITE")
    result = _isaerft("report", str(tmp_path / "adapter"))
    assert result.returncode == 1 and "non-finite" in result.stderr


def _isaerft(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peft_isaerft.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _cli_cases(tmp_path, sae_factory) -> dict[str, tuple[list[str], str]]:
    sae_folder = sae_factory(hook="blocks.1.hook_resid_post")
    model_folder = tmp_path / "model"
    make_model("llama").save_pretrained(model_folder)
    lora = tmp_path / "lora"
    get_peft_model(make_model("llama"), LoraConfig(target_modules=["q_proj"])).save_pretrained(lora)
    adapter = tmp_path / "adapter"
    get_peft_model(make_model("llama"), ISaeRFTConfig(saes=[{"path": str(sae_folder)}])).save_pretrained(adapter)
    truncated = tmp_path / "truncated"
    shutil.copytree(adapter, truncated)
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    corrupt_sae = tmp_path / "corrupt_sae"
    shutil.copytree(sae_folder, corrupt_sae)
    (corrupt_sae / "cfg.json").write_text("{not json")
    corrupt_adapter = tmp_path / "corrupt_adapter"
    shutil.copytree(adapter, corrupt_adapter)
    config = json.loads((corrupt_adapter / "adapter_config.json").read_text())
    config["saes"][0]["path"] = str(corrupt_sae)
    (corrupt_adapter / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "empty").mkdir()
    (tmp_path / "malformed.jsonl").write_text('{"text": "fine"}\n{not json}\n')
    (tmp_path / "fields.jsonl").write_text('{"question": "no text here"}\n')
    (tmp_path / "blank.jsonl").write_text("\n")
    common = ["audit", "--model", str(model_folder), "--sae", str(sae_folder), "--output", str(tmp_path / "out")]
    audit = [*common, "--steps", "1", "--data"]
    return {
        "report on an empty folder": (["report", str(tmp_path / "empty")], "not an adapter folder"),
        "report on a LoRA adapter": (["report", str(lora)], "not an ISaeRFT adapter"),
        "report on a truncated weights file": (["report", str(truncated)], "corrupt or truncated"),
        "report over an SAE with a corrupt cfg.json": (["report", str(corrupt_adapter)], "cfg.json"),
        "audit on a malformed line": ([*audit, str(tmp_path / "malformed.jsonl")], "malformed.jsonl:2 is not JSON"),
        "audit on rows without text": ([*audit, str(tmp_path / "fields.jsonl")], "needs a 'text' field"),
        "audit on an empty file": ([*audit, str(tmp_path / "blank.jsonl")], "holds no rows"),
        "audit on a missing file": ([*audit, str(tmp_path / "missing.jsonl")], "missing.jsonl"),
        "report --top-k -3": (["report", str(adapter), "--top-k", "-3"], "must be 1 or more"),
        "audit --steps 0": ([*common, "--steps", "0", "--data", "x.jsonl"], "must be 1 or more"),
        "audit --l1 1.5": ([*audit, "x.jsonl", "--l1", "1.5"], "must be a fraction in [0, 1)"),
        "diff --top-k abc": (["diff", str(adapter), str(adapter), "--top-k", "abc"], "expected a whole number"),
    }


def test_every_expected_cli_failure_is_a_short_message_without_traceback(tmp_path, sae_factory) -> None:
    for case, (args, expected) in _cli_cases(tmp_path, sae_factory).items():
        result = _isaerft(*args)
        assert result.returncode != 0, case
        assert "Traceback" not in result.stderr, f"{case}: {result.stderr[-2000:]}"
        assert expected in result.stderr, f"{case}: {result.stderr[-2000:]}"
        assert len([line for line in result.stderr.splitlines() if line.strip()]) <= 2, f"{case}: {result.stderr}"
    verbose = _isaerft("--verbose", "report", str(tmp_path / "empty"))
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr


def test_no_network_for_neuronpedia_and_a_missing_package_are_messages(adapter, monkeypatch, capsys) -> None:
    import urllib.error

    import peft_isaerft.interpret.labels as labels
    from peft_isaerft.cli import main

    folder, _ = adapter

    def offline(*_args, **_kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(labels, "fetch_neuronpedia_labels", offline)
    assert main(["report", str(folder), "--labels", "neuronpedia"]) == 1
    error = capsys.readouterr().err
    assert "name resolution" in error and "Traceback" not in error

    def missing(*_args, **_kwargs):
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")

    import peft_isaerft.interpret as interpret

    monkeypatch.setattr(interpret, "render", missing)
    assert main(["report", str(folder), "--format", "html"]) == 1
    assert "pip install matplotlib" in capsys.readouterr().err
