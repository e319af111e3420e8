"""The Triton kernels of the compact scale splice, run by Triton's interpreter on CPU tensors (on a GPU they compile;
the GPU preset of the speed benchmark checks them there against dense autograd)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model
from peft import get_peft_model

from peft_isaerft import ISaeRFTConfig, kernels

triton = pytest.importorskip("triton")  # conftest asks for its interpreter, so the kernels run on CPU tensors


@pytest.fixture(autouse=True)
def interpreted(monkeypatch):
    if not triton.knobs.runtime.interpret:
        pytest.fail("Triton was imported before conftest could ask for its interpreter (TRITON_INTERPRET=1)")
    monkeypatch.setattr(kernels, "ON_CPU", True)


def _slots(tokens: int, width: int, d_sae: int, live_fraction: float = 0.6):
    generator = torch.Generator().manual_seed(0)
    indices = torch.randint(0, d_sae, (tokens, width), generator=generator)
    values = torch.rand(tokens, width, generator=generator) + 0.1
    values[torch.rand(tokens, width, generator=generator) > live_fraction] = 0.0  # padding slots
    values[:, 16:32] = 0.0  # a whole block of them
    return indices, values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("tokens", "width", "d"), [(5, 3, 40), (19, 20, 300)])  # several slot and column blocks
def test_weighted_row_sum_equals_embedding_bag(dtype, tokens, width, d) -> None:
    rows = torch.randn(64, d).to(dtype)
    indices, weights = _slots(tokens, width, 64)
    weights = weights.to(dtype)
    got = kernels.weighted_row_sum(indices, weights, rows)
    expected = torch.nn.functional.embedding_bag(indices, rows.float(), per_sample_weights=weights.float(), mode="sum")
    assert got.dtype == dtype
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 5e-2, "rtol": 2e-2}
    torch.testing.assert_close(got.float(), expected, **tolerance)


@pytest.mark.parametrize(("tokens", "width", "d"), [(5, 3, 40), (19, 20, 300)])
def test_active_dots_reads_live_slots_only(tokens, width, d) -> None:
    rows = torch.randn(64, d)
    grad = torch.randn(tokens, d)
    indices, values = _slots(tokens, width, 64)
    got = kernels.active_dots(grad, indices, values, rows)
    expected = (grad @ rows.T).gather(1, indices) * (values != 0)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("component", ["scale", "clamp", "latent_map"])
def test_splice_through_the_kernels_equals_dense_autograd(component, sae_factory, input_ids, monkeypatch) -> None:
    import peft_isaerft.components as components

    calls = []
    for name in ("weighted_row_sum", "active_dots", "threshold_compact"):
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    folder = sae_factory(architecture="jumprelu", hook="blocks.1.hook_resid_post")
    outputs = []
    for sparse in (False, True):
        model = make_model("llama")
        peft_model = get_peft_model(model, ISaeRFTConfig(saes=[{"path": str(folder)}], init_weights=False,
                                                         component=component))
        layer = peft_model.base_model.model.model.layers[1]
        layer.isaerft_splices["default"].sparse_backward = sparse
        embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
        logits = peft_model(inputs_embeds=embeds).logits
        (logits * torch.linspace(-1, 1, logits.shape[-1])).pow(2).mean().backward()
        first = next(p for n, p in layer.named_parameters() if p.requires_grad)
        outputs.append((logits.detach(), embeds.grad, first.grad))
    assert components.kernels.usable(torch.zeros(1))
    # the latent map gathers its r-wide source rows with embedding_bag; only its input gradient needs a kernel
    row_sums, dots = (1, 0) if component == "latent_map" else (2, 1)
    assert calls.count("weighted_row_sum") == row_sums and calls.count("active_dots") == dots
    assert calls.count("threshold_compact") == 1  # the JumpReLU active set without dense latents
    for dense, compact in zip(*outputs, strict=True):
        torch.testing.assert_close(compact, dense, atol=1e-5, rtol=1e-4)


def test_threshold_compact_keeps_exactly_the_live_entries_in_column_order() -> None:
    generator = torch.Generator().manual_seed(3)
    pre = torch.randn(9, 2500, generator=generator)
    threshold = torch.rand(2500, generator=generator) + 1.5
    live = pre > threshold
    width = int(live.sum(-1).max()) + 2
    values, indices, counts = kernels.threshold_compact(pre, threshold, width)
    torch.testing.assert_close(counts.long(), live.sum(-1))
    for token in range(9):
        columns = live[token].nonzero().flatten()
        assert indices[token, : len(columns)].tolist() == columns.tolist()
        torch.testing.assert_close(values[token, : len(columns)], pre[token, columns])
        assert (values[token, len(columns):] == 0).all()
    narrow, _, counts = kernels.threshold_compact(pre, threshold, 2)  # overflow: counted, never written past width
    assert narrow.shape == (9, 2) and (counts.long() == live.sum(-1)).all()


@pytest.mark.parametrize("architecture", ["standard", "jumprelu"])
def test_compact_threshold_selection_equals_encode(architecture, sae_factory, caplog) -> None:
    from sae_lens import SAE

    from peft_isaerft.active_latents import ThresholdSelector

    sae = SAE.load_from_disk(str(sae_factory(architecture=architecture)))
    selector = ThresholdSelector(sae)
    hidden = torch.randn(30, sae.cfg.d_in)
    values, indices = selector(hidden)
    with torch.no_grad():
        latents = sae.encode(hidden)
    dense = torch.zeros_like(latents).scatter_add_(1, indices, values)
    torch.testing.assert_close(dense, latents, atol=1e-6, rtol=1e-5)
    selector.width = 4  # too narrow: the overflow is counted and reported on the next call, and the bound widens
    selector(hidden)
    selector(hidden[:2])
    assert selector.width == 8 and "active latents" in caplog.text
