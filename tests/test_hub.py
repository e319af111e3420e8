"""The Hub, offline: what push_to_hub uploads (through PEFT's and transformers' own code), and loading an adapter
by repository id from a local Hugging Face cache with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import torch
from conftest import make_model
from huggingface_hub import ModelCard, ModelCardData
from peft import get_peft_model

from peft_isaerft import ISaeRFTConfig


def test_push_to_hub_uploads_adapter_card_and_bundled_sae(sae_factory, monkeypatch, tmp_path) -> None:
    import transformers.utils.hub as hub

    uploaded: dict[str, bytes] = {}

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return SimpleNamespace(repo_id=repo_id)

        def create_commit(self, repo_id, operations, **kwargs):
            for operation in operations:
                with open(operation.path_or_fileobj, "rb") as handle:
                    uploaded[operation.path_in_repo] = handle.read()
            return SimpleNamespace(commit_url="local")

    monkeypatch.setattr(hub, "hf_api", lambda: FakeApi())
    def generic_card(repo_id, tags=None, token=None):  # what transformers writes for a repository with no card yet
        return ModelCard.from_template(ModelCardData(library_name="transformers"), model_description="generic card")

    monkeypatch.setattr(hub, "create_and_tag_model_card", generic_card)
    model = get_peft_model(make_model("llama"), ISaeRFTConfig(
        saes=[{"path": str(sae_factory(hook="blocks.1.hook_resid_post"))}], component="bias", init_weights=False))
    model.push_to_hub("user/isaerft-adapter")
    # the local SAE travels with the adapter (bundled by default), in its own folder
    assert set(uploaded) == {"adapter_config.json", "adapter_model.safetensors", "README.md",
                             "sae_0/cfg.json", "sae_0/sae_weights.safetensors"}
    card = uploaded["README.md"].decode()
    assert "library_name: peft" in card and "## ISaeRFT adapter" in card and "| blocks.1.hook_resid_post |" in card
    assert len(uploaded["adapter_model.safetensors"]) < 4096  # 128 floats and a header, no SAE weights


def test_auto_peft_model_by_repo_id_from_local_cache(sae_factory, tmp_path) -> None:
    base_dir = tmp_path / "base"
    make_model("llama").save_pretrained(base_dir)
    model = get_peft_model(make_model("llama"), ISaeRFTConfig(
        saes=[{"path": str(sae_factory(hook="blocks.1.hook_resid_post"))}], component="scale_bias", init_weights=False))
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = model(ids).logits
    torch.save(expected, tmp_path / "expected.pt")

    cache = tmp_path / "hub"
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = cache / "models--user--isaerft-adapter"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tmp_path / "adapter", repo / "snapshots" / commit)
    script = textwrap.dedent(f"""
        import torch, peft_isaerft
        from peft import AutoPeftModelForCausalLM
        model = AutoPeftModelForCausalLM.from_pretrained("user/isaerft-adapter")
        with torch.no_grad():
            got = model(torch.tensor([[5, 6, 7, 8]])).logits
        torch.testing.assert_close(got, torch.load({str(tmp_path / "expected.pt")!r}))
        print("OK")
    """)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("OK")
