"""`feature_report`: the SAE features a fine-tune changed most, named where names are known."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..components import get_component
from .activations import LatentStatistics, latent_statistics
from .contents import SpliceContents, load_contents
from .labels import Labels, dashboard_url, sae_key

logger = logging.getLogger(__name__)


@dataclass
class FeatureRecord:
    """One trained number of an adapter, tied to the SAE feature it acts on.

    Example:
        >>> best = feature_report("my_adapter", top_k=1)[0]  # doctest: +SKIP
        >>> best.hook, best.latent, best.param, best.value, best.effect  # doctest: +SKIP
    """

    adapter: str
    hook: str
    sae: str
    latent: int
    param: str
    value: float
    effect: float
    """How far it moves the residual stream: |b| * ||d|| for a bias; |s| * ||d|| * mean activation for a scale
    when data was given (per unit of activation otherwise); for a clamp |g| * |c - typical activation| * ||d||; for
    an edge i -> j of a latent map |W[j, i]| * ||d_j|| times the source's mean activation when data was given."""
    label: str | None = None
    url: str | None = None
    context: str | None = None
    """The top-activating context on the given data, used as the label when no other label exists."""
    contexts: list[str] | None = None
    """The top-activating contexts on the given data (up to three, strongest first): one can be a coincidence."""
    detail: str | None = None
    """What the component does with this latent beyond one number (a clamp: when it acts and what it pulls to; an
    edge of a latent map: the latent it comes from, with that latent's label)."""
    source: int | None = None
    """For an edge ``source -> latent`` of a latent map: the latent it reads from (``value`` is the edge weight)."""

    @property
    def param_text(self) -> str:
        return f"{self.param} ({self.detail})" if self.detail else self.param

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def feature_report(
    model_or_adapter_dir: Any,
    top_k: int = 20,
    labels: Labels | None = None,
    texts: Sequence[str] | None = None,
    tokenizer: Any = None,
    statistics: dict[str, LatentStatistics] | None = None,
    adapter_name: str | None = None,
    per_hook: bool = False,
    verify_sae_fingerprints: bool = True,
    context_statistics: dict[str, LatentStatistics] | None = None,
) -> list[FeatureRecord]:
    """The latents an ISaeRFT adapter changes most, sorted by ``effect`` (descending).

    Args:
        model_or_adapter_dir: a PeftModel with an ISaeRFT adapter, or a saved adapter folder (read without
            loading the base model unless ``texts`` are given).
        top_k: how many records to return (overall, or per attach point with ``per_hook=True``).
        labels: ``{(sae_key, latent): text}`` from :mod:`peft_isaerft.interpret.labels`.
        texts: data on which to measure how often each latent fires; weights scale effects and gives every
            record its top-activating context (an offline auto-label).
        tokenizer: the base model's tokenizer, for ``texts``.
        statistics: precomputed :func:`latent_statistics` (instead of ``texts``).
        adapter_name: which adapter of a PeftModel (default: the active one).
        per_hook: ``top_k`` per attach point instead of overall.
        verify_sae_fingerprints: refuse a saved adapter whose SAE changed since it was trained (False: warn).
        context_statistics: statistics on other text whose top contexts label the records, while ``statistics``
            still weighs the effects (an audit ranks by its own data and labels by held-out text); default
            ``statistics``.

    Example:
        >>> for record in feature_report("my_adapter", top_k=5):  # doctest: +SKIP
        ...     print(record.hook, record.latent, record.param, round(record.value, 3), record.label)
    """
    if texts is not None and statistics is None:
        model = model_or_adapter_dir
        if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
            model, tokenizer = _load_for_data(str(model_or_adapter_dir), tokenizer)
        if tokenizer is None:
            raise ValueError("feature_report(texts=...) needs the tokenizer of the base model.")
        statistics = latent_statistics(model, tokenizer, texts, adapter_name=adapter_name)
        model_or_adapter_dir = model
    contents = load_contents(model_or_adapter_dir, adapter_name, verify_sae_fingerprints)
    for splice in contents:
        for param, values in splice.parameters().items():
            bad = int((~torch.isfinite(values)).sum())
            if bad:
                logger.warning("Adapter %s at %s: %d non-finite %s value(s); they are listed first.", splice.adapter,
                               splice.hook, bad, param)
    records: list[FeatureRecord] = []
    for splice in contents:
        stats = (statistics or {}).get(splice.module_path)
        context_stats = stats if context_statistics is None else context_statistics.get(splice.module_path)
        records.extend(_records_for(splice, labels or {}, stats, context_stats))
    records.sort(key=lambda r: r.effect, reverse=True)
    if not per_hook:
        return records[:top_k]
    kept: list[FeatureRecord] = []
    for hook in dict.fromkeys(r.hook for r in records):
        kept.extend([r for r in records if r.hook == hook][:top_k])
    return sorted(kept, key=lambda r: r.effect, reverse=True)


def _records_for(splice: SpliceContents, labels: Labels, stats: LatentStatistics | None,
                 context_stats: LatentStatistics | None) -> list[FeatureRecord]:
    key = sae_key(splice.reference)
    mean_activation = stats.mean_activation if stats is not None else None
    readings = get_component(splice.component).readings(splice.parameters(), splice.decoder_norms, mean_activation)
    records = []

    def label_of(latent: int) -> str:
        context = context_stats.context(latent) if context_stats is not None else None
        return labels.get((key, latent)) or (f"fires on: {context}" if context else "")

    for reading in readings:
        values = reading.value
        # a NaN or infinite parameter ranks first, so no report hides it
        effect = torch.where(torch.isfinite(values), reading.effect, torch.full_like(reading.effect, float("inf")))
        for entry in torch.nonzero(values).flatten().tolist():
            # one number per latent, or a list of edges source -> latent
            latent = entry if reading.latents is None else int(reading.latents[entry])
            source = None if reading.sources is None else int(reading.sources[entry])
            finite = bool(torch.isfinite(values[entry]))
            if source is not None:
                detail = f"from {source}" + (f": {label_of(source)}" if label_of(source) else "")
            else:
                detail = reading.detail(entry) if reading.detail is not None else None
            records.append(
                FeatureRecord(
                    adapter=splice.adapter,
                    hook=splice.hook,
                    sae=splice.reference.label,
                    latent=latent,
                    param=reading.param,
                    value=float(values[entry]),
                    effect=float(effect[entry]),
                    label=(("" if finite else "NON-FINITE VALUE ") + label_of(latent)).strip() or None,
                    url=dashboard_url(splice.reference, latent),
                    context=context_stats.context(latent) if context_stats is not None else None,
                    contexts=context_stats.contexts(latent) if context_stats is not None else None,
                    detail=detail,
                    source=source,
                )
            )
    return records


def _load_for_data(adapter_dir: str, tokenizer: Any) -> tuple[Any, Any]:
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir).eval()
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(model.peft_config[model.active_adapter].base_model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
