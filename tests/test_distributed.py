"""Multi-process training: the HF Trainer under torchrun with 2 CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {tests!r})
    import torch
    from conftest import make_model
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments
    from peft_isaerft import ISaeRFTConfig

    sae, out, resume = sys.argv[1], sys.argv[2], sys.argv[3]
    model = get_peft_model(make_model("llama"), ISaeRFTConfig(saes=[{{"path": sae}}], component="scale_bias"))
    generator = torch.Generator().manual_seed(0)
    starts = torch.randint(3, 40, (32, 1), generator=generator)
    ids = (starts + torch.arange(16)).tolist()
    args = TrainingArguments(output_dir=out, max_steps=4, per_device_train_batch_size=2, learning_rate=5e-2,
                             save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, ddp_backend="gloo",
                             seed=0, disable_tqdm=True, lr_scheduler_type="constant")
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({{"input_ids": ids, "labels": ids}}))
    trainer.train(resume_from_checkpoint=resume if resume != "-" else None)
    sae_requires_grad = model.base_model.model.model.layers[1].isaerft_splices["default"].sae.W_dec.requires_grad
    params = {{n: p.detach().tolist() for n, p in model.named_parameters() if p.requires_grad}}
    with open(os.path.join(out, f"rank{{os.environ['RANK']}}.json"), "w") as handle:
        json.dump({{"params": params, "sae_requires_grad": sae_requires_grad}}, handle)
""")


def _launch(script: Path, sae: Path, out: Path, resume: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
               str(script), str(sae), str(out), resume]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def test_two_process_training_resumes_and_agrees(sae_factory, tmp_path) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(tests=str(TESTS)))
    sae = sae_factory(hook="blocks.1.hook_resid_post")
    first = tmp_path / "first"
    _launch(script, sae, first, "-")
    ranks = [json.loads((first / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["params"] == ranks[1]["params"]  # both ranks end with the same adapter
    assert not ranks[0]["sae_requires_grad"]
    checkpoints = sorted(p.name for p in first.iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]  # written once, not per rank
    assert (first / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert not list((first / "checkpoint-2").glob("model*.safetensors"))  # only the adapter, no base or SAE weights

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    _launch(script, sae, resumed, str(first / "checkpoint-2"))
    final = json.loads((resumed / "rank0.json").read_text())["params"]
    for name, values in ranks[0]["params"].items():
        assert final[name] == pytest.approx(values, abs=1e-5)
