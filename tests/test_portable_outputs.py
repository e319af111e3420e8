"""Adapters that travel (bundled SAEs, by folder and by Hub repository id), output folders written in full or not at
all (a killed audit leaves the previous output intact; a corrupt cached demo SAE is retrained), and PEFT's
low_cpu_mem_usage behaviour."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from conftest import make_model, make_tokenizer
from peft import PeftModel, get_peft_model

from peft_isaerft import ISaeRFTConfig
from peft_isaerft.cache import atomic_directory
from peft_isaerft.saes import clear_sae_cache
from peft_isaerft.sparsity import l1_coefficient


def _saved(sae_factory, tmp_path, **options):
    sae_folder = sae_factory(hook="blocks.1.hook_resid_post")
    model = get_peft_model(make_model("llama"), ISaeRFTConfig(saes=[{"path": str(sae_folder)}], init_weights=False,
                                                              component="scale_bias", **options))
    model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        expected = model(ids).logits
    return sae_folder, tmp_path / "adapter", ids, expected


def test_local_sae_is_bundled_and_the_adapter_loads_without_the_original(sae_factory, tmp_path) -> None:
    sae_folder, adapter, ids, expected = _saved(sae_factory, tmp_path)
    entry = json.loads((adapter / "adapter_config.json").read_text())["saes"][0]
    assert entry["path"] == "sae_0" and entry["bundled"] == ["cfg.json", "sae_weights.safetensors"]
    assert (adapter / "sae_0" / "sae_weights.safetensors").is_file()
    shutil.rmtree(sae_folder)  # another machine: the original folder is not there
    clear_sae_cache()
    moved = tmp_path / "elsewhere"
    shutil.move(str(adapter), moved)
    loaded = PeftModel.from_pretrained(make_model("llama"), str(moved))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected)
    assert loaded.peft_config["default"].saes[0]["path"] == str((moved / "sae_0").resolve())


def test_bundle_saes_false_keeps_the_path_and_a_push_warns(sae_factory, tmp_path, monkeypatch, caplog) -> None:
    import transformers.utils.hub as hub

    sae_folder, adapter, _, _ = _saved(sae_factory, tmp_path, bundle_saes=False)
    assert json.loads((adapter / "adapter_config.json").read_text())["saes"][0]["path"] == str(sae_folder)
    assert not (adapter / "sae_0").exists()
    uploaded: list[str] = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return SimpleNamespace(repo_id=repo_id)

        def create_commit(self, repo_id, operations, **kwargs):
            uploaded.extend(op.path_in_repo for op in operations)
            return SimpleNamespace(commit_url="local")

    monkeypatch.setattr(hub, "hf_api", lambda: FakeApi())
    model = PeftModel.from_pretrained(make_model("llama"), str(adapter))
    with caplog.at_level(logging.WARNING):
        model.push_to_hub("user/local-only")
    assert "references SAE folder(s) on this machine only" in caplog.text and str(sae_folder) in caplog.text
    assert not any(path.startswith("sae_") for path in uploaded)


def test_bundled_adapter_loads_by_repo_id_from_a_hub_cache(sae_factory, tmp_path) -> None:
    base_dir = tmp_path / "base"
    make_model("llama").save_pretrained(base_dir)
    sae_folder, adapter, ids, expected = _saved(sae_factory, tmp_path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base_dir)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    torch.save(expected, tmp_path / "expected.pt")
    shutil.rmtree(sae_folder)
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--user--bundled"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(adapter, repo / "snapshots" / commit)
    script = textwrap.dedent(f"""
        import torch, peft_isaerft
        from peft import AutoPeftModelForCausalLM
        model = AutoPeftModelForCausalLM.from_pretrained("user/bundled")
        with torch.no_grad():
            got = model(torch.tensor({ids.tolist()})).logits
        torch.testing.assert_close(got, torch.load({str(tmp_path / "expected.pt")!r}))
        print("OK", model.peft_config["default"].saes[0]["path"])
    """)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().startswith("OK") and str(cache) in result.stdout


def test_atomic_directory_keeps_the_previous_folder_when_the_block_fails(tmp_path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("previous run")
    with pytest.raises(RuntimeError), atomic_directory(final) as staging:
        (staging / "half.txt").write_text("half")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (final / "old.txt").is_file()
    with atomic_directory(final) as staging:
        (staging / "new.txt").write_text("done")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_killed_audit_leaves_the_previous_output_and_the_next_run_succeeds(sae_factory, tmp_path) -> None:
    model_dir = tmp_path / "model"
    make_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": "the sea is calm tonight."}) for _ in range(8)))
    sae = sae_factory(hook="blocks.1.hook_resid_post")
    out = tmp_path / "audit"
    out.mkdir()
    (out / "report.json").write_text('["the previous audit"]')
    args = ["audit", "--model", str(model_dir), "--sae", str(sae), "--data", str(data), "--output", str(out),
            "--steps", "3"]
    # killed (SIGKILL, no clean-up) after the adapter is written and before the report is
    script = textwrap.dedent(f"""
        import os, signal, sys
        import peft_isaerft.audit as audit
        audit.feature_report = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        from peft_isaerft.cli import main
        sys.exit(main({args!r}))
    """)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert killed.returncode == -9
    assert json.loads((out / "report.json").read_text()) == ["the previous audit"]
    assert not (out / "adapter").exists()
    assert list(tmp_path.glob(".audit.partial-*"))  # what the killed run left, out of the way
    rerun = subprocess.run([sys.executable, "-m", "peft_isaerft.cli", *args], capture_output=True, text=True,
                           timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads((out / "report.json").read_text()) != ["the previous audit"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(tmp_path.glob(".audit.*"))


def test_a_corrupt_cached_demo_sae_is_retrained_not_loaded(tmp_path, caplog) -> None:
    from peft_isaerft.demo.sae_training import train_or_load_demo_sae

    model, tokenizer = make_model("llama"), make_tokenizer()
    texts = ["the quick brown fox jumps over the lazy dog. " * 4] * 40
    cache = tmp_path / "cache" / "sae"

    def run():
        return train_or_load_demo_sae(model, tokenizer, texts, "blocks.1.hook_resid_post", cache, d_sae=64, k=4,
                                      n_tokens=600, epochs=1)

    folder, _ = run()
    weights = folder / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated, as a killed copy would be
    with caplog.at_level(logging.WARNING):
        folder, again = run()
    assert "incomplete or corrupt" in caplog.text
    from sae_lens import SAE

    assert SAE.load_from_disk(str(folder)).cfg.d_sae == 64 and again.l0 > 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="peft_isaerft.demo.sae_training"):
        run()
    assert "Using the cached SAE" in caplog.text


def test_low_cpu_mem_usage_keeps_new_parameters_on_meta_until_loaded(sae_factory, tmp_path) -> None:
    sae_folder, adapter, ids, expected = _saved(sae_factory, tmp_path, l1_coeff=1e-3)
    fresh = get_peft_model(make_model("llama"), ISaeRFTConfig(saes=[{"path": str(sae_folder)}]),
                           low_cpu_mem_usage=True)
    layer = fresh.base_model.model.model.layers[1]
    assert layer.isaerft_scale["default"].device.type == "meta"
    loaded = PeftModel.from_pretrained(make_model("llama"), str(adapter), low_cpu_mem_usage=True)
    layer = loaded.base_model.model.model.layers[1]
    assert layer.isaerft_scale["default"].device.type == "cpu"
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected)
    # the parameter objects were replaced by the load: the L1 step still applies to the new ones
    assert l1_coefficient(layer.isaerft_bias["default"]) == pytest.approx(1e-3)
