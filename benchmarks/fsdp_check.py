"""The README's FSDP recipe, run: an ISaeRFT adapter trained a few steps under FSDP, saved, and reloaded elsewhere.

    accelerate launch --num_processes 1 --use_fsdp --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP \\
        --fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer --fsdp_use_orig_params true \\
        --fsdp_state_dict_type SHARDED_STATE_DICT benchmarks/fsdp_check.py train OUT
    python benchmarks/fsdp_check.py check OUT

``train`` builds a Llama model with random weights and TopK sae-lens SAEs, trains a ``scale_bias`` adapter at two
layers with the plain Trainer under FSDP (one process exercises the wrapping, the sharded state dict and the save),
writes sharded checkpoints on the way, saves the adapter with ``trainer.save_model`` and writes the trained model's
logits on fixed inputs. ``check``, in a
fresh process without FSDP, loads the same base model and the saved adapter with ``PeftModel.from_pretrained`` and
compares its logits with the trained model's; it prints one JSON line and exits non-zero when they differ.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from sae_lens import TopKSAE, TopKSAEConfig
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

import peft_isaerft  # noqa: F401
from peft_isaerft import ISaeRFTConfig

VOCAB = 512


def base_model(device: str) -> torch.nn.Module:
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=256, initializer_range=0.2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(device)


def probe(device: str) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(7)).to(device)


def train(out: Path) -> None:
    from datasets import Dataset

    device = "cuda" if torch.cuda.is_available() else "cpu"
    saes = []
    for layer in (1, 2):
        torch.manual_seed(layer)
        cfg = TopKSAEConfig(d_in=128, d_sae=1024, k=16)
        cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
        path = out / f"sae_{layer}"
        TopKSAE(cfg).save_model(str(path))
        saes.append({"path": str(path)})
    model = get_peft_model(base_model(device), ISaeRFTConfig(saes=saes, component="scale_bias"))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (64, 32), generator=generator).tolist()
    args = TrainingArguments(output_dir=str(out / "run"), max_steps=6, per_device_train_batch_size=8,
                             learning_rate=5e-2, report_to=[], save_strategy="steps", save_steps=3, disable_tqdm=True,
                             lr_scheduler_type="constant", use_cpu=device == "cpu")
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}))
    trainer.train()
    wrapped = type(trainer.model_wrapped).__name__
    checkpoint = sorted((out / "run").glob("checkpoint-*"))
    checkpoint_files = sorted(p.name for p in checkpoint[-1].rglob("*") if p.is_file()) if checkpoint else []
    if trainer.is_fsdp_enabled:  # as PEFT's FSDP guide: gather the (small) adapter before saving it
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(out / "adapter"))
    model.eval()
    with torch.no_grad():
        logits = trainer.model_wrapped(input_ids=probe(device)).logits.float().cpu()
    if trainer.accelerator.is_main_process:
        torch.save(logits, out / "trained_logits.pt")
        (out / "train.json").write_text(json.dumps({"wrapped_by": wrapped, "device": device,
                                                    "fsdp": trainer.is_fsdp_enabled,
                                                    "sharded_checkpoint_files": checkpoint_files}))


def check(out: Path) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = PeftModel.from_pretrained(base_model(device), str(out / "adapter")).eval()
    with torch.no_grad():
        logits = model(input_ids=probe(device)).logits.float().cpu()
    trained = torch.load(out / "trained_logits.pt")
    with model.disable_adapter(), torch.no_grad():
        base = model(input_ids=probe(device)).logits.float().cpu()
    files = sorted(p.name for p in (out / "adapter").iterdir())
    result = {**json.loads((out / "train.json").read_text()), "adapter_files": files,
              "max_abs_difference": float((logits - trained).abs().max()),
              "adapter_moved_logits_by": float((logits - base).abs().max())}
    result["equal"] = result["max_abs_difference"] <= 1e-4 and result["adapter_moved_logits_by"] > 1e-3
    print(json.dumps(result))
    return 0 if result["equal"] else 1


if __name__ == "__main__":
    stage, folder = sys.argv[1], Path(sys.argv[2])
    folder.mkdir(parents=True, exist_ok=True)
    if stage == "train":
        train(folder)
    else:
        sys.exit(check(folder))
