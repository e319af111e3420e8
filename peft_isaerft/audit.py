"""`isaerft audit`: which SAE features does a dataset push? Fit a sparse ISaeRFT adapter to the data on the
untouched base model and report the latents it had to change.

Example:
    >>> from peft_isaerft.audit import AuditSettings, run_audit
    >>> records = run_audit(model, tokenizer, [{"path": "my_sae"}], rows, "audit-out")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .interpret import feature_report, render
from .interpret.report import FeatureRecord

logger = logging.getLogger(__name__)


# in gradient units (see peft_isaerft.sparsity), measured with benchmarks/recovery.py on d_model 64 models: 2e-3
# beat 5e-4 for biases there (precision@k 1.00 / 0.79 / 0.30 against 0.75 / 0.58 / 0.24 at k = 1 / 3 / 10), while at
# d_model 256 the smaller 5e-4 recovered more planted biases: gradients shrink as models widen, so pass a smaller
# --l1 for wide models
DEFAULT_L1 = {"bias": 2e-3, "scale": 2e-3, "scale_bias": 2e-3}


@dataclass
class AuditSettings:
    """The audit recipe. The defaults are the settings that recovered planted features best in
    ``benchmarks/recovery.py`` (see the README for its table)."""

    component: str = "bias"
    steps: int = 100
    lr: float = 0.05
    l1_coeff: float | None = None
    """None: the measured default for the component (:data:`DEFAULT_L1`)."""
    batch_size: int = 8
    max_length: int = 128
    top_k: int = 10


def parse_sae_argument(value: str) -> dict[str, str]:
    """A local sae-lens folder, else ``RELEASE/SAE_ID`` (the release name holds no slash)."""
    if Path(value).expanduser().is_dir():
        return {"path": value}
    if "/" not in value:
        raise ValueError(f"--sae {value!r} is neither an existing SAE folder nor RELEASE/SAE_ID.")
    release, sae_id = value.split("/", 1)
    return {"release": release, "sae_id": sae_id}


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """jsonl rows with ``text``, or ``prompt`` and ``completion``.

    Raises:
        ValueError: a line that is not JSON or has neither form (the message names file and line).
    """
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number} is not JSON: {error}") from error
        if not isinstance(row, dict) or not ("text" in row or ("prompt" in row and "completion" in row)):
            raise ValueError(f"{path}:{number} needs a 'text' field, or 'prompt' and 'completion'.")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no rows.")
    return rows


def tokenise_rows(tokenizer: Any, rows: Sequence[dict[str, str]], max_length: int) -> list[dict[str, list[int]]]:
    """Token ids with labels; prompt tokens are masked so the loss is on completions only."""
    out = []
    for row in rows:
        if "text" in row:
            ids = tokenizer(row["text"], truncation=True, max_length=max_length)["input_ids"]
            out.append({"input_ids": ids, "labels": list(ids)})
        else:
            prompt = tokenizer(row["prompt"])["input_ids"]
            completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
            ids = (prompt + completion)[:max_length]
            labels = ([-100] * len(prompt) + completion)[:max_length]
            out.append({"input_ids": ids, "labels": labels})
    return out


def padding_collator(pad_id: int):
    """Pads ``input_ids`` with ``pad_id`` and ``labels`` with -100 to the longest row, and builds the attention mask."""

    def collate(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        return {
            "input_ids": torch.tensor([r["input_ids"] + [pad_id] * (width - len(r["input_ids"])) for r in rows]),
            "labels": torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"]))
                                            for r in rows]),
        }

    return collate


def fit_adapter(model: Any, tokenizer: Any, saes: list[dict[str, str]], rows: Sequence[dict[str, str]],
                settings: AuditSettings, output_dir: str | Path, progress: bool = True) -> Any:
    """Attach a fresh sparse ISaeRFT adapter to ``model`` and fit it to ``rows`` with transformers.Trainer."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokenised = tokenise_rows(tokenizer, rows, settings.max_length)
    return fit_adapter_on_tokens(model, saes, tokenised, settings, output_dir, pad_id, progress)


def fit_adapter_on_tokens(model: Any, saes: list[dict[str, str]], tokenised: Sequence[dict[str, list[int]]],
                          settings: AuditSettings, output_dir: str | Path, pad_id: int = 0,
                          progress: bool = True) -> Any:
    """:func:`fit_adapter` for rows that are already token ids (``input_ids`` and ``labels``)."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from . import ISaeRFTConfig

    l1_coeff = DEFAULT_L1[settings.component] if settings.l1_coeff is None else settings.l1_coeff
    peft_model = get_peft_model(model, ISaeRFTConfig(saes=saes, component=settings.component, l1_coeff=l1_coeff))
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=settings.steps, per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.lr, lr_scheduler_type="constant", save_strategy="no", report_to=[],
        logging_steps=max(1, settings.steps // 10), use_cpu=not torch.cuda.is_available(), seed=0,
        remove_unused_columns=False, disable_tqdm=not progress, log_level="warning" if not progress else "passive",
    )
    dataset = Dataset.from_list(list(tokenised))
    Trainer(model=peft_model, args=args, train_dataset=dataset, data_collator=padding_collator(pad_id)).train()
    return peft_model.eval()


def run_audit(model: Any, tokenizer: Any, saes: list[dict[str, str]], rows: Sequence[dict[str, str]],
              output_dir: str | Path, settings: AuditSettings | None = None,
              progress: bool = True) -> list[FeatureRecord]:
    """Fit the audit adapter and write ``adapter/``, ``report.json`` and ``report.html`` under ``output_dir``."""
    settings = settings or AuditSettings()
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    peft_model = fit_adapter(model, tokenizer, saes, rows, settings, output / "trainer", progress)
    peft_model.save_pretrained(output / "adapter")
    records = feature_report(peft_model, top_k=settings.top_k)
    (output / "report.json").write_text(render(records, "json"))
    (output / "report.html").write_text(render(records, "html", title="ISaeRFT audit: features the data pushes"))
    return records


def audit_command(model_name: str, sae_arguments: list[str], data: str, output: str,
                  settings: AuditSettings) -> list[FeatureRecord]:
    """What ``isaerft audit`` runs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saes = [parse_sae_argument(value) for value in sae_arguments]
    rows = read_rows(data)
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_name)
    records = run_audit(model, tokenizer, saes, rows, output, settings)
    print(render(records, "table"))
    print(f"wrote {output}/adapter, {output}/report.json and {output}/report.html")
    return records
