"""Training with the standard transformers.Trainer: only adapter parameters move; checkpointing; resume; L1."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, make_model
from datasets import Dataset
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

from peft_isaerft import ISaeRFTConfig


def _dataset(n: int = 16, length: int = 16) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    # a learnable pattern: every sequence counts upwards, so the adapter has something to fit
    starts = torch.randint(3, VOCAB - length, (n, 1), generator=generator)
    ids = (starts + torch.arange(length)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def _args(tmp_path, **overrides) -> TrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    defaults.update(overrides)
    return TrainingArguments(**defaults)


def _peft_model(sae_factory, component="scale_bias", **config):
    saes = [
        {"path": str(sae_factory(hook="blocks.1.hook_resid_post", seed=0))},
        {"path": str(sae_factory(hook="blocks.2.hook_mlp_out", seed=1))},
    ]
    return get_peft_model(make_model("llama"), ISaeRFTConfig(saes=saes, component=component, **config))


def test_trainer_changes_only_adapter_parameters(sae_factory, tmp_path) -> None:
    model = _peft_model(sae_factory)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    splice = model.base_model.model.model.layers[1].isaerft_splices["default"]
    sae_before = splice.sae.W_dec.detach().clone()
    result = Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset()).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("isaerft_" in n for n in changed)
    assert len(changed) == 4  # scale and bias at both attach points
    torch.testing.assert_close(splice.sae.W_dec, sae_before, rtol=0, atol=0)


def test_gradient_checkpointing_gives_the_same_gradients(sae_factory, tmp_path) -> None:
    batch = {k: torch.tensor(v[:4]) for k, v in _dataset()[:4].items()}
    grads = []
    for checkpointing in (False, True):
        model = _peft_model(sae_factory, init_weights=False)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            model.enable_input_require_grads()
        model.train()
        model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 4
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4)
    # and the Trainer runs with it switched on
    model = _peft_model(sae_factory)
    Trainer(
        model=model, args=_args(tmp_path, gradient_checkpointing=True, max_steps=2), train_dataset=_dataset()
    ).train()


def test_resume_from_checkpoint_matches_uninterrupted_run(sae_factory, tmp_path) -> None:
    straight = _peft_model(sae_factory)
    Trainer(model=straight, args=_args(tmp_path / "a"), train_dataset=_dataset()).train()

    interrupted = _peft_model(sae_factory)
    Trainer(
        model=interrupted,
        args=_args(tmp_path / "b", max_steps=4, save_strategy="steps", save_steps=2),
        train_dataset=_dataset(),
    ).train()
    checkpoint = tmp_path / "b" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").exists()
    resumed = _peft_model(sae_factory)
    Trainer(model=resumed, args=_args(tmp_path / "b", max_steps=4), train_dataset=_dataset()).train(
        resume_from_checkpoint=str(checkpoint)
    )
    expected = {n: p for n, p in straight.named_parameters() if p.requires_grad}
    for name, parameter in resumed.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(parameter, expected[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("component", ["bias", "scale"])
def test_proximal_l1_in_plain_trainer_zeroes_most_latents(component, sae_factory, tmp_path) -> None:
    dense = _peft_model(sae_factory, component=component)
    Trainer(model=dense, args=_args(tmp_path / "dense", max_steps=8), train_dataset=_dataset()).train()
    sparse = _peft_model(sae_factory, component=component, l1_coeff=0.05)
    Trainer(model=sparse, args=_args(tmp_path / "sparse", max_steps=8), train_dataset=_dataset()).train()

    def nonzero(model) -> int:
        return sum(int((p != 0).sum()) for n, p in model.named_parameters() if p.requires_grad)

    total = sum(p.numel() for p in dense.parameters() if p.requires_grad)
    assert nonzero(dense) > 0.9 * total
    assert 0 < nonzero(sparse) < 0.5 * nonzero(dense)


def test_latent_allow_and_deny_lists(sae_factory, tmp_path) -> None:
    model = _peft_model(sae_factory, component="bias", latent_allowlist={"0": [1, 2, 3]}, latent_denylist={"1": [0, 5]})
    Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset()).train()
    first = model.base_model.model.model.layers[1].isaerft_bias["default"]
    second = model.base_model.model.model.layers[2].mlp.isaerft_bias["default"]
    assert set(first.nonzero().flatten().tolist()) <= {1, 2, 3}
    assert first[[1, 2, 3]].abs().sum() > 0
    assert second[[0, 5]].abs().sum() == 0 and (second != 0).sum() > 10


def test_nonnegative_proximal_step_shrinks_and_projects() -> None:
    from peft_isaerft.sparsity import l1_coefficient, register_l1

    parameter = torch.nn.Parameter(torch.tensor([1.0, -1.0, 0.05, -0.05]))
    register_l1(parameter, 0.1, nonnegative=True)
    assert l1_coefficient(parameter) == 0.1
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    parameter.grad = torch.zeros(4)
    optimizer.step()
    # plain proximal SGD (no Adam state): shrink by lr * l1 = 0.1, and nothing may go below zero
    torch.testing.assert_close(parameter.detach(), torch.tensor([0.9, 0.0, 0.0, 0.0]))

    signed = torch.nn.Parameter(torch.tensor([1.0, -1.0, 0.05]))
    register_l1(signed, 0.1)
    signed.grad = torch.zeros(3)
    torch.optim.SGD([signed], lr=1.0).step()
    torch.testing.assert_close(signed.detach(), torch.tensor([0.9, -0.9, 0.0]))


def _dictionary(d_sae: int = 1024, d_model: int = 48, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(d_sae, d_model, generator=generator), dim=-1)


def test_sparse_code_recovers_a_sparse_combination_in_an_overcomplete_dictionary() -> None:
    from peft_isaerft.sparsity import sparse_code

    directions = _dictionary()  # 1024 unit directions in 48 dimensions: far from orthogonal
    planted = [3, 200, 517, 900]
    target = torch.tensor([5.0, 3.0, 4.0, 6.0]) @ directions[planted]
    code, lambda_max = sparse_code(target, directions, l1=0.1)
    assert lambda_max == pytest.approx(float((directions @ target).max()))
    assert sorted(code.topk(4).indices.tolist()) == planted
    assert (code >= 0).all()
    # the code explains the target up to the lasso's shrinkage
    assert torch.nn.functional.cosine_similarity(code @ directions, target, dim=0) > 0.98
    # l1 = 1 is lambda_max itself: nothing survives
    assert (sparse_code(target, directions, l1=1.0)[0] == 0).all()


def test_sparse_code_signs_and_allowed_latents() -> None:
    from peft_isaerft.sparsity import sparse_code

    directions = _dictionary(seed=1)
    target = 4.0 * directions[10] - 4.0 * directions[20]
    nonnegative, _ = sparse_code(target, directions, l1=0.1)
    assert nonnegative[20] == 0 and (nonnegative >= 0).all()
    signed, lambda_max = sparse_code(target, directions, l1=0.1, nonnegative=False)
    assert lambda_max == pytest.approx(float((directions @ target).abs().max()))
    assert set(signed.abs().topk(2).indices.tolist()) == {10, 20} and signed[20] < 0 < signed[10]
    allowed = torch.ones(len(directions))
    allowed[10] = 0
    masked, _ = sparse_code(target, directions, l1=0.1, nonnegative=False, allowed=allowed)
    assert masked[10] == 0 and masked[20] < 0
