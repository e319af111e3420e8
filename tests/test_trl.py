"""TRL trainers with an ISaeRFT adapter: SFT (text and prompt/completion), DPO (reference = adapter disabled) and
GRPO (reinforcement learning with a reward function)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, make_tokenizer
from datasets import Dataset
from peft import get_peft_model

from peft_isaerft import ISaeRFTConfig

trl = pytest.importorskip("trl")


def _peft_model(sae_factory, component="scale_bias"):
    saes = [{"path": str(sae_factory(hook="blocks.1.hook_resid_post"))}]
    return get_peft_model(make_model("llama"), ISaeRFTConfig(saes=saes, component=component))


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_only_adapter_changed(model, before) -> None:
    changed = {n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert changed, "nothing was trained"
    assert all("isaerft_" in n for n in changed), changed


COMMON = dict(
    max_steps=3,
    per_device_train_batch_size=4,
    learning_rate=5e-2,
    report_to=[],
    save_strategy="no",
    logging_steps=1,
    use_cpu=True,
    disable_tqdm=True,
    bf16=False,
)  # TRL turns on bf16 autocast by default


@pytest.mark.parametrize("kind", ["text", "prompt_completion"])
def test_sft_trainer(kind, sae_factory, tmp_path) -> None:
    model = _peft_model(sae_factory)
    before = _snapshot(model)
    if kind == "text":
        data = Dataset.from_dict({"text": ["the sea is wide and blue."] * 8})
    else:
        data = Dataset.from_dict({"prompt": ["where is the boat? "] * 8, "completion": ["on the sea."] * 8})
    trainer = trl.SFTTrainer(
        model=model,
        args=trl.SFTConfig(output_dir=str(tmp_path), max_length=64, **COMMON),
        train_dataset=data,
        processing_class=make_tokenizer(),
    )
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    _assert_only_adapter_changed(model, before)


def test_dpo_trainer_uses_the_disabled_adapter_as_reference(sae_factory, tmp_path) -> None:
    tokenizer = make_tokenizer()
    config = ISaeRFTConfig(saes=[{"path": str(sae_factory(hook="blocks.1.hook_resid_post"))}], component="scale_bias")
    data = Dataset.from_dict(
        {"prompt": ["is the sea calm? "] * 8, "chosen": ["yes, very calm."] * 8, "rejected": ["no, stormy!"] * 8}
    )
    args = trl.DPOConfig(output_dir=str(tmp_path), max_length=64, **COMMON)
    trainer = trl.DPOTrainer(
        model=make_model("llama"),
        ref_model=None,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=config,
    )
    model = trainer.model
    assert trainer.ref_model is None and list(model.peft_config) == ["default"]  # no second copy in memory
    before = _snapshot(model)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    _assert_only_adapter_changed(model, before)
    # the reference log-probs are the base model's: with the adapter disabled the outputs equal the bare model's
    ids = torch.tensor([tokenizer("is the sea calm? yes")["input_ids"]])
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        reference = model(ids).logits
    with torch.no_grad():
        bare = make_model("llama")(ids).logits
    torch.testing.assert_close(reference, bare)


def test_grpo_trainer_with_a_reward_function(sae_factory, tmp_path) -> None:
    model = _peft_model(sae_factory, component="bias")
    before = _snapshot(model)

    def reward_variety(completions, **kwargs):
        return [float(len(set(str(c)))) for c in completions]

    data = Dataset.from_dict({"prompt": ["tell me about the sea: "] * 8})
    args = trl.GRPOConfig(
        output_dir=str(tmp_path), num_generations=4, max_completion_length=8, generation_batch_size=8, **COMMON
    )
    trainer = trl.GRPOTrainer(
        model=model, reward_funcs=reward_variety, args=args, train_dataset=data, processing_class=make_tokenizer()
    )
    trainer.train()
    _assert_only_adapter_changed(model, before)
