"""The active-latent path of scale adapters: each architecture's selector finds exactly the encoder's non-zeros, and
the compact splice equals plain autograd over dense latents (values and gradients of scale, bias and the input)."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import HIDDEN, make_model
from peft import get_peft_model
from sae_lens import SAE

from peft_isaerft import ISaeRFTConfig
from peft_isaerft.active_latents import SELECTORS, ThresholdSelector, TopKSelector, selector_for
from peft_isaerft.components import active_dots


def _dense_from(values: torch.Tensor, indices: torch.Tensor, d_sae: int) -> torch.Tensor:
    return torch.zeros(values.shape[0], d_sae, dtype=values.dtype).scatter_add_(1, indices, values)


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
def test_selector_finds_exactly_the_encoders_non_zeros(architecture, sae_factory) -> None:
    sae = SAE.load_from_disk(str(sae_factory(architecture=architecture)))
    selector = selector_for(sae)
    assert isinstance(selector, SELECTORS[architecture])
    hidden = torch.randn(50, HIDDEN) * 2
    values, indices = selector(hidden)
    with torch.no_grad():
        latents = sae.encode(hidden)
    torch.testing.assert_close(_dense_from(values, indices, sae.cfg.d_sae), latents)
    # each active latent appears once: no padding slot duplicates an active index
    active_slots = (values != 0).sum(-1)
    torch.testing.assert_close(active_slots, (latents != 0).sum(-1))


def test_topk_selector_never_builds_dense_latents(sae_factory, monkeypatch) -> None:
    sae = SAE.load_from_disk(str(sae_factory(architecture="topk")))

    def forbidden(*_args, **_kwargs):
        raise AssertionError("the TopK selector must not call encode() (it would scatter dense latents)")

    monkeypatch.setattr(sae, "encode", forbidden)
    values, indices = TopKSelector(sae)(torch.randn(9, HIDDEN))
    assert values.shape == indices.shape == (9, sae.cfg.k)


def test_gated_and_decoder_norm_rescaled_threshold_saes_use_dense_autograd(sae_factory) -> None:
    assert selector_for(SAE.load_from_disk(str(sae_factory(architecture="gated")))) is None
    sae = SAE.load_from_disk(str(sae_factory(architecture="jumprelu")))
    sae.cfg.rescale_acts_by_decoder_norm = True  # not something sae-lens's JumpReLU reproduces
    assert selector_for(sae) is None


@pytest.mark.parametrize("screen", [False, True])
def test_decoder_norm_rescaled_topk_selects_on_the_rescaled_latents(screen, sae_factory, monkeypatch) -> None:
    import peft_isaerft.active_latents as active_latents

    monkeypatch.setattr(active_latents, "bf16_screen_available", lambda: screen)
    monkeypatch.setattr(active_latents, "SCREEN_MIN_LATENTS_PER_CANDIDATE", 0)
    sae = SAE.load_from_disk(str(sae_factory(architecture="topk_rescaled", d_sae=512)))
    selector = selector_for(sae)
    assert isinstance(selector, TopKSelector)
    norms = sae.W_dec.detach().norm(dim=-1)
    assert norms.max() > 1.5 * norms.min()  # rescaling changes which latents win
    torch.testing.assert_close(selector.encoder_gain(), norms)
    hidden = torch.randn(60, HIDDEN) * 2
    values, indices = selector(hidden)
    assert (selector._screen is not None) is screen
    with torch.no_grad():
        expected = sae.encode(hidden)
        unscaled = torch.zeros_like(expected).scatter_(1, *reversed((sae.process_sae_in(hidden) @ sae.W_enc
                                                                      + sae.b_enc).topk(8, dim=-1)))
    torch.testing.assert_close(_dense_from(values, indices, sae.cfg.d_sae), expected, atol=1e-6, rtol=1e-6)
    assert ((expected != 0) != (unscaled != 0)).any()  # the top-k of the plain pre-activations is another set


def test_threshold_selector_stays_exact_when_a_later_batch_has_more_active_latents(sae_factory) -> None:
    sae = SAE.load_from_disk(str(sae_factory(architecture="standard")))
    selector = ThresholdSelector(sae)
    selector(torch.randn(4, HIDDEN))
    selector.width = small = 8  # as if the first batch had been a quiet one
    loud = torch.randn(30, HIDDEN) * 5
    values, indices = selector(loud)
    with torch.no_grad():
        latents = sae.encode(loud)
    assert (latents != 0).sum(-1).max() > small, "the test needs a batch above the first bound"
    torch.testing.assert_close(_dense_from(values, indices, sae.cfg.d_sae), latents)
    assert selector.width >= int((latents != 0).sum(-1).max())


def test_threshold_selector_widens_and_warns_on_a_late_saturation_report(sae_factory, caplog) -> None:
    # on a GPU the saturation count is read one call later without waiting; simulate a report that arrived
    sae = SAE.load_from_disk(str(sae_factory(architecture="jumprelu")))
    selector = ThresholdSelector(sae)
    selector(torch.randn(4, HIDDEN))
    width = selector.width
    selector._pending.append((torch.tensor(3), None, width))
    with caplog.at_level(logging.WARNING, logger="peft_isaerft.active_latents"):
        selector(torch.randn(4, HIDDEN))
    assert selector.width == min(sae.cfg.d_sae, 2 * width)
    assert "3 token(s)" in caplog.text and f"now {selector.width}" in caplog.text


def test_active_dots_matches_a_dense_product_across_chunks(monkeypatch) -> None:
    import peft_isaerft.components as components

    monkeypatch.setitem(components.ACTIVE_DOT_ELEMENTS, "cpu", 5 * 3 * 16)  # five tokens per block
    rows = torch.randn(40, 16)
    grad = torch.randn(23, 16)
    indices = torch.randint(0, 40, (23, 3))
    torch.testing.assert_close(active_dots(grad, indices, rows), (grad @ rows.T).gather(1, indices))


def _splice_outputs(sae_folder, component: str, dtype: torch.dtype, sparse: bool, input_ids):
    model = make_model("llama", dtype=dtype)
    peft_model = get_peft_model(
        model, ISaeRFTConfig(saes=[{"path": str(sae_folder)}], component=component, init_weights=False)
    )
    layer = peft_model.base_model.model.model.layers[1]
    splice = layer.isaerft_splices["default"]
    splice.sparse_backward = sparse
    embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
    logits = peft_model(inputs_embeds=embeds).logits
    (logits.float() * torch.linspace(-1, 1, logits.shape[-1])).pow(2).mean().backward()
    grads = {name: param.grad.clone() for name, param in layer.named_parameters() if param.requires_grad}
    return logits.detach().float(), embeds.grad.float(), grads


@pytest.mark.parametrize("component", ["scale", "scale_bias", "clamp", "latent_map"])
@pytest.mark.parametrize("architecture", ["standard", "topk", "topk_rescaled", "jumprelu", "gated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compact_splice_equals_dense_autograd_on_a_model(component, architecture, dtype, sae_factory,
                                                         input_ids) -> None:
    folder = sae_factory(architecture=architecture, hook="blocks.1.hook_resid_post")
    dense = _splice_outputs(folder, component, dtype, False, input_ids)
    sparse = _splice_outputs(folder, component, dtype, True, input_ids)
    tolerance = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(sparse[0], dense[0], **tolerance)
    torch.testing.assert_close(sparse[1], dense[1], **tolerance)
    assert sparse[2].keys() == dense[2].keys() and sparse[2]
    for name in dense[2]:
        torch.testing.assert_close(sparse[2][name], dense[2][name], **tolerance)
    assert dense[1].abs().max() > 0


def test_sae_tf32_is_validated_and_reaches_the_splice(sae_factory) -> None:
    folder = sae_factory(architecture="topk", hook="blocks.1.hook_resid_post")
    with pytest.raises(ValueError, match="sae_tf32"):
        ISaeRFTConfig(saes=[{"path": str(folder)}], sae_tf32="yes")
    peft_model = get_peft_model(make_model("llama"), ISaeRFTConfig(saes=[{"path": str(folder)}], sae_tf32=True))
    splice = peft_model.base_model.model.model.layers[1].isaerft_splices["default"]
    assert splice.tf32 and splice.selector.tf32
    assert torch.backends.cuda.matmul.allow_tf32 is False  # only inside the splice, never globally


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
def test_selectors_encode_in_blocks_and_pad_to_one_width(architecture, sae_factory, monkeypatch) -> None:
    import peft_isaerft.active_latents as active_latents

    sae = SAE.load_from_disk(str(sae_factory(architecture=architecture)))
    monkeypatch.setitem(active_latents.CHUNK_ELEMENTS, "cpu", 7 * sae.cfg.d_sae)  # seven tokens per block
    hidden = torch.cat([torch.randn(20, HIDDEN) * 0.2, torch.randn(20, HIDDEN) * 5])  # quiet blocks, then loud ones
    values, indices = selector_for(sae)(hidden)
    assert values.shape[0] == 40
    with torch.no_grad():
        torch.testing.assert_close(_dense_from(values, indices, sae.cfg.d_sae), sae.encode(hidden))


def test_scale_splice_shares_the_encoder_storage(sae_factory, input_ids) -> None:
    folder = sae_factory(architecture="topk", hook="blocks.1.hook_resid_post")
    peft_model = get_peft_model(make_model("llama"), ISaeRFTConfig(saes=[{"path": str(folder)}], init_weights=False))
    splice = peft_model.base_model.model.model.layers[1].isaerft_splices["default"]
    original = SAE.load_from_disk(str(folder)).W_enc.detach()
    peft_model(input_ids).logits.sum().backward()
    rows = splice.encoder_rows()
    assert rows.is_contiguous() and rows.data_ptr() == splice.sae.W_enc.data_ptr()  # no second copy
    torch.testing.assert_close(splice.sae.W_enc.detach(), original)  # same values, only the layout changed


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
@pytest.mark.parametrize("b_dec_to_input", [False, True])
def test_split_bf16_encoder_gives_the_float32_pre_activations(architecture, b_dec_to_input, sae_factory,
                                                               monkeypatch) -> None:
    import peft_isaerft.active_latents as active_latents

    sae = SAE.load_from_disk(str(sae_factory(architecture=architecture)))
    sae.cfg.apply_b_dec_to_input = b_dec_to_input
    with torch.no_grad():
        sae.b_dec.normal_()
    hidden = (torch.randn(30, HIDDEN) * 3).bfloat16()  # what a bfloat16 model hands the splice
    selector = selector_for(sae)
    expected = selector.pre_activations(hidden)  # CPU: the plain float32 product
    assert selector._split is None
    monkeypatch.setattr(active_latents, "SPLIT_ENCODER_DEVICES", {"cpu"})  # as on CUDA, with an exact emulation
    got = selector.pre_activations(hidden)
    assert selector._split is not None and selector._split[1].dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-6)
    parts = selector._split[1].float()
    one_part = (hidden.float() @ parts[:, :HIDDEN].T + selector._split[2] - expected).abs().max()
    assert one_part > 100 * (got - expected).abs().max()  # the lower parts matter: a bfloat16 encoder is far off
    with torch.no_grad():
        sae.W_enc.mul_(2)  # a changed encoder is split again
    changed = selector.pre_activations(hidden)
    monkeypatch.setattr(active_latents, "SPLIT_ENCODER_DEVICES", set())
    torch.testing.assert_close(changed, selector.pre_activations(hidden), atol=1e-5, rtol=1e-6)
    assert selector_for(sae).pre_activations(hidden.float()).dtype == torch.float32  # float32 input: plain product


@pytest.mark.parametrize("architecture", ["topk", "jumprelu"])
def test_a_bfloat16_model_trains_the_same_through_the_split_encoder(architecture, sae_factory, input_ids,
                                                                     monkeypatch) -> None:
    import peft_isaerft.active_latents as active_latents

    folder = sae_factory(architecture=architecture, hook="blocks.1.hook_resid_post")
    plain = _splice_outputs(folder, "scale", torch.bfloat16, True, input_ids)
    monkeypatch.setattr(active_latents, "SPLIT_ENCODER_DEVICES", {"cpu"})
    monkeypatch.setattr(active_latents.kernels, "ON_CPU", True)  # JumpReLU compacts pre-activations, as on CUDA
    splits = []
    monkeypatch.setattr(active_latents, "split_bf16", lambda rows, _f=active_latents.split_bf16: splits.append(1)
                        or _f(rows))
    split = _splice_outputs(folder, "scale", torch.bfloat16, True, input_ids)
    assert splits == [1]  # split once, then reused
    for got, expected in zip(split[:2], plain[:2], strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    for name in plain[2]:
        torch.testing.assert_close(split[2][name], plain[2][name], atol=1e-6, rtol=1e-6)


def test_sae_split_encoder_is_validated_and_reaches_the_selector(sae_factory) -> None:
    folder = sae_factory(architecture="topk", hook="blocks.1.hook_resid_post")
    with pytest.raises(ValueError, match="sae_split_encoder must be True or False"):
        ISaeRFTConfig(saes=[{"path": str(folder)}], sae_split_encoder="no")
    for split in (True, False):
        peft_model = get_peft_model(make_model("llama"), ISaeRFTConfig(saes=[{"path": str(folder)}],
                                                                       sae_split_encoder=split))
        assert peft_model.base_model.model.model.layers[1].isaerft_splices["default"].selector.split is split



def test_bf16_screen_keeps_the_float32_top_k_and_its_values(sae_factory, monkeypatch) -> None:
    import peft_isaerft.active_latents as active_latents

    monkeypatch.setattr(active_latents, "bf16_screen_available", lambda: True)  # as on an AVX512-BF16 or AMX CPU
    monkeypatch.setattr(active_latents, "SCREEN_MIN_LATENTS_PER_CANDIDATE", 0)  # a test-sized SAE
    sae = SAE.load_from_disk(str(sae_factory(architecture="topk", d_sae=1024)))
    hidden = torch.randn(300, HIDDEN) * 3
    with torch.no_grad():
        expected = sae.encode(hidden)
    screened = TopKSelector(sae)
    values, indices = screened(hidden)
    assert screened._screen is not None and screened._screen[1].dtype == torch.bfloat16  # the screen ran
    torch.testing.assert_close(_dense_from(values, indices, sae.cfg.d_sae), expected, atol=1e-6, rtol=1e-6)
    # the rescoring is what makes it exact: the bfloat16 product's own top-k is another set on some tokens
    monkeypatch.setattr(active_latents, "SCREEN_CANDIDATES", 0)
    values, indices = TopKSelector(sae)(hidden)
    assert ((_dense_from(values, indices, sae.cfg.d_sae) != 0) != (expected != 0)).any()


def test_bf16_screen_is_skipped_where_it_would_not_pay_or_would_miss_a_hook(sae_factory, monkeypatch) -> None:
    import peft_isaerft.active_latents as active_latents

    sae = SAE.load_from_disk(str(sae_factory(architecture="topk", d_sae=1024)))
    hidden = torch.randn(20, HIDDEN)

    def screened(**options) -> bool:
        selector = TopKSelector(sae, **options)
        selector(hidden)
        return selector._screen is not None

    monkeypatch.setattr(active_latents, "bf16_screen_available", lambda: True)
    assert not screened()  # 1024 latents for 24 candidates: the rescoring gather would cost more than it saves
    monkeypatch.setattr(active_latents, "SCREEN_MIN_LATENTS_PER_CANDIDATE", 0)
    assert screened()
    assert not screened(screen=False)
    seen = []
    handle = sae.hook_sae_acts_pre.register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    assert not screened()
    handle.remove()
    assert seen == [(20, 1024)]  # a hook on the pre-activations still sees them all
    monkeypatch.setattr(active_latents, "bf16_screen_available", lambda: False)  # bfloat16 emulated: slower
    assert not screened()


def test_sae_bf16_screen_is_validated_and_reaches_the_selector(sae_factory) -> None:
    folder = sae_factory(architecture="topk", hook="blocks.1.hook_resid_post")
    with pytest.raises(ValueError, match="sae_bf16_screen must be True or False"):
        ISaeRFTConfig(saes=[{"path": str(folder)}], sae_bf16_screen=1)
    for screen in (True, False):
        peft_model = get_peft_model(make_model("llama"), ISaeRFTConfig(saes=[{"path": str(folder)}],
                                                                       sae_bf16_screen=screen))
        assert peft_model.base_model.model.model.layers[1].isaerft_splices["default"].selector.screen is screen
