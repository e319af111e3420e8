"""The PEFT behaviours every method keeps: save/load, several adapters, disable, delete, unload, merge."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import make_model
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peft_isaerft import ISaeRFTConfig, ISaeRFTLayer


@pytest.fixture
def trained(sae_factory, tmp_path):
    """A llama adapter with random (non-identity) parameters at two attach points, saved to disk."""
    saes = [
        {"path": str(sae_factory(hook="blocks.1.hook_resid_post", seed=1))},
        {"path": str(sae_factory(hook="blocks.2.hook_mlp_out", seed=2))},
    ]
    base_dir = tmp_path / "base"
    make_model("llama").save_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, ISaeRFTConfig(saes=saes, component="scale_bias", init_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    return peft_model, base_dir, tmp_path / "adapter", saes


def test_adapter_file_holds_only_trained_parameters(trained) -> None:
    peft_model, _, adapter_dir, _ = trained
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    assert sorted(tensors) == [
        "base_model.model.model.layers.1.isaerft_bias",
        "base_model.model.model.layers.1.isaerft_scale",
        "base_model.model.model.layers.2.mlp.isaerft_bias",
        "base_model.model.model.layers.2.mlp.isaerft_scale",
    ]
    assert all(t.shape == (128,) for t in tensors.values())
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "ISAERFT" and len(config["saes"]) == 2
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert trainable == 4 * 128


def test_reload_with_peft_model_and_auto_class_gives_same_logits(trained, input_ids) -> None:
    peft_model, base_dir, adapter_dir, _ = trained
    with torch.no_grad():
        expected = peft_model(input_ids).logits
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
        torch.testing.assert_close(loaded(input_ids).logits, expected)
        auto = AutoPeftModelForCausalLM.from_pretrained(adapter_dir)
        torch.testing.assert_close(auto(input_ids).logits, expected)


def test_several_adapters_set_disable_delete(trained, sae_factory, input_ids) -> None:
    _, base_dir, adapter_dir, _ = trained
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        base_logits = base(input_ids).logits
    model = PeftModel.from_pretrained(base, adapter_dir, adapter_name="first")
    with torch.no_grad():
        first = model(input_ids).logits
    # a second adapter nested inside a module the first already wraps
    second_sae = sae_factory(hook="blocks.1.hook_mlp_out", seed=5)
    model.add_adapter("second", ISaeRFTConfig(saes=[{"path": str(second_sae)}], component="bias", init_weights=False))
    model.set_adapter("second")
    with torch.no_grad():
        second = model(input_ids).logits
    assert not torch.allclose(first, second)
    model.set_adapter("first")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, first)
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids).logits, base_logits)
        torch.testing.assert_close(model(input_ids).logits, first)
    model.load_adapter(adapter_dir, adapter_name="again")
    model.set_adapter("again")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, first)
    model.delete_adapter("first")
    assert "first" not in model.peft_config
    assert all("first" not in m.isaerft_scale for m in model.modules() if isinstance(m, ISaeRFTLayer))
    # saving the nested adapter alone and loading it onto a fresh model gives the same keys and logits
    model.set_adapter("second")
    with torch.no_grad():
        second_again = model(input_ids).logits
    torch.testing.assert_close(second_again, second)


def test_nested_adapter_saved_alone_loads_on_fresh_model(trained, sae_factory, tmp_path, input_ids) -> None:
    peft_model, base_dir, _, _ = trained
    sae = sae_factory(hook="blocks.1.hook_mlp_out", seed=6)
    peft_model.add_adapter("inner", ISaeRFTConfig(saes=[{"path": str(sae)}], component="bias", init_weights=False))
    peft_model.set_adapter("inner")
    with torch.no_grad():
        expected = peft_model(input_ids).logits
    peft_model.save_pretrained(tmp_path / "saved", selected_adapters=["inner"])
    keys = load_file(tmp_path / "saved" / "inner" / "adapter_model.safetensors").keys()
    assert list(keys) == ["base_model.model.model.layers.1.mlp.isaerft_bias"]
    fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "saved" / "inner")
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids).logits, expected)


def test_unload_restores_the_base_model(trained, input_ids) -> None:
    peft_model, base_dir, _, _ = trained
    with torch.no_grad():
        base_logits = AutoModelForCausalLM.from_pretrained(base_dir)(input_ids).logits
    unloaded = peft_model.unload()
    assert not any(isinstance(m, ISaeRFTLayer) for m in unloaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(unloaded(input_ids).logits, base_logits)


@pytest.mark.parametrize(
    ("arch", "hook"),
    [
        ("llama", "blocks.1.hook_resid_post"),
        ("llama", "blocks.2.hook_resid_pre"),
        ("gpt2", "blocks.1.hook_mlp_out"),
        ("qwen2", "blocks.1.hook_attn_out"),
        ("gpt_neox", "blocks.1.attn.hook_z"),
        ("gpt2", "blocks.2.attn.hook_z"),
    ],
)
def test_merge_bias_adapter_is_exact(arch, hook, sae_factory, input_ids) -> None:
    peft_model = get_peft_model(
        make_model(arch),
        ISaeRFTConfig(saes=[{"path": str(sae_factory(hook=hook))}], component="bias", init_weights=False),
    )
    with torch.no_grad():
        expected = peft_model(input_ids).logits
        merged = peft_model.merge_and_unload()
        assert not any(isinstance(m, ISaeRFTLayer) for m in merged.modules())
        torch.testing.assert_close(merged(input_ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_merged_llama_saves_and_reloads_as_plain_transformers(sae_factory, tmp_path, input_ids) -> None:
    hook = "blocks.1.hook_resid_post"
    peft_model = get_peft_model(
        make_model("llama"),
        ISaeRFTConfig(saes=[{"path": str(sae_factory(hook=hook))}], component="bias", init_weights=False),
    )
    with torch.no_grad():
        expected = peft_model(input_ids).logits
    merged = peft_model.merge_and_unload()
    assert merged.config.mlp_bias is True
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_merge_without_config_switch_warns_and_its_save_refuses(arch, sae_factory, input_ids, caplog,
                                                                tmp_path) -> None:
    peft_model = get_peft_model(
        make_model(arch),
        ISaeRFTConfig(
            saes=[{"path": str(sae_factory(hook="blocks.1.hook_resid_post"))}], component="bias", init_weights=False
        ),
    )
    with caplog.at_level(logging.WARNING):
        merged = peft_model.merge_and_unload()
    assert "save_pretrained() refuses" in caplog.text
    with pytest.raises(ValueError, match="silently lose the adapter's change"):
        merged.save_pretrained(tmp_path / "merged")
    assert not (tmp_path / "merged").exists() or not any((tmp_path / "merged").iterdir())
    merged.save_pretrained(tmp_path / "merged", allow_dropping_merged_biases=True)  # the explicit opt-out
    assert (tmp_path / "merged" / "config.json").is_file()


def test_merge_and_unmerge_adapter_round_trip(sae_factory, input_ids) -> None:
    peft_model = get_peft_model(
        make_model("llama"),
        ISaeRFTConfig(
            saes=[{"path": str(sae_factory(hook="blocks.1.hook_mlp_out"))}], component="bias", init_weights=False
        ),
    )
    with torch.no_grad():
        expected = peft_model(input_ids).logits
        base = peft_model.get_base_model()
        peft_model.merge_adapter()
        assert base.model.layers[1].mlp.base_layer.down_proj.bias is not None
        torch.testing.assert_close(peft_model(input_ids).logits, expected, atol=1e-4, rtol=1e-4)
        peft_model.unmerge_adapter()
        assert base.model.layers[1].mlp.base_layer.down_proj.bias is None
        torch.testing.assert_close(peft_model(input_ids).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("arch", "component", "hook", "message"),
    [
        ("llama", "scale", "blocks.1.hook_resid_post", "nonlinearity"),
        ("llama", "scale_bias", "blocks.1.hook_resid_post", "cannot be merged"),
        ("gemma2", "bias", "blocks.1.hook_resid_post", "post-norms"),
        ("llama", "bias", "blocks.0.hook_resid_pre", "embeddings"),
    ],
)
def test_unmergeable_adapters_raise_and_leave_model_intact(
    arch, component, hook, message, sae_factory, input_ids
) -> None:
    peft_model = get_peft_model(
        make_model(arch),
        ISaeRFTConfig(saes=[{"path": str(sae_factory(hook=hook))}], component=component, init_weights=False),
    )
    with torch.no_grad():
        expected = peft_model(input_ids).logits
    with pytest.raises(ValueError, match=message):
        peft_model.merge_and_unload()
    assert any(isinstance(m, ISaeRFTLayer) for m in peft_model.modules())
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids).logits, expected)
