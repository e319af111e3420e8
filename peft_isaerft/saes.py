"""SAE references: how an adapter config names an SAE, and how that name becomes a loaded sae-lens SAE.

An adapter never stores SAE weights. It stores an :class:`SAEReference` (a sae-lens release and id, or a
local folder written by ``SAE.save_model``) and loads the SAE through sae-lens's own loaders, so every
format sae-lens knows (Gemma Scope, Llama Scope, sae-lens folders, ...) works here too.

Example:
    >>> ref = SAEReference.from_dict({"release": "gemma-scope-2b-pt-res-canonical",
    ...                               "sae_id": "layer_20/width_16k/canonical"})
    >>> ref.label
    'gemma-scope-2b-pt-res-canonical/layer_20/width_16k/canonical'
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE

logger = logging.getLogger(__name__)

_ALLOWED_KEYS = {"release", "sae_id", "path", "hook", "bundled"}
# normalisations that sae-lens undoes inside decode() with per-token statistics; the splice works on the
# decoder's linear part only, so these would silently give a wrong delta
_UNSUPPORTED_NORMALISATIONS = {"constant_norm_rescale", "layer_norm", "covariance_whitening"}


@dataclass(frozen=True)
class SAEReference:
    """Where one SAE comes from, and optionally where it attaches.

    Example:
        >>> SAEReference.from_dict({"path": "my_sae", "hook": "blocks.3.hook_resid_post"}).hook
        'blocks.3.hook_resid_post'
    """

    release: str | None = None
    sae_id: str | None = None
    path: str | None = None
    hook: str | None = None
    bundled: tuple[str, ...] | None = None
    """Files of an SAE folder carried inside the adapter; ``path`` is then relative to the adapter folder until
    ``ISaeRFTConfig.from_pretrained`` resolves it (see :mod:`peft_isaerft.portable`)."""

    @classmethod
    def from_dict(cls, entry: dict[str, Any] | SAEReference) -> SAEReference:
        """Validate one entry of ``ISaeRFTConfig.saes``.

        Raises:
            ValueError: unknown keys, or neither / both of ``{"release", "sae_id"}`` and ``{"path"}``.
        """
        if isinstance(entry, SAEReference):
            return entry
        if not isinstance(entry, dict):
            raise ValueError(
                f"Each entry of `saes` must be a dict such as {{'release': R, 'sae_id': I}} or {{'path': P}}, "
                f"got {entry!r}."
            )
        unknown = set(entry) - _ALLOWED_KEYS
        wrong_type = {key: value for key, value in entry.items() if key in _ALLOWED_KEYS - {"bundled"}
                      and value is not None and not isinstance(value, (str, os.PathLike))}
        bundled = entry.get("bundled")
        if bundled is not None and (not isinstance(bundled, (list, tuple)) or not bundled
                                    or not all(isinstance(name, str) and "/" not in name for name in bundled)):
            raise ValueError(f"SAE entry {entry!r}: 'bundled' must list the file names carried in the adapter.")
        if wrong_type:
            raise ValueError(f"SAE entry {entry!r}: {sorted(wrong_type)} must be strings (a release, an id, a path or "
                             "a hook name).")
        if unknown:
            raise ValueError(
                f"Unknown key(s) {sorted(unknown)} in SAE entry {entry!r}; allowed keys are {sorted(_ALLOWED_KEYS)}."
            )
        has_pretrained = entry.get("release") is not None or entry.get("sae_id") is not None
        has_path = entry.get("path") is not None
        if has_pretrained and has_path:
            raise ValueError(f"SAE entry {entry!r} gives both a pretrained release and a path; give one of them.")
        if has_pretrained and not (entry.get("release") and entry.get("sae_id")):
            raise ValueError(f"SAE entry {entry!r} needs both 'release' and 'sae_id' to name a pretrained SAE.")
        if not has_pretrained and not has_path:
            raise ValueError(
                f"SAE entry {entry!r} names no SAE: give {{'release': R, 'sae_id': I}} for a sae-lens pretrained "
                "SAE or {'path': P} for a folder written by sae-lens `save_model`."
            )
        path = entry.get("path")
        if path is not None and bundled is None:
            # adapters outlive the working directory they were trained in
            path = os.path.abspath(os.path.expanduser(str(path)))
        return cls(release=entry.get("release"), sae_id=entry.get("sae_id"), path=None if path is None else str(path),
                   hook=entry.get("hook"), bundled=None if bundled is None else tuple(bundled))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items() if v is not None}

    @property
    def label(self) -> str:
        """A short human-readable name: ``release/sae_id`` or the folder path."""
        return f"{self.release}/{self.sae_id}" if self.release else str(self.path)

    @property
    def neuronpedia_id(self) -> str | None:
        """The Neuronpedia id of a pretrained SAE from sae-lens's registry (read offline), else None."""
        if not self.release:
            return None
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

        lookup = get_pretrained_saes_directory().get(self.release)
        return None if lookup is None else lookup.neuronpedia_id.get(self.sae_id)


_cache: dict[tuple[SAEReference, str, str], SAE] = {}
# captured before anything can patch it: PEFT's low_cpu_mem_usage loading puts every new parameter on the meta
# device while an adapter is injected, and the frozen SAE loaded then must still hold its weights
_REGISTER_PARAMETER = torch.nn.Module.register_parameter


@contextlib.contextmanager
def _real_parameters() -> Iterator[None]:
    current = torch.nn.Module.register_parameter
    torch.nn.Module.register_parameter = _REGISTER_PARAMETER
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = current
_cache_lock = threading.Lock()


def load_sae(reference: SAEReference, device: torch.device | str = "cpu", dtype: str | None = None) -> SAE:
    """Load (or reuse) the frozen SAE named by ``reference``.

    SAEs are shared within the process: two adapters over the same SAE on the same device hold one copy.

    Raises:
        FileNotFoundError: a ``path`` reference whose folder does not exist or holds no SAE.
        ValueError: an SAE whose activation normalisation the splice can not reproduce.

    Example:
        >>> sae = load_sae(SAEReference(path="my_sae"))  # doctest: +SKIP
        >>> sae.cfg.d_sae  # doctest: +SKIP
        16384
    """
    device = str(torch.device(device))
    key = (SAEReference(reference.release, reference.sae_id, reference.path), device, dtype or "")
    with _cache_lock:
        if key in _cache:
            return _cache[key]
    if reference.path is not None:
        folder = Path(reference.path)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"SAE folder {str(folder)!r} does not exist. Write one with sae-lens `sae.save_model(folder)` or "
                "fix the 'path' in the adapter's `saes` entry."
            )
        if not any(folder.glob("cfg.json")):
            raise FileNotFoundError(
                f"SAE folder {str(folder)!r} holds no sae-lens cfg.json; it is not an SAE written by `save_model`."
            )
        try:
            with _real_parameters():
                sae = SAE.load_from_disk(str(folder), device=device)
        except Exception as error:  # bad JSON, a missing field, safetensors' own error for a truncated file
            raise ValueError(
                f"SAE folder {str(folder)!r} cannot be loaded by sae-lens ({type(error).__name__}: {error}): its "
                "cfg.json or weights are corrupt, truncated or from an incompatible sae-lens version. Write it again "
                "with sae-lens `sae.save_model(folder)`."
            ) from error
    else:
        logger.info("Loading pretrained SAE %s/%s", reference.release, reference.sae_id)
        with _real_parameters():
            sae = SAE.from_pretrained(reference.release, reference.sae_id, device=device, dtype="float32")
    # the fingerprint is of the weights as stored, whatever dtype the splice runs the SAE in
    sae._isaerft_fingerprint = sae_fingerprint(sae)
    if dtype is not None and getattr(torch, dtype) != sae.W_dec.dtype:
        sae.to(getattr(torch, dtype))
    prepare_frozen_sae(sae, reference.label)
    with _cache_lock:
        _cache[key] = sae
    return sae


FINGERPRINT_SAMPLE = 1 << 16
"""Values of each weight tensor that enter an SAE's fingerprint (evenly spaced, in logical order)."""
_FINGERPRINTED = ("W_enc", "W_dec", "b_enc", "threshold", "b_gate", "b_mag", "r_mag")


def sae_fingerprint(sae: SAE) -> dict[str, Any]:
    """What identifies an SAE's latents: architecture, widths and a digest of each weight that defines them.

    Each digest is a SHA-256 of the tensor's shape and of :data:`FINGERPRINT_SAMPLE` evenly spaced values (as float32
    bytes, in logical order, so the memory layout and device do not matter), which keeps it well under a second for a
    65k x 2304 SAE. Saved adapters record it (``ISaeRFTConfig.sae_fingerprints``), and loading checks it: an SAE
    replaced by another one of the same width would silently rename every latent.

    Example:
        >>> from sae_lens import StandardSAE, StandardSAEConfig
        >>> fingerprint = sae_fingerprint(StandardSAE(StandardSAEConfig(d_in=8, d_sae=32)))
        >>> fingerprint["d_sae"], sorted(fingerprint["digests"])
        (32, ['W_dec', 'W_enc', 'b_enc'])
    """
    import sae_lens

    digests = {}
    for name in _FINGERPRINTED:
        tensor = getattr(sae, name, None)
        if isinstance(tensor, torch.Tensor):
            digests[name] = _tensor_digest(tensor)
    return {"architecture": sae.cfg.architecture(), "d_in": int(sae.cfg.d_in), "d_sae": int(sae.cfg.d_sae),
            "digests": digests, "sae_lens": sae_lens.__version__}


@torch.no_grad()
def _tensor_digest(tensor: torch.Tensor) -> str:
    values = tensor.detach()
    count = values.numel()
    positions = torch.arange(0, count, max(1, count // FINGERPRINT_SAMPLE), device=values.device)
    if values.dim() == 2:  # index rows and columns: a transposed view samples the same logical values
        sample = values[positions // values.shape[1], positions % values.shape[1]]
    else:
        sample = values.reshape(-1)[positions]
    digest = hashlib.sha256(str(tuple(values.shape)).encode())
    digest.update(sample.to(device="cpu", dtype=torch.float32).numpy().tobytes())
    return digest.hexdigest()[:20]


def fingerprint_of(sae: SAE) -> dict[str, Any]:
    """The fingerprint taken when ``sae`` was loaded (before any dtype change), else a fresh one."""
    return getattr(sae, "_isaerft_fingerprint", None) or sae_fingerprint(sae)


def fingerprint_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between a recorded and a current SAE fingerprint, in words (empty when they match).

    Example:
        >>> recorded = {"d_sae": 16384, "digests": {"W_dec": "ab12"}}
        >>> fingerprint_differences(recorded, {"d_sae": 16384, "digests": {"W_dec": "cd34"}})
        ['W_dec has other values']
    """
    differences = [f"{key} {recorded[key]} -> {current.get(key)}" for key in ("architecture", "d_in", "d_sae")
                   if key in recorded and recorded[key] != current.get(key)]
    if not differences:
        changed = [name for name, digest in recorded.get("digests", {}).items()
                   if current.get("digests", {}).get(name) not in (None, digest)]
        differences += [f"{name} has other values" for name in changed]
    return differences


def prepare_frozen_sae(sae: SAE, label: str) -> SAE:
    """Freeze ``sae`` and put it into the form the splice expects (flat ``hook_z`` inputs, eval mode)."""
    normalisation = getattr(sae.cfg, "normalize_activations", "none")
    if normalisation in _UNSUPPORTED_NORMALISATIONS:
        raise ValueError(
            f"SAE {label} uses normalize_activations={normalisation!r}, which rescales each token inside "
            "decode(); ISaeRFT splices only the decoder's linear part. Fold the normalisation into the weights "
            "first (sae-lens `fold_activation_norm_scaling_factor` / `fold_activation_whitening`) and save it."
        )
    if getattr(sae, "hook_z_reshaping_mode", False):
        # Hugging Face attention projections see heads already concatenated
        sae.turn_off_forward_pass_hook_z_reshaping()
    sae.requires_grad_(False)
    sae.eval()
    return sae


def sae_hook_name(sae: SAE) -> str | None:
    """The TransformerLens hook name the SAE was trained on, from its metadata (sae-lens 6)."""
    metadata = getattr(sae.cfg, "metadata", None)
    return getattr(metadata, "hook_name", None) if metadata is not None else None


def decoder_directions(sae: SAE) -> torch.Tensor:
    """The model-space direction each latent writes, one row per latent (``d_sae x d_in``).

    Equal to ``W_dec`` except for SAEs trained with ``rescale_acts_by_decoder_norm``, whose decode divides
    each latent by its decoder norm first.
    """
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        return sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True)
    return sae.W_dec


def clear_sae_cache() -> None:
    """Forget every SAE loaded in this process (they are freed once no adapter holds them)."""
    with _cache_lock:
        _cache.clear()
