"""The splice math on real models and real sae-lens SAEs: identity at init, and exactly h + (f(z) - z) W_dec."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, HIDDEN, make_model
from peft import get_peft_model
from sae_lens import SAE

from peft_isaerft import ISaeRFTConfig

ALL_HOOKS = [
    "blocks.0.hook_resid_pre",
    "blocks.1.hook_resid_post",
    "blocks.1.hook_mlp_out",
    "blocks.2.hook_attn_out",
    "blocks.2.attn.hook_z",
]


@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_adapter_with_sae_at_every_hook_kind_keeps_logits(arch, sae_factory, input_ids) -> None:
    model = make_model(arch)
    with torch.no_grad():
        base = model(input_ids).logits
    saes = [{"path": str(sae_factory(seed=i)), "hook": hook} for i, hook in enumerate(ALL_HOOKS)]
    peft_model = get_peft_model(model, ISaeRFTConfig(saes=saes, component="scale_bias"))
    assert len(peft_model.base_model.targeted_module_names) == len(ALL_HOOKS)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids).logits, base, atol=1e-5, rtol=0)
        # random (non-identity) parameters must move the outputs, or the splice is not wired in
        peft_random = get_peft_model(
            make_model(arch), ISaeRFTConfig(saes=saes, component="scale_bias", init_weights=False)
        )
        assert (peft_random(input_ids).logits - base).abs().max() > 1e-2


def _hidden_after_layer(model, input_ids, layer: int) -> torch.Tensor:
    """The residual stream after ``layer``, read as the input of the next layer (spliced or not)."""
    seen = []
    layers = model.get_base_model().model.layers if hasattr(model, "get_base_model") else model.model.layers
    handle = layers[layer + 1].register_forward_pre_hook(
        lambda _module, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True
    )
    try:
        model(input_ids)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("component", ["bias", "scale", "scale_bias"])
@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu", "gated"])
def test_residual_changes_by_latent_edit_times_decoder(component, architecture, sae_factory, input_ids) -> None:
    model = make_model("llama")
    folder = sae_factory(architecture=architecture, hook="blocks.1.hook_resid_post")
    sae = SAE.load_from_disk(str(folder))
    with torch.no_grad():
        h = _hidden_after_layer(model, input_ids, 1)
    peft_model = get_peft_model(
        model, ISaeRFTConfig(saes=[{"path": str(folder)}], component=component, init_weights=False)
    )
    layer = peft_model.base_model.model.model.layers[1]
    scale = layer.isaerft_scale["default"] if "scale" in component else torch.zeros(sae.cfg.d_sae)
    bias = layer.isaerft_bias["default"] if "bias" in component else torch.zeros(sae.cfg.d_sae)
    with torch.no_grad():
        z = sae.encode(h)
        expected = h + (sae.decode(z * (1 + scale) + bias) - sae.decode(z))
        got = _hidden_after_layer(peft_model, input_ids, 1)
    if architecture == "topk":  # the splice must not re-run TopK on the edited latents
        assert (z != 0).sum(-1).max() <= 8
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_bias_adapter_never_runs_the_encoder(sae_factory, input_ids, monkeypatch) -> None:
    folder = sae_factory(hook="blocks.1.hook_resid_post")
    peft_model = get_peft_model(
        make_model("llama"), ISaeRFTConfig(saes=[{"path": str(folder)}], component="bias", init_weights=False)
    )
    splice = peft_model.base_model.model.model.layers[1].isaerft_splices["default"]

    def forbidden(_):
        raise AssertionError("encode() called by a bias adapter")

    monkeypatch.setattr(splice.sae, "encode", forbidden)
    peft_model(input_ids).logits.sum().backward()
    assert peft_model.base_model.model.model.layers[1].isaerft_bias["default"].grad is not None


def test_hook_from_sae_metadata_and_several_saes_in_one_adapter(sae_factory, input_ids) -> None:
    saes = [{"path": str(sae_factory(hook=f"blocks.{i}.hook_resid_post", seed=i))} for i in range(3)]
    peft_model = get_peft_model(make_model("qwen2"), ISaeRFTConfig(saes=saes))
    assert peft_model.base_model.targeted_module_names == [f"model.layers.{i}" for i in range(3)]
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert trainable == 3 * 128


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_with_float32_sae(dtype, sae_factory, input_ids) -> None:
    model = make_model("llama", dtype=dtype)
    with torch.no_grad():
        base = model(input_ids).logits
    folder = sae_factory(hook="blocks.1.hook_resid_post")
    peft_model = get_peft_model(model, ISaeRFTConfig(saes=[{"path": str(folder)}], component="scale_bias"))
    splice = peft_model.base_model.model.model.layers[1].isaerft_splices["default"]
    assert splice.sae.W_dec.dtype == torch.float32
    with torch.no_grad():
        out = peft_model(input_ids).logits
    assert out.dtype == dtype
    torch.testing.assert_close(out, base)
    peft_bf16 = get_peft_model(
        make_model("llama", dtype=dtype),
        ISaeRFTConfig(saes=[{"path": str(folder)}], sae_dtype="bfloat16", init_weights=False),
    )
    assert peft_bf16.base_model.model.model.layers[1].isaerft_splices["default"].sae.W_dec.dtype == torch.bfloat16
    loss = peft_bf16(input_ids, labels=input_ids).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_model_half_keeps_sae_dtype_and_to_moves_it(sae_factory, input_ids) -> None:
    folder = sae_factory(hook="blocks.1.hook_resid_post")
    peft_model = get_peft_model(make_model("llama"), ISaeRFTConfig(saes=[{"path": str(folder)}]))
    peft_model.to(torch.bfloat16)
    sae = peft_model.base_model.model.model.layers[1].isaerft_splices["default"].sae
    assert sae.W_dec.dtype == torch.float32
    peft_model.to("meta")
    assert sae.W_dec.device.type == "meta"
    assert HIDDEN == sae.cfg.d_in


def test_device_map_auto_places_sae_on_attach_module_device(tmp_path, sae_factory, input_ids) -> None:
    from transformers import AutoModelForCausalLM

    make_model("llama").save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map="auto")
    folder = sae_factory(hook="blocks.1.hook_resid_post")
    peft_model = get_peft_model(model, ISaeRFTConfig(saes=[{"path": str(folder)}]))
    layer = peft_model.base_model.model.model.layers[1]
    assert layer.isaerft_splices["default"].sae.W_dec.device == next(layer.base_layer.parameters()).device
    peft_model(input_ids.to(model.device))


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
def test_sparse_scale_backward_matches_dense_autograd(architecture, sae_factory) -> None:
    from peft_isaerft.active_latents import selector_for
    from peft_isaerft.components import residual_delta

    sae = SAE.load_from_disk(str(sae_factory(architecture=architecture)))
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, HIDDEN)
    scale = torch.randn(sae.cfg.d_sae) * 0.3
    results = []
    for selector in (None, selector_for(sae)):
        h = hidden.clone().requires_grad_(True)
        s = scale.clone().requires_grad_(True)
        delta = residual_delta(sae.encode, sae.W_dec, h, s, None, select=selector,
                               encoder_rows=sae.W_enc.T.contiguous())
        (delta * torch.linspace(-1, 1, HIDDEN)).pow(2).sum().backward()
        results.append((delta.detach(), h.grad, s.grad))
    (dense_delta, dense_h, dense_s), (sparse_delta, sparse_h, sparse_s) = results
    torch.testing.assert_close(sparse_delta, dense_delta, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sparse_s, dense_s, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sparse_h, dense_h, atol=1e-5, rtol=1e-4)
    assert (sparse_s != 0).sum() <= (sae.encode(hidden) != 0).any(0).any(0).sum()


def test_sparse_path_is_used_for_topk_and_not_for_gated(sae_factory) -> None:
    topk = sae_factory(architecture="topk", hook="blocks.1.hook_resid_post")
    gated = sae_factory(architecture="gated", hook="blocks.2.hook_resid_post")
    model = get_peft_model(make_model("llama"), ISaeRFTConfig(saes=[{"path": str(topk)}, {"path": str(gated)}]))
    layers = model.base_model.model.model.layers
    assert layers[1].isaerft_splices["default"].sparse_backward
    assert not layers[2].isaerft_splices["default"].sparse_backward
