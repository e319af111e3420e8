"""Bad input fails early with a message that names the problem and the fix."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from peft_isaerft import ISaeRFTConfig, ISaeRFTLayer


def test_sae_width_mismatch_names_both_sizes(sae_factory) -> None:
    folder = sae_factory(d_in=48, hook="blocks.1.hook_resid_post")
    model = make_model("llama")
    with pytest.raises(ValueError, match=r"48-dimensional.*32-dimensional"):
        get_peft_model(model, ISaeRFTConfig(saes=[{"path": str(folder)}]))
    assert not any(isinstance(m, ISaeRFTLayer) for m in model.modules())


def test_unknown_hook_lists_valid_ones(sae_factory) -> None:
    folder = sae_factory()
    with pytest.raises(ValueError, match=r"blocks\.0\.hook_resid_pre"):
        get_peft_model(make_model("llama"), ISaeRFTConfig(saes=[{"path": str(folder), "hook": "model.nope"}]))


def test_sae_without_hook_metadata_asks_for_one(sae_factory) -> None:
    with pytest.raises(ValueError, match="records no hook name"):
        get_peft_model(make_model("llama"), ISaeRFTConfig(saes=[{"path": str(sae_factory())}]))


def test_unknown_component_lists_components() -> None:
    with pytest.raises(ValueError, match=r"Unknown ISaeRFT component 'gain'.*scale_bias"):
        ISaeRFTConfig(saes=[{"path": "x"}], component="gain")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"release": "r"}, "needs both"),
        ({"path": "p", "release": "r", "sae_id": "i"}, "give one of them"),
        ({"pth": "p"}, "Unknown key"),
        ("folder", "must be a dict"),
    ],
)
def test_malformed_sae_entries(entry, message) -> None:
    with pytest.raises(ValueError, match=message):
        ISaeRFTConfig(saes=[entry])


def test_empty_saes_and_bad_options() -> None:
    with pytest.raises(ValueError, match="at least one SAE"):
        ISaeRFTConfig()
    with pytest.raises(ValueError, match="sae_dtype"):
        ISaeRFTConfig(saes=[{"path": "x"}], sae_dtype="half")
    with pytest.raises(ValueError, match="l1_coeff"):
        ISaeRFTConfig(saes=[{"path": "x"}], l1_coeff=-1)
    with pytest.raises(ValueError, match="names no SAE"):
        ISaeRFTConfig(saes=[{"path": "x"}], latent_allowlist={"3": [1]})


def test_missing_sae_folder_is_named(tmp_path) -> None:
    missing = tmp_path / "no_such_sae"
    with pytest.raises(FileNotFoundError, match="no_such_sae"):
        get_peft_model(
            make_model("llama"), ISaeRFTConfig(saes=[{"path": str(missing), "hook": "blocks.0.hook_resid_post"}])
        )


def test_two_saes_at_one_point_in_one_adapter(sae_factory) -> None:
    saes = [
        {"path": str(sae_factory(hook="blocks.1.hook_resid_post"))},
        {"path": str(sae_factory(hook="blocks.2.hook_resid_pre"))},
    ]
    with pytest.raises(ValueError, match=r"both attach at model\.layers\.1"):
        get_peft_model(make_model("llama"), ISaeRFTConfig(saes=saes))


def test_latent_ids_beyond_sae_width(sae_factory) -> None:
    folder = sae_factory(hook="blocks.1.hook_resid_post")
    with pytest.raises(ValueError, match=r"latents \[500\]"):
        get_peft_model(make_model("llama"), ISaeRFTConfig(saes=[{"path": str(folder)}], latent_allowlist={"0": [500]}))


@pytest.fixture
def saved_adapter(sae_factory, tmp_path):
    folder = sae_factory(hook="blocks.1.hook_resid_post")
    model = get_peft_model(make_model("llama"), ISaeRFTConfig(saes=[{"path": str(folder)}], init_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_adapter_onto_a_base_model_it_does_not_fit(saved_adapter) -> None:
    with pytest.raises(ValueError, match=r"32-dimensional.*64-dimensional|64-dimensional"):
        from conftest import _llama_like
        from transformers import LlamaConfig

        config = _llama_like(LlamaConfig)
        config.hidden_size = 64
        torch.manual_seed(0)
        PeftModel.from_pretrained(AutoModelForCausalLM.from_config(config), saved_adapter)


def test_adapter_whose_sae_changed_width(saved_adapter, sae_factory) -> None:
    config_path = saved_adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["saes"][0]["path"] = str(sae_factory(hook="blocks.1.hook_resid_post", d_sae=64))
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"not the SAE this adapter was trained with: d_sae 128 -> 64"):
        PeftModel.from_pretrained(make_model("llama"), saved_adapter)
    # without the fingerprint check, the weights themselves still do not fit
    with pytest.raises(ValueError, match=r"shape \(128,\) in the file but the SAE at that point has \(64,\)"):
        PeftModel.from_pretrained(make_model("llama"), saved_adapter, verify_sae_fingerprints=False)


def test_adapter_file_with_missing_weights(saved_adapter) -> None:
    from safetensors.torch import save_file

    save_file(
        {"base_model.model.model.layers.2.isaerft_scale": torch.zeros(128)}, saved_adapter / "adapter_model.safetensors"
    )
    with pytest.raises(ValueError, match="do not fit its config"):
        PeftModel.from_pretrained(make_model("llama"), saved_adapter)


def test_corrupt_adapter_file(saved_adapter) -> None:
    (saved_adapter / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors.*corrupt"):
        PeftModel.from_pretrained(make_model("llama"), saved_adapter)


def test_adapter_file_with_a_base_model_weight_is_refused(saved_adapter) -> None:
    # found by the fuzzer: a key outside the adapter would be ignored or overwrite a base-model weight
    from safetensors.torch import load_file, save_file

    tensors = load_file(saved_adapter / "adapter_model.safetensors")
    for value in (torch.zeros(()), torch.zeros(64, 32)):
        save_file({**tensors, "base_model.model.lm_head.weight": value}, saved_adapter / "adapter_model.safetensors")
        with pytest.raises(ValueError, match=r"unexpected \['base_model.model.lm_head.weight'\]"):
            PeftModel.from_pretrained(make_model("llama"), saved_adapter)
