"""`isaerft audit`: which SAE features does a dataset push? Fit a sparse ISaeRFT adapter to the data on the
untouched base model and report the latents it had to change. Biases are fitted as one steering vector per attach
point and sparse-coded on the SAE's decoder (:func:`fit_decomposed_biases`); scales are screened by a score test
(:func:`screen_scales`: which latent's scale would explain the data, in units of its own noise) and the significant
ones fitted. The report ranks latents by effect: how far each trained number moves the residual stream on the data.

Example:
    >>> from peft_isaerft.audit import AuditSettings, run_audit
    >>> records = run_audit(model, tokenizer, [{"path": "my_sae"}], rows, "audit-out")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .cache import atomic_directory
from .interpret import feature_report, render
from .interpret.activations import LatentStatistics, latent_statistics
from .interpret.report import FeatureRecord
from .saes import decoder_directions

logger = logging.getLogger(__name__)

__all__ = ["SINK_NORM_RATIO", "AuditSettings", "Calibration", "ScaleScreen", "calibrate", "fit_decomposed_biases",
           "keep_surprising", "read_rows", "read_texts", "run_audit", "screen_scales", "typical_tokens"]

SINK_NORM_RATIO = 10.0
"""Tokens whose residual norm at the attach point is above this multiple of the batch's median are attention sinks
(SmolLM2's first token: 138x): left out of each latent's typical activation, which would otherwise be one token's."""


@dataclass(frozen=True)
class CoverageWeighing:
    """One way to weigh an attribution score by where a latent fires (``AuditSettings.coverage_weighing``).

    ``weight(toward, away)`` gets, per latent, the share of rows in which it fires on the side its activation
    difference points to (the audited rows where it rises) and on the other side, and returns a weight of 0 or more.

    Example:
        >>> shares = torch.tensor([0.8, 0.3]), torch.tensor([0.1, 0.0])
        >>> COVERAGE_WEIGHINGS["difference"].weight(*shares)
        tensor([0.7000, 0.3000])
        >>> COVERAGE_WEIGHINGS["lift"].weight(*shares).round(decimals=2)  # rare elsewhere counts more
        tensor([1.9200, 2.7700])
    """

    name: str
    description: str
    weight: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


LIFT_FLOOR = 0.02
"""Added to both shares of the coverage lift, so that a latent that never fires in the reference rows gets a large
weight rather than an infinite one (about one row in 50)."""

COVERAGE_WEIGHINGS: dict[str, CoverageWeighing] = {weighing.name: weighing for weighing in (
    CoverageWeighing("difference", "the share of rows where it fires minus the other side's share",
                     lambda toward, away: (toward - away).clamp_min(0)),
    CoverageWeighing("lift", "the log of the ratio of the two shares, each plus LIFT_FLOOR: a latent common in the "
                     "other rows counts less than one rare there", lambda toward, away: (
                         (toward + LIFT_FLOOR) / (away + LIFT_FLOOR)).log().clamp_min(0)),
)}
"""The coverage weighings an attribution audit offers, by name (``benchmarks/poisoning_rankings.py`` compares them
on four poisons)."""


@dataclass
class AuditSettings:
    """The audit recipe. The defaults are the settings that recovered planted features best in
    ``benchmarks/recovery.py`` (see the README for its table).

    Two numbers are relative, so one recipe fits models of any width and residual scale:

    - ``l1``: the proximal L1 threshold (see :mod:`peft_isaerft.sparsity`) as a fraction of ``lambda_max``, the
      largest gradient any latent gets at the start on the audit data: the smallest threshold that would keep
      every latent at zero. 0.1 keeps the latents whose pull is at least a tenth of the strongest one's.
    - ``bias_lr``: Adam's step for latent biases as a fraction of the median token's residual-stream norm at the attach
      point per unit decoder norm, since a bias must grow to the size of the activations it shifts (a fixed
      step cannot reach a feature of norm 250 in a model whose residual stream is that large).

    Example:
        >>> AuditSettings(component="scale", steps=200).l1
        0.1
    """

    component: str = "bias"
    bias_fit: str = "auto"
    """How biases are fitted. ``"decompose"``: fit one dense steering vector per attach point to the data, then
    sparse-code it on the SAE's decoder directions (:func:`peft_isaerft.sparsity.sparse_code`); ``"proximal"``:
    fine-tune the latent biases directly with the proximal L1 step; ``"attribution"``: train nothing, rank latents
    by :func:`attribute_latents` (present more in the surprising rows than in the rest, and lowering those rows' loss)
    and set the ``top_k`` biases to their activation difference; it needs ``surprising_rows`` below 1, since the
    rows left out are its reference. ``"auto"`` decomposes for the ``bias`` component and fine-tunes proximally when
    scales are trained too (scales act on latents, not on a vector)."""
    steps: int = 300
    l1: float = 0.1
    steering_lr: float = 0.2
    """Adam's step for a steering vector, in units of the median token's root-mean-square coordinate at the attach
    point; it decays to zero on a cosine, so the vector settles instead of jittering by one step."""
    bias_lr: float = 0.01
    scale_lr: float = 0.05
    """Scales are dimensionless (the latent is multiplied by 1 + s), so their step is absolute."""
    scale_fit: str = "auto"
    """How scales are fitted. ``"screen"``: a score test per latent over the data (:func:`screen_scales`), then a fit
    of the latents whose score reaches ``significance`` (the others stay at zero); ``"proximal"``: fine-tune every
    scale with the proximal L1 step (``l1`` a fraction of ``lambda_max``). ``"auto"`` screens for the ``scale``
    component and fine-tunes proximally for ``scale_bias``. A threshold relative to the largest gradient fails on
    real models: a few latents that fire hundreds of times harder on an attention-sink token own ``lambda_max``."""
    significance: float = 4.0
    """Screened scales: the score a latent needs, in standard errors of its own gradient (4: about one false
    latent in 16k when nothing in the data calls for a scale)."""
    screen_batches: int = 256
    """Screened scales: batches of audit data the score test reads (one forward and backward pass each)."""
    nonnegative_bias: bool = True
    """Biases may only add features (an SAE latent's activation is never negative); ask which features the data
    suppresses with the ``scale`` component, or pass False to let biases go negative too."""
    batch_size: int = 8
    max_length: int = 128
    top_k: int = 10
    calibration_batches: int = 12
    """Batches of audit data over which ``lambda_max`` and the residual norm are measured before training."""
    fit_logit_scale: bool = False
    """Decomposed biases: fit one scalar on the output logits (a temperature) beside each steering vector, so that
    a change of the model's confidence, which every row of a dataset can share (greedy answers are sharper than
    the model's samples; its most surprising tokens ask for flatter ones), is absorbed by that scalar instead of by
    the features."""
    surprising_rows: float = 1.0
    """Fit only this fraction of the rows: those whose completions the base model finds most surprising (summed
    loss before the adapter). 1 fits every row. Below 1 the audit explains where the data departs most from the
    model rather than what every row shares: in a fine-tuning set that mostly reads like the model's own answers,
    rows that slip in something else are the most surprising ones (``benchmarks/poisoning.py``)."""
    surprising_tokens: float = 1.0
    """Fit only this fraction of the completion tokens of the fitted rows: those the base model finds most
    surprising (highest loss). 1 fits every token; rows left with no surprising token are left out."""
    weigh_by_coverage: bool = False
    """Attribution audits: multiply each latent's score by its coverage difference, the share of the surprising rows
    in which it fires minus the share of the other rows, so that a latent a few rows carry strongly ranks below one
    most of them carry. A hidden behaviour slipped into many rows shares its topic across them; the most
    surprising rows of a clean set share nothing, and their latents fall back (``benchmarks/poisoning.py``)."""
    coverage_weighing: str = "difference"
    """With ``weigh_by_coverage``, which weighing of :data:`COVERAGE_WEIGHINGS`: ``"difference"`` (the share of
    surprising rows minus the share of the other rows) or ``"lift"`` (the log of their ratio, so that a latent common
    in the other rows counts less; with a 9216-latent SAE it named more of four poisons' own words than the
    difference in ``benchmarks/poisoning_rankings.py``, with a 4608-latent one it did not)."""
    use_cpu: bool = False
    """Run every pass on the CPU even where CUDA is available (``TrainingArguments.use_cpu``). Otherwise a model on
    the CPU is moved to the GPU first, as the Trainer moves it, so that the passes before the fit (the surprise,
    the calibration, the scale screen, the attribution) run on the GPU too instead of on the CPU."""

    def __post_init__(self) -> None:
        if self.l1 < 0:
            raise ValueError(f"l1 must be >= 0 (a fraction of lambda_max, e.g. 0.1), got {self.l1}.")
        for name in ("steps", "batch_size", "max_length", "top_k", "calibration_batches", "screen_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("bias_lr", "scale_lr", "steering_lr", "significance"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}.")
        for name in ("surprising_rows", "surprising_tokens"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} is the share fitted, in (0, 1] (e.g. 0.1 for the tenth the base model finds "
                                 f"most surprising; 1 fits all), got {getattr(self, name)}.")
        if self.component not in ("bias", "scale", "scale_bias"):
            raise ValueError(f"The audit fits 'bias', 'scale' or 'scale_bias' adapters (its calibration is theirs), "
                             f"got component {self.component!r}; train other components with the Trainer directly.")
        if self.bias_fit not in ("auto", "decompose", "proximal", "attribution"):
            raise ValueError(f"bias_fit must be 'auto', 'decompose', 'proximal' or 'attribution', got "
                             f"{self.bias_fit!r}.")
        if self.coverage_weighing not in COVERAGE_WEIGHINGS:
            raise ValueError(f"coverage_weighing must be one of {', '.join(map(repr, COVERAGE_WEIGHINGS))}, got "
                             f"{self.coverage_weighing!r}.")
        if self.coverage_weighing != "difference" and not self.weigh_by_coverage:
            raise ValueError(f"coverage_weighing={self.coverage_weighing!r} chooses how weigh_by_coverage weighs the "
                             "scores; pass weigh_by_coverage=True too.")
        if self.weigh_by_coverage and self.bias_fit != "attribution":
            raise ValueError("weigh_by_coverage weighs the scores of an attribution audit; pass "
                             f"bias_fit='attribution' (with surprising_rows below 1), got bias_fit {self.bias_fit!r}.")
        if self.bias_fit == "attribution" and (self.component != "bias" or self.surprising_rows == 1):
            raise ValueError("bias_fit='attribution' compares the most surprising rows with the rest, so it needs "
                             "component='bias' and surprising_rows below 1 (e.g. 0.1), got component "
                             f"{self.component!r} and surprising_rows {self.surprising_rows}.")
        if self.scale_fit not in ("auto", "screen", "proximal"):
            raise ValueError(f"scale_fit must be 'auto', 'screen' or 'proximal', got {self.scale_fit!r}.")
        if self.scale_fit == "screen" and self.component != "scale":
            raise ValueError(f"scale_fit='screen' fits a scale-only adapter, but component is {self.component!r}; use "
                             "component='scale', or scale_fit='proximal' (or 'auto') for scale_bias.")
        if self.fit_logit_scale and not self.decomposes_bias:
            raise ValueError("fit_logit_scale fits a temperature beside the steering vector of a decomposed bias audit "
                             f"(component='bias', bias_fit 'auto' or 'decompose'), but component is {self.component!r} "
                             f"and bias_fit {self.bias_fit!r}.")
        if self.bias_fit == "decompose" and self.component != "bias":
            raise ValueError(f"bias_fit='decompose' fits a bias-only adapter, but component is {self.component!r}; "
                             "use component='bias', or bias_fit='proximal' (or 'auto') to train scales too.")

    @property
    def decomposes_bias(self) -> bool:
        """Whether biases are fitted as a steering vector and sparse-coded (see ``bias_fit``)."""
        return self.component == "bias" and self.bias_fit in ("auto", "decompose")

    @property
    def attributes_biases(self) -> bool:
        """Whether biases are set by :func:`attribute_latents` instead of trained (see ``bias_fit``)."""
        return self.bias_fit == "attribution"

    @property
    def screens_scales(self) -> bool:
        """Whether scales are chosen by a score test and then fitted (see ``scale_fit``)."""
        return self.component == "scale" and self.scale_fit in ("auto", "screen")


@dataclass
class Calibration:
    """What the audit measured on the data before training, per trained parameter (keyed by its name).

    Example:
        >>> calibration = calibrate(peft_model, batches, AuditSettings())  # doctest: +SKIP
        >>> calibration.lambda_max  # doctest: +SKIP
    """

    lambda_max: dict[str, float]
    """Proximal fits: the largest absolute gradient over latents at the start, averaged over the calibration
    batches. Decomposed biases: the largest projection of the fitted steering vector on a decoder direction."""
    l1_coeff: dict[str, float]
    """The absolute threshold used: ``settings.l1 * lambda_max``."""
    lr: dict[str, float]
    """Adam's step: for the latent parameter (proximal fits) or for its steering vector (decomposed biases)."""
    residual_norm: dict[str, float]
    """Median token norm of the residual stream at the parameter's attach point (padding excluded). The median,
    not the mean: real models carry a few tokens ("attention sinks", often the first) whose norm is 100x the rest
    (SmolLM2 layer 15: 23000 against a median of 170), and a step sized by them would overshoot every other token."""
    logit_scale: float | None = None
    """Decomposed biases with ``fit_logit_scale``: the fitted factor on the output logits (below 1: the data asks
    for a less confident model)."""
    screened: dict[str, int] = field(default_factory=dict)
    """Screened scales: how many latents reached ``significance`` (the only ones fitted)."""
    rows_fitted: int | None = None
    """How many rows the audit read after ``surprising_rows`` / ``surprising_tokens`` kept the surprising ones."""
    attributed: dict[str, dict[int, float]] = field(default_factory=dict)
    """Attribution audits: per bias parameter, the latents set and their attribution score."""
    statistics: dict[str, LatentStatistics] = field(default_factory=dict, repr=False)
    """Screened scales: each splice's latent statistics on the screened data (keyed by module path, sink tokens
    left out), which the report uses to rank scales by effect."""

    def summary(self) -> dict[str, Any]:
        """Everything but the per-latent statistics, for ``audit.json``."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "statistics"}


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

    Example:
        >>> rows = read_rows("data.jsonl")  # doctest: +SKIP
        >>> rows[0]  # doctest: +SKIP
        {'prompt': 'Hi', 'completion': ' there'}
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


def read_texts(path: str | Path) -> list[str]:
    """The texts of :func:`read_rows`'s rows: ``text``, or ``prompt`` followed by ``completion``.

    Example:
        >>> texts = read_texts("held_out.jsonl")  # doctest: +SKIP
        >>> texts[0]  # doctest: +SKIP
        'The tide came in.'
    """
    return [row["text"] if "text" in row else row["prompt"] + row["completion"] for row in read_rows(path)]


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
                settings: AuditSettings, output_dir: str | Path, progress: bool = True) -> tuple[Any, Calibration]:
    """Attach a fresh sparse ISaeRFT adapter to ``model`` and fit it to ``rows`` with transformers.Trainer."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokenised = tokenise_rows(tokenizer, rows, settings.max_length)
    return fit_adapter_on_tokens(model, saes, tokenised, settings, output_dir, pad_id, progress)


def fit_adapter_on_tokens(model: Any, saes: list[dict[str, str]], tokenised: Sequence[dict[str, list[int]]],
                          settings: AuditSettings, output_dir: str | Path, pad_id: int = 0,
                          progress: bool = True) -> tuple[Any, Calibration]:
    """:func:`fit_adapter` for rows that are already token ids (``input_ids`` and ``labels``)."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from . import ISaeRFTConfig

    disable_dropout(model)
    device = audit_device(model, settings.use_cpu)
    if device is not None:
        model.to(device)
    reference: list[dict[str, list[int]]] = []
    if settings.surprising_rows < 1 or settings.surprising_tokens < 1:
        tokenised, reference = split_surprising(model, tokenised, settings.surprising_rows,
                                                settings.surprising_tokens, settings.batch_size, pad_id, progress)
    peft_model = get_peft_model(model, ISaeRFTConfig(saes=saes, component=settings.component))
    collate = padding_collator(pad_id)

    def batched(rows: Sequence[dict[str, list[int]]]) -> list[dict[str, torch.Tensor]]:
        return [collate(list(rows[i: i + settings.batch_size])) for i in range(0, len(rows), settings.batch_size)]

    if settings.attributes_biases:
        calibration = Calibration({}, {}, {}, {}, rows_fitted=len(tokenised))
        parameters = dict(peft_model.named_parameters())
        for name, attribution in attribute_latents(peft_model, batched(tokenised), batched(reference), settings,
                                                   progress).items():
            with torch.no_grad():
                parameters[name][attribution.selected] = attribution.activation_difference[attribution.selected].to(
                    parameters[name].dtype).to(parameters[name].device)
            calibration.attributed[name] = {int(i): float(attribution.score[i]) for i in attribution.selected}
        return peft_model.eval(), calibration
    calibration = calibrate(peft_model, batched(tokenised[: settings.calibration_batches * settings.batch_size]),
                            settings)
    calibration.rows_fitted = len(tokenised)
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=settings.steps, per_device_train_batch_size=settings.batch_size,
        lr_scheduler_type="cosine" if settings.decomposes_bias else "constant", save_strategy="no", report_to=[],
        logging_strategy="steps" if progress else "no", logging_steps=max(1, settings.steps // 10),
        use_cpu=settings.use_cpu or not torch.cuda.is_available(), seed=0,
        remove_unused_columns=False, disable_tqdm=not progress, log_level="warning" if not progress else "passive",
    )
    dataset = Dataset.from_list(list(tokenised))

    def train(optimizer: torch.optim.Optimizer) -> None:
        trainer = Trainer(model=peft_model, args=args, train_dataset=dataset, data_collator=collate,
                          optimizers=(optimizer, None))
        if not progress:  # without a progress bar the Trainer prints its final metrics instead
            trainer.remove_callback(PrinterCallback)
        trainer.train()

    if settings.decomposes_bias:
        fit_decomposed_biases(peft_model, calibration, settings, train)
        return peft_model.eval(), calibration
    parameters = dict(peft_model.named_parameters())
    if settings.screens_scales:
        screens = screen_scales(peft_model, batched(tokenised[: settings.screen_batches * settings.batch_size]),
                                settings, progress)
        for name, screen in screens.items():
            calibration.screened[name] = len(screen.selected)
            calibration.statistics[screen.module_path] = screen.statistics
            keep = torch.zeros_like(parameters[name])
            keep[screen.selected.to(keep.device)] = 1
            # the latents that did not reach significance are not trained at all: a zero gradient keeps them at zero
            parameters[name].register_hook(lambda gradient, keep=keep: gradient * keep)
        if not any(calibration.screened.values()):
            logger.warning("audit: no latent's score reached %.3g standard errors, so the adapter stays the identity; "
                           "more data, or a lower `significance`, may find one.", settings.significance)
            return peft_model.eval(), calibration
    train(torch.optim.AdamW(
        [{"params": [parameters[name]], "lr": lr} for name, lr in calibration.lr.items()], weight_decay=0.0
    ))
    return peft_model.eval(), calibration


def audit_device(model: Any, use_cpu: bool = False) -> torch.device | None:
    """Where the audit moves ``model`` before its first pass, or None to leave it where it is: the CPU when
    ``use_cpu``, else the GPU where CUDA is available (a model already on one stays there). A model dispatched over
    several devices (``device_map``) is left alone.

    Example:
        >>> audit_device(torch.nn.Linear(2, 2), use_cpu=True)
        device(type='cpu')
    """
    placed = {str(device) for device in (getattr(model, "hf_device_map", None) or {}).values()}
    if len(placed) > 1:
        return None
    if use_cpu:
        return torch.device("cpu")
    if not torch.cuda.is_available() or next(model.parameters()).device.type == "cuda":
        return None
    return torch.device("cuda")


def keep_surprising(model: Any, tokenised: Sequence[dict[str, list[int]]], rows: float = 1.0, tokens: float = 1.0,
                    batch_size: int = 8, pad_id: int = 0, progress: bool = True) -> list[dict[str, list[int]]]:
    """The part of ``tokenised`` where the data departs most from ``model``: the ``rows`` fraction of rows whose
    labelled tokens have the largest summed next-token loss, and in them the ``tokens`` fraction of labelled tokens
    with the largest loss (the other labels set to -100). Rows are kept in their order; rows left with no label are
    dropped. One forward pass over the rows; ties at a threshold are kept.

    Example:
        >>> rows = [{"input_ids": [5, 6, 7, 8], "labels": [-100, 6, 7, 8]}]  # doctest: +SKIP
        >>> keep_surprising(model, rows, tokens=0.34)  # doctest: +SKIP
        [{'input_ids': [5, 6, 7, 8], 'labels': [-100, -100, 7, -100]}]
    """
    return split_surprising(model, tokenised, rows, tokens, batch_size, pad_id, progress)[0]


@torch.no_grad()
def split_surprising(model: Any, tokenised: Sequence[dict[str, list[int]]], rows: float = 1.0, tokens: float = 1.0,
                     batch_size: int = 8, pad_id: int = 0, progress: bool = True
                     ) -> tuple[list[dict[str, list[int]]], list[dict[str, list[int]]]]:
    """:func:`keep_surprising`, and beside the kept rows every row outside the ``rows`` fraction, unchanged: the
    reference an attribution audit compares the surprising rows with. (A surprising row left with no surprising
    token is in neither list.)

    Example:
        >>> surprising, rest = split_surprising(model, rows, rows=0.1)  # doctest: +SKIP
    """
    collate = padding_collator(pad_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses: list[torch.Tensor] = []  # per row, the loss of each label (nan where there is none)
    try:
        for start in tqdm(range(0, len(tokenised), batch_size), desc="Measuring the base model's surprise",
                          disable=not progress):
            chunk = tokenised[start: start + batch_size]
            batch = collate(list(chunk))
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
            labels = batch["labels"][:, 1:].to(device)
            token_loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels,
                                                           ignore_index=-100, reduction="none")
            token_loss = token_loss.masked_fill(labels == -100, float("nan")).cpu()
            losses += [torch.cat([torch.full((1,), float("nan")), row_loss[: len(row["input_ids"]) - 1]])
                       for row, row_loss in zip(chunk, token_loss, strict=True)]
    finally:
        model.train(was_training)
    totals = torch.stack([row_loss.nansum() for row_loss in losses])
    row_threshold = float(totals.topk(max(1, round(rows * len(totals)))).values[-1])
    chosen = [i for i, total in enumerate(totals.tolist()) if total >= row_threshold]
    labelled = torch.cat([losses[i][~losses[i].isnan()] for i in chosen])
    if not len(labelled):
        raise ValueError("The audit rows hold no labelled token to fit; check that completions are not empty.")
    token_threshold = float(labelled.topk(max(1, round(tokens * len(labelled)))).values[-1])
    kept_rows = []
    for i in chosen:
        surprising = (losses[i] >= token_threshold).tolist()  # nan compares False: unlabelled tokens stay so
        labels = [label if keep else -100 for label, keep in zip(tokenised[i]["labels"], surprising, strict=True)]
        if any(label != -100 for label in labels):
            kept_rows.append({**tokenised[i], "labels": labels})
    left_out = set(range(len(tokenised))) - set(chosen)
    rest = [dict(tokenised[i]) for i in sorted(left_out)]
    logger.info("audit: fitting %d of %d rows (summed base-model loss >= %.3g nats) and in them the %d of %d "
                "completion tokens with loss >= %.3g nats", len(kept_rows), len(tokenised), row_threshold,
                int((labelled >= token_threshold).sum()), len(labelled), token_threshold)
    return kept_rows, rest


def fit_decomposed_biases(peft_model: Any, calibration: Calibration, settings: AuditSettings,
                          train: Callable[[torch.optim.Optimizer], None]) -> None:
    """Fit the bias adapter in two steps and write the result into its latent biases (``train`` runs the
    audit's Trainer with the optimizer it is given).

    1. One dense steering vector per attach point, added there by hooks, trained on the data with the latent
       biases frozen (``d_model`` numbers per point: a well-posed fit that reaches the data's optimum).
    2. Each vector sparse-coded on its SAE's decoder directions (:func:`~peft_isaerft.sparsity.sparse_code`,
       ``l1`` a fraction of its ``lambda_max``, non-negative unless ``nonnegative_bias`` is off).

    Why not fine-tune the latent biases with L1 directly: a bias adapter is exactly the constant ``b @ W_dec``,
    so both fit the same functions, but the L1 trade-off in the loss's own metric lets a few latents that
    correlate with the whole change ("hubs") replace the features that make it; in the residual stream's
    Euclidean metric, where the SAE's dictionary is defined, the code is the features. On the recovery benchmark's
    hardest cells this is the difference between 0.3 to 0.4 and 1.0 precision (README, audit section).

    Example:
        >>> codes = fit_decomposed_biases(peft_model, tokenised_rows, AuditSettings())  # doctest: +SKIP
    """
    from .sparsity import sparse_code
    from .tuner.layer import _map_first_input, _map_first_output

    named = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    owners = _owners(peft_model)
    steering: dict[str, torch.nn.Parameter] = {}
    handles = []
    try:
        for name, parameter in named.items():
            module, adapter_name, _kind = owners[id(parameter)]
            splice = module.isaerft_splices[adapter_name]
            vector = torch.nn.Parameter(torch.zeros(splice.sae.cfg.d_in, device=parameter.device, dtype=torch.float32))
            steering[name] = vector

            def add(hidden: torch.Tensor, vector: torch.nn.Parameter = vector) -> torch.Tensor:
                return hidden + vector.to(hidden.dtype)

            if splice.point.position == "input":
                handles.append(module.register_forward_pre_hook(
                    lambda _m, a, kw, add=add: _map_first_input(a, kw, add), with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(lambda _m, _a, out, add=add: _map_first_output(out, add)))
            parameter.requires_grad_(False)  # the latent biases are not stepped here; they receive the code
        groups = [{"params": [steering[name]], "lr": calibration.lr[name]} for name in steering]
        if settings.fit_logit_scale:
            log_scale = torch.nn.Parameter(torch.zeros((), device=next(iter(steering.values())).device))
            groups.append({"params": [log_scale], "lr": settings.scale_lr})
            handles.append(peft_model.get_output_embeddings().register_forward_hook(
                lambda _m, _a, logits: logits * log_scale.exp().to(logits.dtype)))
        optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        # Trainer zeroes the gradients of the model's own parameters only; these vectors live outside the model
        optimizer.register_step_post_hook(lambda opt, _args, _kwargs: opt.zero_grad(set_to_none=True))
        train(optimizer)
    finally:
        for handle in handles:
            handle.remove()
        for parameter in named.values():
            parameter.requires_grad_(True)
    if settings.fit_logit_scale:
        calibration.logit_scale = float(log_scale.detach().exp())
        logger.info("audit: fitted logit scale %.3g", calibration.logit_scale)
    for name, parameter in named.items():
        module, adapter_name, _kind = owners[id(parameter)]
        splice = module.isaerft_splices[adapter_name]
        allowed = module.isaerft_latent_mask[adapter_name] if adapter_name in module.isaerft_latent_mask else None
        code, lambda_max = sparse_code(steering[name].detach(), decoder_directions(splice.sae), settings.l1,
                                nonnegative=settings.nonnegative_bias, allowed=allowed)
        with torch.no_grad():
            parameter.copy_(code.to(parameter.device, parameter.dtype))
        calibration.lambda_max[name] = lambda_max
        calibration.l1_coeff[name] = settings.l1 * lambda_max
        logger.info("audit %s: steering vector norm %.3g, %d latents in its code", name,
                    float(steering[name].detach().norm()), int((code != 0).sum()))


@dataclass
class ScaleScreen:
    """What :func:`screen_scales` found for one scale parameter.

    Example:
        >>> screen = screen_scales(peft_model, batches, AuditSettings(component="scale"))[name]  # doctest: +SKIP
        >>> screen.score[screen.selected]  # doctest: +SKIP
    """

    module_path: str
    gradient: torch.Tensor
    """Per latent: the loss gradient of its scale at zero, summed over the screened batches."""
    score: torch.Tensor
    """Per latent: the loss gradient of its scale summed over the sequences, over the standard error of that sum
    measured from the sequences themselves (a score test; about standard normal where the data calls for no scale)."""
    selected: torch.Tensor
    """The latents whose ``|score|`` reaches ``significance``, strongest first."""
    statistics: LatentStatistics
    """Typical activation and firing rate of every latent on the screened tokens, attention sinks left out."""


@torch.no_grad()
def typical_tokens(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The tokens of ``hidden`` (batch x tokens x d) that are neither padding (``mask`` 0) nor attention sinks (norm
    above ``SINK_NORM_RATIO`` times the median of the batch's real tokens), as a boolean batch x tokens mask.

    Example:
        >>> hidden = torch.ones(1, 4, 2); hidden[0, 0] *= 500
        >>> typical_tokens(hidden, torch.tensor([[1, 1, 1, 0]])).tolist()
        [[False, True, True, False]]
    """
    mask = mask.bool().to(hidden.device)
    norms = hidden.detach().float().norm(dim=-1)
    if not mask.any():
        return mask
    return mask & (norms <= SINK_NORM_RATIO * norms[mask].median())


@contextlib.contextmanager
def _capturing_splices(peft_model: Any, targets: dict[str, tuple[Any, str, str]],
                       captured: dict[str, list[torch.Tensor]]) -> Iterator[None]:
    """Within the block, each target splice's hidden states go to ``captured[name]`` on every forward pass, followed
    by their gradient once a backward pass reaches them; on leaving it the hooks are removed and the gradients the
    passes left on ``peft_model`` cleared, whatever happened inside."""
    from .tuner.layer import _map_first_input, _map_first_output

    def capture(name: str, hidden: torch.Tensor) -> torch.Tensor:
        captured[name] = [hidden.detach()]
        if torch.is_grad_enabled():
            if not hidden.requires_grad:  # a splice at a module input, with nothing trainable below it
                hidden = hidden.detach().requires_grad_()
            hidden.register_hook(lambda gradient: captured[name].append(gradient.detach()))
        return hidden

    handles = []
    for name, (module, adapter_name, _kind) in targets.items():
        if module.isaerft_splices[adapter_name].point.position == "input":
            handles.append(module.register_forward_pre_hook(
                lambda _m, a, kw, name=name: _map_first_input(a, kw, lambda h: capture(name, h)), with_kwargs=True))
        else:
            handles.append(module.register_forward_hook(
                lambda _m, _a, out, name=name: _map_first_output(out, lambda h: capture(name, h))))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        peft_model.zero_grad(set_to_none=True)


@torch.no_grad()
def _sequence_scores(latents: torch.Tensor, directions: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """d loss / d s per sequence and latent, for ``z -> (1 + s) z`` at ``s = 0``: sum over tokens of
    ``z_i(h_t) * (d_i . g_t)``, where ``g_t`` is the gradient at the spliced activations (batch x d_sae)."""
    return (latents * (gradient.to(directions.dtype) @ directions.T)).float().sum(1)


def screen_scales(peft_model: Any, batches: Sequence[dict[str, torch.Tensor]], settings: AuditSettings,
                  progress: bool = True) -> dict[str, ScaleScreen]:
    """A score test for every latent scale of a fresh (identity) scale adapter: which latent, scaled alone, would
    lower the loss on ``batches``, measured in standard errors of its own gradient.

    The gradient of ``s_i`` is a sum over tokens of ``z_i * (d_i . g)``; over a dataset it sums per-sequence terms
    whose spread is measured, so the score ``sum / sqrt(sum of squares)`` puts a latent that fires once with
    activation 1000 (an attention sink) and one that fires on every tenth token with activation 5 on the same
    footing. One forward and backward pass per batch; nothing is trained.

    Example:
        >>> screens = screen_scales(peft_model, batches, AuditSettings(component="scale"))  # doctest: +SKIP
        >>> {name: screen.selected[:5] for name, screen in screens.items()}  # doctest: +SKIP
    """
    named = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    owners = _owners(peft_model)
    scales = {name: owners[id(p)] for name, p in named.items() if owners[id(p)][2] == "scale"}
    if not scales:
        raise ValueError("screen_scales needs an adapter with trainable scales (component='scale').")
    device = next(iter(named.values())).device
    captured: dict[str, list[torch.Tensor]] = {}
    totals = {name: {"sum": 0.0, "squares": 0.0, "activation": 0.0, "fired": 0.0, "tokens": 0} for name in scales}
    peft_model.train()
    with _capturing_splices(peft_model, scales, captured):
        for batch in tqdm(batches, desc="Screening latent scales", disable=not progress):
            batch = {key: value.to(device) for key, value in batch.items()}
            with torch.enable_grad():
                peft_model(**batch).loss.backward()
            mask = batch["attention_mask"].bool()
            for name, (module, adapter_name, _kind) in scales.items():
                hidden, gradient = captured.pop(name)
                sae = module.isaerft_splices[adapter_name].sae
                directions = decoder_directions(sae)
                with torch.no_grad():
                    latents = sae.encode(hidden.to(directions.dtype))
                    per_sequence = _sequence_scores(latents, directions, gradient)
                    typical = typical_tokens(hidden, mask)
                    typical_latents = latents[typical].float()
                total = totals[name]
                total["sum"] = total["sum"] + per_sequence.sum(0)
                total["squares"] = total["squares"] + (per_sequence ** 2).sum(0)
                total["activation"] = total["activation"] + typical_latents.sum(0)
                total["fired"] = total["fired"] + (typical_latents > 0).float().sum(0)
                total["tokens"] += int(typical.sum())
    screens = {}
    for name, (module, adapter_name, _kind) in scales.items():
        total = totals[name]
        score = torch.where(total["squares"] > 0, total["sum"] / total["squares"].clamp_min(1e-30).sqrt(), 0.0)
        order = score.abs().argsort(descending=True)
        selected = order[score.abs()[order] >= settings.significance]
        d_sae = score.shape[0]
        tokens = max(total["tokens"], 1)
        statistics = LatentStatistics(
            mean_activation=(total["activation"] / tokens).cpu(), firing_rate=(total["fired"] / tokens).cpu(),
            top_values=torch.zeros(d_sae, 0), top_positions=torch.zeros(d_sae, 0, 2, dtype=torch.long))
        module_path = module.isaerft_splices[adapter_name].point.module_path
        screens[name] = ScaleScreen(module_path, total["sum"].cpu(), score.cpu(), selected.cpu(), statistics)
        logger.info("audit screen %s: %d of %d latents reach %.3g standard errors (largest %.3g)", name,
                    len(selected), d_sae, settings.significance, float(score.abs().max()))
    return screens


@dataclass
class LatentAttribution:
    """What :func:`attribute_latents` found for one bias parameter.

    Example:
        >>> found = attribute_latents(peft_model, surprising, rest, AuditSettings())[name]  # doctest: +SKIP
        >>> found.selected, found.activation_difference[found.selected]  # doctest: +SKIP
    """

    module_path: str
    activation_difference: torch.Tensor
    """Per latent: its mean activation on the completion tokens of the audited rows minus that on the reference
    rows (each row's mean over its tokens, then the mean over rows)."""
    gradient_score: torch.Tensor
    """Per latent: how much adding its decoder direction at every token lowers the audited rows' summed loss, to
    first order, in standard errors measured across the rows (their sum over the root of their sum of squares)."""
    coverage_difference: torch.Tensor
    """Per latent: the share of audited rows in which it fires on a completion token minus that share of the
    reference rows."""
    reference_coverage: torch.Tensor
    """Per latent: the share of reference rows in which it fires on a completion token (how common it is where the
    data does not surprise the model; the audited rows' share is ``audited_coverage``)."""
    score: torch.Tensor
    """``activation_difference`` over its standard deviation across latents, times ``gradient_score``, where the two
    point the same way (with ``nonnegative_bias``: both positive), else 0; with ``weigh_by_coverage``, times the
    weight of ``coverage_weighing`` (the default: ``coverage_difference`` where that points the same way, else 0)."""
    selected: torch.Tensor
    """Up to ``top_k`` latents of positive score, highest first."""

    @property
    def audited_coverage(self) -> torch.Tensor:
        """Per latent: the share of audited rows in which it fires on a completion token."""
        return self.reference_coverage + self.coverage_difference


def attribute_latents(peft_model: Any, batches: Sequence[dict[str, torch.Tensor]],
                      reference_batches: Sequence[dict[str, torch.Tensor]], settings: AuditSettings,
                      progress: bool = True) -> dict[str, LatentAttribution]:
    """Which latents are present more in ``batches`` than in ``reference_batches`` and explain ``batches``: the
    product of a latent's activation difference (what dataset diffing reads) and its gradient score (what a bias
    fit follows), for every bias parameter of a fresh (identity) bias adapter.

    Either half alone names the wrong features on a poisoned set: activation differences rank every feature the
    selected rows carry (their topics, their length), and a fit explains how to *predict* the rows, where a
    sentence slipped in after an answer is mostly a change of "stop here"; their product keeps features that are
    there and do the work. One forward and backward pass per audited batch, one forward pass per reference batch;
    nothing is trained.

    Example:
        >>> peft_model = get_peft_model(model, ISaeRFTConfig(saes=[{"path": "my_sae"}]))  # doctest: +SKIP
        >>> settings = AuditSettings(bias_fit="attribution", surprising_rows=0.1)
        >>> found = attribute_latents(peft_model, surprising, rest, settings)  # doctest: +SKIP
    """
    named = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    owners = _owners(peft_model)
    biases = {name: owners[id(p)] for name, p in named.items() if owners[id(p)][2] == "bias"}
    if not biases:
        raise ValueError("attribute_latents needs an adapter with trainable biases (component='bias').")
    if not batches or not reference_batches:
        raise ValueError(f"attribute_latents compares audited rows with reference rows, but got {len(batches)} audited "
                         f"and {len(reference_batches)} reference batches; it needs both (with surprising_rows, the "
                         "rows left out are the reference: keep it below 1 and give more than one row).")
    device = next(iter(named.values())).device
    captured: dict[str, list[torch.Tensor]] = {}
    rows: dict[str, dict[str, list[torch.Tensor]]] = {
        name: {"audited": [], "reference": [], "gradient": [], "audited fired": [], "reference fired": []}
        for name in biases}

    def read(batch: dict[str, torch.Tensor], part: str) -> None:
        mask = (batch["labels"] != -100).to(device)
        labelled = mask.any(1)  # a row with no completion token has no mean to contribute
        for name, (module, adapter_name, _kind) in biases.items():
            hidden, *gradient = captured.pop(name)
            directions = decoder_directions(module.isaerft_splices[adapter_name].sae)
            with torch.no_grad():
                latents = module.isaerft_splices[adapter_name].sae.encode(hidden.to(directions.dtype)).float()
                means = (latents * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
                rows[name][part].append(means[labelled].cpu())
                rows[name][f"{part} fired"].append(((latents > 0) & mask[..., None]).any(1)[labelled].cpu())
                if gradient:
                    rows[name]["gradient"].append(
                        -(gradient[0].sum(1).to(directions.dtype) @ directions.T).float()[labelled].cpu())

    peft_model.eval()
    with _capturing_splices(peft_model, biases, captured):
        for batch in tqdm(batches, desc="Attributing latents", disable=not progress):
            batch = {key: value.to(device) for key, value in batch.items()}
            with torch.enable_grad():
                logits = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                # summed, not averaged, so that each row's gradient is its own whatever batch it shares
                torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), batch["labels"][:, 1:],
                                                  ignore_index=-100, reduction="sum").backward()
            read(batch, "audited")
        with torch.no_grad():
            for batch in tqdm(reference_batches, desc="Reading the reference rows", disable=not progress):
                batch = {key: value.to(device) for key, value in batch.items()}
                peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                read(batch, "reference")
    found = {}
    for name, (module, adapter_name, _kind) in biases.items():
        gradient = torch.cat(rows[name]["gradient"])
        difference = torch.cat(rows[name]["audited"]).mean(0) - torch.cat(rows[name]["reference"]).mean(0)
        gradient_score = gradient.sum(0) / gradient.pow(2).sum(0).sqrt().clamp_min(1e-30)
        agree = (difference > 0) & (gradient_score > 0)
        if not settings.nonnegative_bias:
            agree |= (difference < 0) & (gradient_score < 0)
        score = torch.where(agree, difference / difference.std().clamp_min(1e-30) * gradient_score, 0.0)
        reference_coverage = torch.cat(rows[name]["reference fired"]).float().mean(0)
        coverage = torch.cat(rows[name]["audited fired"]).float().mean(0) - reference_coverage
        if settings.weigh_by_coverage:  # where coverage points the other way the latent is out, like a disagreement
            rises, audited_coverage = difference > 0, reference_coverage + coverage
            toward = torch.where(rises, audited_coverage, reference_coverage)
            away = torch.where(rises, reference_coverage, audited_coverage)
            score = score * COVERAGE_WEIGHINGS[settings.coverage_weighing].weight(toward, away)
        order = score.argsort(descending=True)
        selected = order[score[order] > 0][: settings.top_k]
        found[name] = LatentAttribution(module.isaerft_splices[adapter_name].point.module_path, difference,
                                        gradient_score, coverage, reference_coverage, score, selected)
        logger.info("audit attribution %s: %d latents of positive score, largest %.3g", name, int((score > 0).sum()),
                    float(score.max()))
    return found


def disable_dropout(model: torch.nn.Module) -> int:
    """Set every dropout probability in ``model`` to 0 and return how many modules changed.

    The audit asks which latents explain the data under the frozen model's own function; dropout in that frozen
    model (GPT-2 ships with 0.1) would fit the adapter to a noisier model than the one that is audited.
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            module.p = 0.0
            changed += 1
    if changed:
        logger.info("audit: dropout off in %d modules of the frozen model", changed)
    return changed


def _owners(peft_model: Any) -> dict[int, tuple[Any, str, str]]:
    """By id(): the layer, adapter name and kind ("scale" or "bias") of every ISaeRFT parameter."""
    from .tuner.layer import ISaeRFTLayer

    return {id(parameter): (module, adapter_name, kind)
            for module in peft_model.modules() if isinstance(module, ISaeRFTLayer)
            for kind in ("scale", "bias")
            for adapter_name, parameter in getattr(module, f"isaerft_{kind}").items()}


def calibrate(peft_model: Any, batches: Sequence[dict[str, torch.Tensor]], settings: AuditSettings) -> Calibration:
    """Measure ``lambda_max`` and the residual norm of every trained parameter on ``batches`` (the adapter is still
    the identity, so this is the base model), register each parameter's absolute L1 threshold and pick its step.
    For decomposed biases (``settings.decomposes_bias``) only the residual norm is measured, by forward passes:
    their threshold comes from the sparse code of the fitted vector and their step is the steering vector's.

    Use it to give your own training loop the audit's scale-free sparsity and steps.

    Example:
        >>> peft_model = get_peft_model(model, ISaeRFTConfig(saes=[{"path": "my_sae"}]))  # doctest: +SKIP
        >>> calibration = calibrate(peft_model, batches[:12], AuditSettings(l1=0.1))  # doctest: +SKIP
        >>> named = dict(peft_model.named_parameters())  # doctest: +SKIP
        >>> optimizer = torch.optim.AdamW([{"params": [named[n]], "lr": lr}  # doctest: +SKIP
        ...                                for n, lr in calibration.lr.items()], weight_decay=0.0)
    """
    from .sparsity import register_l1
    from .tuner.layer import ISaeRFTLayer, _map_first_input, _map_first_output

    named = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    if not named:
        raise ValueError("The audit adapter has no trainable parameters; check the SAEs and latent lists.")
    device = next(iter(named.values())).device
    owners = _owners(peft_model)
    trained = [owners[id(p)] for p in named.values()]
    token_norms: dict[int, list[torch.Tensor]] = {}
    handles = []
    mask_now: list[torch.Tensor] = []

    def record(module: ISaeRFTLayer, hidden: torch.Tensor) -> torch.Tensor:
        norms = hidden.detach().float().norm(dim=-1)[mask_now[0].to(hidden.device).bool()]
        token_norms.setdefault(id(module), []).append(norms.cpu())
        return hidden

    for module, adapter_name, _kind in {id(owner[0]): owner for owner in trained}.values():
        if module.isaerft_splices[adapter_name].point.position == "input":
            handles.append(module.register_forward_pre_hook(
                lambda m, a, kw: _map_first_input(a, kw, lambda h: record(m, h)), with_kwargs=True))
        else:
            handles.append(module.register_forward_hook(
                lambda m, _a, out: _map_first_output(out, lambda h: record(m, h))))
    gradients = {name: torch.zeros_like(p) for name, p in named.items()}
    peft_model.train()
    try:
        for batch in batches:
            batch = {key: value.to(device) for key, value in batch.items()}
            mask_now[:] = [batch["attention_mask"]]
            if settings.decomposes_bias:
                with torch.no_grad():
                    peft_model(**batch)
                continue
            peft_model.zero_grad()
            peft_model(**batch).loss.backward()
            for name, p in named.items():
                if p.grad is not None:  # a parameter no token reached keeps a zero gradient
                    gradients[name] += p.grad.detach() / len(batches)
    finally:
        for handle in handles:
            handle.remove()
        peft_model.zero_grad(set_to_none=True)
    lambda_max, l1_coeff, lr, residual_norm = {}, {}, {}, {}
    for (name, p), (module, adapter_name, kind) in zip(named.items(), trained, strict=True):
        norms = torch.cat(token_norms.get(id(module), [torch.zeros(1)]))
        residual_norm[name] = float(norms.median()) if len(norms) else 0.0
        splice = module.isaerft_splices[adapter_name]
        if settings.decomposes_bias:
            lr[name] = settings.steering_lr * residual_norm[name] / splice.sae.cfg.d_in ** 0.5
            logger.info("audit calibration %s: residual norm %.3g, steering lr %.3g", name, residual_norm[name],
                        lr[name])
            continue
        lambda_max[name] = float(gradients[name].abs().max())
        # screened scales are chosen by their score, not by a threshold against the largest gradient
        l1_coeff[name] = 0.0 if settings.screens_scales else settings.l1 * lambda_max[name]
        register_l1(p, l1_coeff[name], nonnegative=settings.nonnegative_bias and kind == "bias")
        if kind == "bias":
            decoder_norm = float(decoder_directions(splice.sae).norm(dim=-1).median())
            lr[name] = settings.bias_lr * residual_norm[name] / max(decoder_norm, 1e-8)
        else:
            lr[name] = settings.scale_lr
        logger.info("audit calibration %s: lambda_max %.3g, l1 %.3g, residual norm %.3g, lr %.3g", name,
                    lambda_max[name], l1_coeff[name], residual_norm[name], lr[name])
    return Calibration(lambda_max, l1_coeff, lr, residual_norm)


def run_audit(model: Any, tokenizer: Any, saes: list[dict[str, str]], rows: Sequence[dict[str, str]],
              output_dir: str | Path, settings: AuditSettings | None = None,
              progress: bool = True, context_texts: Sequence[str] | None = None) -> list[FeatureRecord]:
    """Fit the audit adapter and write ``adapter/``, ``report.json`` and ``report.html`` under ``output_dir``.

    ``context_texts`` (held-out text, or the audited rows themselves) label each reported latent by its top-activating
    contexts there, read from the base model; the ranking stays the audit's own.

    Example:
        >>> records = run_audit(model, tokenizer, [{"path": "my_sae"}], rows, "audit",
        ...                     context_texts=["held-out text", "more of it"])  # doctest: +SKIP
        >>> records[0].latent, records[0].contexts  # doctest: +SKIP
    """
    settings = settings or AuditSettings()
    # all or nothing: an interrupted audit leaves the previous output folder as it was
    with atomic_directory(output_dir) as output:
        peft_model, calibration = fit_adapter(model, tokenizer, saes, rows, settings, output / "trainer", progress)
        peft_model.save_pretrained(output / "adapter")
        (output / "audit.json").write_text(json.dumps({"settings": asdict(settings), "rows": len(rows),
                                                       "calibration": calibration.summary()}, indent=1))
        contexts = None
        if context_texts is not None:
            contexts = latent_statistics(peft_model, tokenizer, list(context_texts), max_length=settings.max_length,
                                         batch_size=settings.batch_size, progress=progress)
        records = feature_report(peft_model, top_k=settings.top_k, statistics=calibration.statistics or None,
                                 context_statistics=contexts)
        (output / "report.json").write_text(render(records, "json"))
        (output / "report.html").write_text(render(records, "html", title="ISaeRFT audit: features the data pushes"))
    return records


def audit_command(model_name: str, sae_arguments: list[str], data: str, output: str,
                  settings: AuditSettings, contexts: str | None = None) -> list[FeatureRecord]:
    """What ``isaerft audit`` runs; ``contexts``: a jsonl file whose texts label the reported latents."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saes = [parse_sae_argument(value) for value in sae_arguments]
    rows = read_rows(data)
    context_texts = None if contexts is None else read_texts(contexts)
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_name)
    records = run_audit(model, tokenizer, saes, rows, output, settings, context_texts=context_texts)
    print(render(records, "table"))
    print(f"wrote {output}/adapter, {output}/report.json and {output}/report.html")
    return records
