"""Comparing two adapters over the same SAEs: which latents differ, and how much their top-k sets overlap.

Two datasets, two seeds, two training methods: if their top features overlap, the features belong to the
data; if not, to the run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

from ..components import per_latent
from ..saes import fingerprint_of
from .contents import load_contents


@dataclass
class AdapterDiff:
    """The result of :func:`diff_adapters`.

    Example:
        >>> diff = diff_adapters("run_a/adapter", "run_b/adapter", top_k=20)  # doctest: +SKIP
        >>> diff.overlap, diff.only_a  # doctest: +SKIP
    """

    top_k: int
    overlap: dict[str, float] = field(default_factory=dict)
    """Per ``hook|param``: |top(A) ∩ top(B)| / max(|top(A)|, |top(B)|), top = the k largest non-zero latents."""
    shared: dict[str, list[int]] = field(default_factory=dict)
    only_a: dict[str, list[int]] = field(default_factory=dict)
    only_b: dict[str, list[int]] = field(default_factory=dict)
    largest_differences: list[dict[str, Any]] = field(default_factory=list)
    cosine: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _identity(splice: Any) -> str:
    fingerprint = fingerprint_of(splice.sae)
    return json.dumps([fingerprint["architecture"], fingerprint["d_sae"], fingerprint["digests"]], sort_keys=True)


def diff_adapters(a: Any, b: Any, top_k: int = 20, verify_sae_fingerprints: bool = True) -> AdapterDiff:
    """Compare two ISaeRFT adapters (PeftModels or saved folders) trained over the same SAEs.

    Raises:
        ValueError: the adapters use different SAEs or attach points.

    Example:
        >>> result = diff_adapters("adapter_dataset_a", "adapter_dataset_b", top_k=10)  # doctest: +SKIP
        >>> result.overlap  # doctest: +SKIP
        {'blocks.12.hook_resid_post|bias': 0.8}
    """
    # an SAE is the same when its weights are, wherever its files live (a bundled copy, another cache folder)
    left = {(c.hook, _identity(c)): c for c in load_contents(a, None, verify_sae_fingerprints)}
    right = {(c.hook, _identity(c)): c for c in load_contents(b, None, verify_sae_fingerprints)}
    if left.keys() != right.keys():
        labels_a = sorted((c.hook, c.reference.label) for c in left.values())
        labels_b = sorted((c.hook, c.reference.label) for c in right.values())
        raise ValueError(
            f"The adapters splice different SAEs: {labels_a} vs {labels_b}. A diff needs the same SAEs (the same "
            "weights) at the same hooks."
        )
    result = AdapterDiff(top_k=top_k)
    differences = []
    for key, splice_a in left.items():
        splice_b = right[key]
        for param, values_a in splice_a.parameters().items():
            values_b = splice_b.parameters().get(param)
            if values_b is None:
                continue
            # a parameter with a row per latent (latent_map) compares per latent by the rows' norms
            values_a, values_b = per_latent(values_a), per_latent(values_b)
            name = f"{key[0]}|{param}"
            k = min(top_k, values_a.numel())
            top_a = set(values_a.abs().topk(k).indices[values_a.abs().topk(k).values > 0].tolist())
            top_b = set(values_b.abs().topk(k).indices[values_b.abs().topk(k).values > 0].tolist())
            result.overlap[name] = len(top_a & top_b) / max(len(top_a), len(top_b), 1)
            result.shared[name] = sorted(top_a & top_b)
            result.only_a[name] = sorted(top_a - top_b)
            result.only_b[name] = sorted(top_b - top_a)
            result.cosine[name] = float(torch.nn.functional.cosine_similarity(values_a, values_b, dim=0))
            delta = (values_a - values_b).abs()
            for latent in delta.topk(k).indices.tolist():
                if delta[latent] > 0:
                    differences.append(
                        {
                            "hook": key[0],
                            "param": param,
                            "latent": latent,
                            "a": float(values_a[latent]),
                            "b": float(values_b[latent]),
                            "difference": float(delta[latent]),
                        }
                    )
    result.largest_differences = sorted(differences, key=lambda d: d["difference"], reverse=True)[:top_k]
    return result
