"""The architecture table: every TransformerLens hook kind maps to a real module of every architecture."""

from __future__ import annotations

import pytest
from conftest import ARCHS, LAYERS, make_model

from peft_isaerft.attach_points import ARCHITECTURES, HOOK_KINDS, resolve_attach_point, valid_hook_names


@pytest.mark.parametrize("arch", ARCHS)
def test_every_hook_kind_resolves_to_an_existing_module(arch: str) -> None:
    model = make_model(arch)
    assert model.config.model_type in ARCHITECTURES
    for layer in range(LAYERS):
        for kind in HOOK_KINDS:
            point = resolve_attach_point(model, f"blocks.{layer}.{kind}")
            model.get_submodule(point.module_path)  # raises if the table is wrong
            assert point.layer == layer


def test_resid_pre_is_previous_layer_output_and_first_layer_input() -> None:
    model = make_model("llama")
    first = resolve_attach_point(model, "blocks.0.hook_resid_pre")
    assert (first.module_path, first.position) == ("model.layers.0", "input")
    later = resolve_attach_point(model, "blocks.2.hook_resid_pre")
    assert (later.module_path, later.position) == ("model.layers.1", "output")


def test_gemma2_outputs_are_after_post_norms_and_not_mergeable() -> None:
    model = make_model("gemma2")
    point = resolve_attach_point(model, "blocks.1.hook_mlp_out")
    assert point.module_path == "model.layers.1.post_feedforward_layernorm"
    assert point.merge_linear is None and "post-norm" in point.merge_blocker


def test_module_paths_work_directly_and_relative_to_the_backbone() -> None:
    model = make_model("gpt2")
    assert resolve_attach_point(model, "transformer.h.1").module_path == "transformer.h.1"
    assert resolve_attach_point(model, "h.1.mlp").module_path == "transformer.h.1.mlp"


def test_unknown_attach_point_lists_valid_ones() -> None:
    model = make_model("llama")
    with pytest.raises(ValueError, match=r"blocks\.0\.hook_resid_pre"):
        resolve_attach_point(model, "model.layers.99")
    with pytest.raises(ValueError, match="has 3 layers"):
        resolve_attach_point(model, "blocks.7.hook_resid_post")
    assert "blocks.2.attn.hook_z" in valid_hook_names(model)
