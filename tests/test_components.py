"""Components as classes in one registry; the clamp and the latent map: identity at init, exactly h + (f(z) - z) D,
trained with L1 where it belongs, saved, read per feature (the map as labelled edges), not merged."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model
from peft import PeftModel, get_peft_model
from sae_lens import SAE

from peft_isaerft import ISaeRFTConfig, feature_report, render
from peft_isaerft.components import COMPONENTS, Clamp, LatentMap, get_component, parameter_container_names
from peft_isaerft.interpret.contents import load_contents
from peft_isaerft.interpret.labels import sae_key
from peft_isaerft.sparsity import l1_coefficient


def test_every_component_is_one_registered_class_with_its_parameters() -> None:
    assert set(COMPONENTS) == {"scale", "bias", "scale_bias", "clamp", "latent_map"}
    assert get_component("clamp").parameter_names == ("clamp_gate", "clamp_threshold", "clamp_target")
    assert set(parameter_container_names()) == {"isaerft_scale", "isaerft_bias", "isaerft_clamp_gate",
                                                "isaerft_clamp_threshold", "isaerft_clamp_target",
                                                "isaerft_map_source", "isaerft_map_target"}
    assert [c.mergeable for c in COMPONENTS.values()] == [False, True, False, False, False]
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


def _save_and_reload_gives_the_same_logits(model, folder, input_ids) -> None:
    model.save_pretrained(folder)
    with torch.no_grad():
        expected = model(input_ids).logits
        loaded = PeftModel.from_pretrained(make_model("llama"), folder)
        torch.testing.assert_close(loaded(input_ids).logits, expected)


def test_a_fresh_clamp_adapter_is_the_identity(sae_factory, input_ids) -> None:
    model = make_model("llama")
    with torch.no_grad():
        base = model(input_ids).logits
    folder = sae_factory(architecture="jumprelu", hook="blocks.1.hook_resid_post")
    peft_model = get_peft_model(model, ISaeRFTConfig(saes=[{"path": str(folder)}], component="clamp"))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids).logits, base, atol=1e-5, rtol=0)


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
    _save_and_reload_gives_the_same_logits(model, tmp_path / "adapter", input_ids)
    records = feature_report(tmp_path / "adapter", top_k=5)
    assert records and {r.param for r in records} == {"clamp"}
    assert records[0].detail.startswith("when above") and "pulled to" in records[0].detail
    assert "pulled to" in render(records, "md") and json.loads(render(records, "json"))[0]["detail"]
    with pytest.raises(ValueError, match="cannot be merged: a clamp depends on each token's activation"):
        model.merge_and_unload()


def test_a_fresh_latent_map_is_the_identity_with_a_random_source_side(sae_factory, input_ids) -> None:
    model = make_model("llama")
    with torch.no_grad():
        base = model(input_ids).logits
    folder = sae_factory(architecture="topk", hook="blocks.1.hook_resid_post")
    peft_model = get_peft_model(model, ISaeRFTConfig(saes=[{"path": str(folder)}], component="latent_map",
                                                     latent_map_rank=4))
    layer = peft_model.base_model.model.model.layers[1]
    source, target = layer.isaerft_map_source["default"], layer.isaerft_map_target["default"]
    assert source.shape == target.shape == (layer.isaerft_splices["default"].sae.cfg.d_sae, 4)
    assert (target == 0).all() and source.abs().min() > 0  # LoRA-style: A random, B zero
    # rows of norm about 1 whatever the rank
    assert float(source.detach().norm(dim=-1).mean()) == pytest.approx(1.0, rel=0.2)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids).logits, base, atol=1e-5, rtol=0)


def _edited_latents(component: str, params: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """f(z), written out from each component's definition."""
    if component == "clamp":
        gate, threshold, target = (params[p.name] for p in Clamp.parameters)
        return z + (z > 0) * gate * torch.sigmoid(Clamp.sharpness * (z - threshold)) * (target - z)
    return z + z @ LatentMap().edges(params).T  # latent map: f(z)_j = z_j + sum_i W[j, i] z_i


@pytest.mark.parametrize("component", ["clamp", "latent_map"])
@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu", "gated"])
def test_component_changes_the_residual_by_its_edit_times_the_decoder(component, architecture, sae_factory,
                                                                       input_ids) -> None:
    model = make_model("llama")
    folder = sae_factory(architecture=architecture, hook="blocks.1.hook_resid_post")
    sae = SAE.load_from_disk(str(folder))
    with torch.no_grad():
        h = _hidden_after_layer(model, input_ids)
    peft_model = get_peft_model(model, ISaeRFTConfig(saes=[{"path": str(folder)}], component=component,
                                                     init_weights=False))
    params = peft_model.base_model.model.model.layers[1].adapter_parameters("default")
    with torch.no_grad():
        z = sae.encode(h)
        expected = h + (sae.decode(_edited_latents(component, params, z)) - sae.decode(z))
        got = _hidden_after_layer(peft_model, input_ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (got - h).abs().max() > 1e-3  # the random component does act


def test_latent_map_trains_sparse_edges_saves_reads_them_labelled_and_refuses_to_merge(sae_factory, tmp_path,
                                                                                       input_ids) -> None:
    folder = sae_factory(architecture="topk", hook="blocks.1.hook_resid_post")
    config = ISaeRFTConfig(saes=[{"path": str(folder)}], component="latent_map", latent_map_rank=2, l1_coeff=0.1)
    model = get_peft_model(make_model("llama"), config)
    layer = model.base_model.model.model.layers[1]
    source, target = layer.isaerft_map_source["default"], layer.isaerft_map_target["default"]
    assert l1_coefficient(source) == l1_coefficient(target) == pytest.approx(0.1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(12):
        model(input_ids, labels=input_ids).loss.backward()
        if step == 0:  # B = 0: only the target side learns at first, and the source side must survive the L1 step
            assert source.grad.abs().sum() == 0 and target.grad.abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad()
        if step == 0:
            assert source.abs().min() > 0
    live_targets = int((target != 0).any(-1).sum())
    assert 0 < live_targets < target.shape[0]  # the L1 step left a few target latents, not all
    _save_and_reload_gives_the_same_logits(model, tmp_path / "adapter", input_ids)
    key = sae_key(load_contents(tmp_path / "adapter")[0].reference)
    labels = {(key, latent): f"feature {latent}" for latent in range(target.shape[0])}
    records = feature_report(tmp_path / "adapter", top_k=5, labels=labels)
    assert records and {r.param for r in records} == {"map"}
    with torch.no_grad():
        edges = LatentMap().edges(layer.adapter_parameters("default"))
    for record in records:  # each record is one edge source -> latent with its weight in W = B A^T, both labelled
        assert record.source is not None and record.detail == f"from {record.source}: feature {record.source}"
        assert record.label == f"feature {record.latent}"
        assert record.value == pytest.approx(float(edges[record.latent, record.source]), rel=1e-4, abs=1e-6)
    strongest = edges.abs() * layer.isaerft_splices["default"].sae.W_dec.detach().norm(dim=-1)[:, None]
    assert records[0].effect == pytest.approx(float(strongest.max()), rel=1e-4)
    assert "from " in render(records, "md") and json.loads(render(records, "json"))[0]["source"] is not None
    with pytest.raises(ValueError, match="cannot be merged: a latent map depends on each token"):
        model.merge_and_unload()


def test_latent_map_rank_is_validated_and_only_for_the_latent_map(sae_factory) -> None:
    folder = str(sae_factory(hook="blocks.1.hook_resid_post"))
    for bad in (0, -2, 2.5, True, "8"):
        with pytest.raises(ValueError, match="latent_map_rank must be a whole number >= 1"):
            ISaeRFTConfig(saes=[{"path": folder}], component="latent_map", latent_map_rank=bad)
    with pytest.raises(ValueError, match="only applies to component='latent_map'"):
        ISaeRFTConfig(saes=[{"path": folder}], component="scale", latent_map_rank=4)


def test_a_clamp_gate_above_one_reads_as_the_map_it_applies() -> None:
    gate, threshold, target = torch.tensor([0.5, 3.0]), torch.tensor([0.4, -0.2]), torch.tensor([-2.0, -1.0])
    params = dict(zip(("clamp_gate", "clamp_threshold", "clamp_target"),
                      (gate, threshold, target), strict=True))
    reading = Clamp().readings(params, torch.ones(2), None)[0]
    assert reading.detail(0) == "when above 0.4, pulled to -2"
    assert reading.detail(1) == "when above -0.2, z -> -2 z -3 (overshoots -1)"
    z = torch.tensor([5.0])  # fully switched on, the edit is what the reading says
    edited = z + Clamp().edit(z, gate[1:], torch.tensor([-1e4]), target[1:])
    torch.testing.assert_close(edited, -2 * z - 3)
