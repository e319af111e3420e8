"""sae-lens pretrained references resolve through sae-lens's real loaders, offline, from a local HF cache.

The cache holds a Gemma Scope SAE in Gemma Scope's own file layout (`params.npz` under the release's
repository and folder), at Gemma Scope's real width, but mostly zeros so it stays small on disk.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from peft_isaerft import SAEReference

RELEASE = "gemma-scope-2b-pt-res-canonical"
SAE_ID = "layer_0/width_16k/canonical"
REPO = "google/gemma-scope-2b-pt-res"
FOLDER = "layer_0/width_16k/average_l0_105"
D_MODEL, D_SAE = 2304, 16384


def populate_gemma_scope_cache(cache: Path) -> None:
    """Write a Hugging Face hub cache entry for REPO as `hf_hub_download` leaves it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / ("models--" + REPO.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    target = repo_dir / "snapshots" / commit / FOLDER
    target.mkdir(parents=True)
    rng = np.random.default_rng(0)
    w_enc = np.zeros((D_MODEL, D_SAE), dtype=np.float32)
    w_dec = np.zeros((D_SAE, D_MODEL), dtype=np.float32)
    w_enc[:, :8] = rng.normal(size=(D_MODEL, 8)) * 0.05
    w_dec[:8] = rng.normal(size=(8, D_MODEL)) * 0.05
    np.savez_compressed(
        target / "params.npz",
        W_enc=w_enc,
        W_dec=w_dec,
        b_enc=np.zeros(D_SAE, np.float32),
        b_dec=np.zeros(D_MODEL, np.float32),
        threshold=np.zeros(D_SAE, np.float32),
    )


SCRIPT = textwrap.dedent(f"""
    import torch, peft_isaerft
    from peft import get_peft_model, PeftModel
    from transformers import Gemma2Config, AutoModelForCausalLM
    config = Gemma2Config(hidden_size={D_MODEL}, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=8, vocab_size=50, initializer_range=0.2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.tensor([[3, 4, 5, 6]])
    base = model(ids).logits
    adapter = peft_isaerft.ISaeRFTConfig(saes=[{{"release": "{RELEASE}", "sae_id": "{SAE_ID}"}}], component="bias")
    peft_model = get_peft_model(model, adapter)
    assert peft_model.base_model.targeted_module_names == ["model.layers.0"]
    sae = peft_model.base_model.model.model.layers[0].isaerft_splices["default"].sae
    assert type(sae).__name__ == "JumpReLUSAE" and sae.cfg.d_sae == {D_SAE}
    torch.testing.assert_close(peft_model(ids).logits, base)
    with torch.no_grad():
        peft_model.base_model.model.model.layers[0].isaerft_bias["default"][:8] = 3.0
    changed = peft_model(ids).logits
    assert (changed - base).abs().max() > 1e-3
    peft_model.save_pretrained("{{out}}")
    torch.manual_seed(0)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_config(config).eval(), "{{out}}")
    torch.testing.assert_close(reloaded(ids).logits, changed)
    print("OK")
""")


def test_gemma_scope_release_loads_offline_from_local_cache(tmp_path) -> None:
    cache = tmp_path / "hub"
    populate_gemma_scope_cache(cache)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "home")}
    script = SCRIPT.replace("{out}", str(tmp_path / "adapter"))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("OK")


def test_without_the_cache_offline_loading_fails_loudly(tmp_path) -> None:
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
    script = SCRIPT.replace("{out}", str(tmp_path / "adapter"))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "offline" in result.stderr.lower() or "LocalEntryNotFoundError" in result.stderr


def test_reference_knows_its_neuronpedia_id() -> None:
    reference = SAEReference.from_dict({"release": RELEASE, "sae_id": SAE_ID})
    assert reference.neuronpedia_id == "gemma-2-2b/0-gemmascope-res-16k"
    assert SAEReference.from_dict({"path": "x"}).neuronpedia_id is None
