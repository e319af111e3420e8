"""Feature labels: Neuronpedia explanations (fetched only on request, cached on disk, or imported from an
export) and offline auto-labels from each latent's top-activating contexts.

Labels are a plain mapping ``{(sae_key, latent): text}`` where ``sae_key`` is the SAE's Neuronpedia id when
it has one (``gemma-2-2b/20-gemmascope-res-16k``) and its reference label otherwise.

Example:
    >>> labels = load_neuronpedia_export("explanations.jsonl.gz")  # doctest: +SKIP
    >>> feature_report("my_adapter", labels=labels)  # doctest: +SKIP
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from ..cache import cache_dir as package_cache_dir
from ..saes import SAEReference

logger = logging.getLogger(__name__)

NEURONPEDIA_URL = "https://www.neuronpedia.org"
Labels = dict[tuple[str, int], str]


def sae_key(reference: SAEReference) -> str:
    """The key labels use for an SAE: its Neuronpedia id, else its reference label."""
    return reference.neuronpedia_id or reference.label


def dashboard_url(reference: SAEReference, latent: int, base_url: str = NEURONPEDIA_URL) -> str | None:
    """The Neuronpedia dashboard of one latent, for SAEs Neuronpedia hosts.

    Example:
        >>> reference = SAEReference(release="gemma-scope-2b-pt-res-canonical", sae_id="layer_20/width_16k/canonical")
        >>> dashboard_url(reference, 123)
        'https://www.neuronpedia.org/gemma-2-2b/20-gemmascope-res-16k/123'
    """
    neuronpedia_id = reference.neuronpedia_id
    return None if neuronpedia_id is None else f"{base_url.rstrip('/')}/{neuronpedia_id}/{latent}"


def default_cache_dir() -> Path:
    return package_cache_dir("neuronpedia")


def fetch_neuronpedia_labels(
    reference: SAEReference,
    latents: Iterable[int],
    base_url: str | None = None,
    timeout: float = 10.0,
    cache_dir: str | os.PathLike[str] | None = None,
    api_key: str | None = None,
) -> Labels:
    """Fetch explanations of ``latents`` from Neuronpedia's feature API, caching each answer on disk.

    Only called on explicit request (``--labels neuronpedia``). A latent whose request fails is logged and
    left unlabelled; nothing is retried silently.

    Example:
        >>> labels = fetch_neuronpedia_labels(reference, [12, 345], timeout=10)  # doctest: +SKIP
        >>> records = feature_report("my_adapter", labels=labels)  # doctest: +SKIP
    """
    neuronpedia_id = reference.neuronpedia_id
    if neuronpedia_id is None:
        logger.warning("SAE %s has no Neuronpedia id in sae-lens's registry; no labels fetched.", reference.label)
        return {}
    base_url = (base_url or os.environ.get("NEURONPEDIA_URL") or NEURONPEDIA_URL).rstrip("/")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    labels: Labels = {}
    for latent in latents:
        cache_file = cache / neuronpedia_id.replace("/", "__") / f"{latent}.json"
        if cache_file.is_file():
            payload = json.loads(cache_file.read_text())
        else:
            url = f"{base_url}/api/feature/{neuronpedia_id}/{latent}"
            request = urllib.request.Request(url, headers={"Accept": "application/json"})
            if api_key or os.environ.get("NEURONPEDIA_API_KEY"):
                request.add_header("x-api-key", api_key or os.environ["NEURONPEDIA_API_KEY"])
            try:
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    payload = json.loads(response.read().decode())
            except (urllib.error.URLError, TimeoutError, json.JSONDecodeError) as error:
                logger.warning("Neuronpedia request %s failed: %s", url, error)
                continue
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_text(json.dumps(payload))
        description = _first_explanation(payload)
        if description:
            labels[(neuronpedia_id, int(latent))] = description
    return labels


def _first_explanation(payload: dict) -> str | None:
    for explanation in payload.get("explanations") or []:
        description = (explanation or {}).get("description")
        if description:
            return description.strip()
    return None


def load_neuronpedia_export(path: str | os.PathLike[str]) -> Labels:
    """Read a Neuronpedia explanations export (jsonl or jsonl.gz: ``modelId``, ``layer``, ``index``,
    ``description`` per line) into labels, offline.

    Example:
        >>> labels = load_neuronpedia_export("explanations.jsonl.gz")  # doctest: +SKIP
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    labels: Labels = {}
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key = (f"{row['modelId']}/{row['layer']}", int(row["index"]))
            except (json.JSONDecodeError, KeyError, ValueError) as error:
                raise ValueError(
                    f"{path}:{number} is not a Neuronpedia explanation row (needs modelId, layer, index, "
                    f"description): {error}"
                ) from error
            labels.setdefault(key, str(row.get("description", "")).strip())
    return labels


def load_labels_file(path: str | os.PathLike[str]) -> Labels:
    """Labels from a file: a Neuronpedia export, or a JSON object ``{"<sae_key>": {"<latent>": "label"}}``.

    Example:
        >>> labels = load_labels_file("explanations.jsonl.gz")  # doctest: +SKIP
    """
    path = Path(path)
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        return load_neuronpedia_export(path)
    data = json.loads(path.read_text())
    return {(sae, int(latent)): text for sae, latents in data.items() for latent, text in latents.items()}
