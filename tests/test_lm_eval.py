"""lm-evaluation-harness evaluates a base model with an ISaeRFT adapter through `python -m peft_isaerft.evaluate`,
on a small local task with a local dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import make_model, make_tokenizer
from peft import get_peft_model

from peft_isaerft import ISaeRFTConfig

pytest.importorskip("lm_eval")

TASK = """task: isaerft_toy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def _run(module: str, model_dir, adapter_dir, task_dir, out) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", module, "run", "--model", "hf", "--model_args",
               f"pretrained={model_dir},peft={adapter_dir}", "--tasks", "isaerft_toy", "--include_path",
               str(task_dir), "--device", "cpu", "--batch_size", "2", "--output_path", str(out)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def test_lm_eval_with_isaerft_adapter(sae_factory, tmp_path) -> None:
    model_dir, adapter_dir, task_dir = tmp_path / "model", tmp_path / "adapter", tmp_path / "tasks"
    make_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    model = get_peft_model(make_model("llama"), ISaeRFTConfig(
        saes=[{"path": str(sae_factory(hook="blocks.1.hook_resid_post"))}], component="bias", init_weights=False))
    model.save_pretrained(adapter_dir)
    task_dir.mkdir()
    data = tmp_path / "toy.jsonl"
    rows = [{"question": "is the sea wet? ", "choices": ["yes", "no"], "answer": 0},
            {"question": "is fire cold? ", "choices": ["yes", "no"], "answer": 1}] * 3
    data.write_text("\n".join(json.dumps(r) for r in rows))
    (task_dir / "isaerft_toy.yaml").write_text(TASK.format(data=data))

    result = _run("peft_isaerft.evaluate", model_dir, adapter_dir, task_dir, tmp_path / "out")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    files = list((tmp_path / "out").rglob("results*.json"))
    assert files, result.stdout[-2000:]
    results = json.loads(files[0].read_text())["results"]["isaerft_toy"]
    assert 0.0 <= results["acc,none"] <= 1.0

    # plain lm-eval cannot load the adapter: it does not import peft_isaerft
    plain = _run("lm_eval", model_dir, adapter_dir, task_dir, tmp_path / "plain")
    assert plain.returncode != 0
