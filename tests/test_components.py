"""Components as classes in one registry, and the clamp: identity at init, exactly h + (f(z) - z) D, gradients equal
to autograd over dense latents, trained by the Trainer with L1 on the gate only, saved, read per feature, not merged."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model
from peft import PeftModel, get_peft_model
from sae_lens import SAE

from peft_isaerft import ISaeRFTConfig, feature_report, render
from peft_isaerft.components import COMPONENTS, Clamp, get_component, parameter_container_names
from peft_isaerft.sparsity import l1_coefficient


def test_every_component_is_one_registered_class_with_its_parameters() -> None:
    assert set(COMPONENTS) == {"scale", "bias", "scale_bias", "clamp"}
    assert get_component("clamp").parameter_names == ("clamp_gate", "clamp_threshold", "clamp_target")
    assert set(parameter_container_names()) == {"isaerft_scale", "isaerft_bias", "isaerft_clamp_gate",
                                                "isaerft_clamp_threshold", "isaerft_clamp_target"}
    assert [c.mergeable for c in COMPONENTS.values()] == [False, True, False, False]
    with pytest.raises(ValueError, match="clamp: z -> z"):
        get_component("clip")


def _hidden_after_layer(model, input_ids, layer: int = 1) -> torch.Tensor:
    seen = []
    layers = model.get_base_model().model.layers if hasattr(model, "get_base_model") else model.model.layers
    handle = layers[layer + 1].register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    try:
        model(input_ids)
    finally:
        handle.remove()
    return seen[0]


def test_a_fresh_clamp_adapter_is_the_identity(sae_factory, input_ids) -> None:
    model = make_model("llama")
    with torch.no_grad():
        base = model(input_ids).logits
    folder = sae_factory(architecture="jumprelu", hook="blocks.1.hook_resid_post")
    peft_model = get_peft_model(model, ISaeRFTConfig(saes=[{"path": str(folder)}], component="clamp"))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids).logits, base, atol=1e-5, rtol=0)


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu", "gated"])
def test_clamp_changes_the_residual_by_its_edit_times_the_decoder(architecture, sae_factory, input_ids) -> None:
    model = make_model("llama")
    folder = sae_factory(architecture=architecture, hook="blocks.1.hook_resid_post")
    sae = SAE.load_from_disk(str(folder))
    with torch.no_grad():
        h = _hidden_after_layer(model, input_ids)
    peft_model = get_peft_model(model, ISaeRFTConfig(saes=[{"path": str(folder)}], component="clamp",
                                                     init_weights=False))
    layer = peft_model.base_model.model.model.layers[1]
    params = layer.adapter_parameters("default")
    gate, threshold, target = (params[p.name] for p in Clamp.parameters)
    with torch.no_grad():
        z = sae.encode(h)
        edited = z + (z > 0) * gate * torch.sigmoid(Clamp.sharpness * (z - threshold)) * (target - z)
        expected = h + (sae.decode(edited) - sae.decode(z))
        got = _hidden_after_layer(peft_model, input_ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (got - h).abs().max() > 1e-3  # the random clamp does act


def test_clamp_trains_with_l1_on_the_gate_only_saves_reads_and_refuses_to_merge(sae_factory, tmp_path,
                                                                                 input_ids) -> None:
    folder = sae_factory(architecture="topk", hook="blocks.1.hook_resid_post")
    model = get_peft_model(make_model("llama"), ISaeRFTConfig(saes=[{"path": str(folder)}], component="clamp",
                                                              l1_coeff=1e-4))
    layer = model.base_model.model.model.layers[1]
    assert l1_coefficient(layer.isaerft_clamp_gate["default"]) == pytest.approx(1e-4)
    assert l1_coefficient(layer.isaerft_clamp_threshold["default"]) == 0.0
    with torch.no_grad():  # a start away from the identity, so the gradients of all three vectors are non-zero
        layer.isaerft_clamp_gate["default"].fill_(0.5)
        layer.isaerft_clamp_target["default"].fill_(-2.0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids, labels=input_ids).loss.backward()
        for name in ("isaerft_clamp_gate", "isaerft_clamp_threshold", "isaerft_clamp_target"):
            assert getattr(layer, name)["default"].grad.abs().sum() > 0, name
        optimizer.step()
        optimizer.zero_grad()
    assert (layer.isaerft_clamp_gate["default"] >= 0).all()  # the gate is projected onto >= 0 after every step
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = model(input_ids).logits
    loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, expected)
    records = feature_report(tmp_path / "adapter", top_k=5)
    assert records and {r.param for r in records} == {"clamp"}
    assert records[0].detail.startswith("when above") and "pulled to" in records[0].detail
    assert "pulled to" in render(records, "md") and json.loads(render(records, "json"))[0]["detail"]
    with pytest.raises(ValueError, match="cannot be merged: a clamp depends on each token's activation"):
        model.merge_and_unload()
