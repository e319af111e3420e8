"""`ISaeRFTConfig`: which SAEs to splice where, and what to train on their latents."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.config import PeftConfig
from peft.utils import SAFETENSORS_WEIGHTS_NAME, PeftType
from safetensors import safe_open

from ..components import get_component
from ..saes import SAEReference, fingerprint_differences, fingerprint_of

logger = logging.getLogger(__name__)

_DTYPES = {"float32", "float16", "bfloat16", "float64"}


DEFAULT_LATENT_MAP_RANK = 8

@dataclass
class ISaeRFTConfig(PeftConfig):
    """Configuration of an ISaeRFT adapter.

    Example:
        >>> import peft_isaerft
        >>> from peft_isaerft import ISaeRFTConfig
        >>> config = ISaeRFTConfig(
        ...     saes=[{"release": "gemma-scope-2b-pt-res-canonical", "sae_id": "layer_20/width_16k/canonical"}],
        ...     component="scale",
        ... )
        >>> config.peft_type
        <PeftType.ISAERFT: 'ISAERFT'>
    """

    saes: list[dict[str, str]] = field(
        default_factory=list,
        metadata={
            "help": (
                "The SAEs to splice in, one dict each: {'release': R, 'sae_id': I} for a sae-lens pretrained SAE, "
                "or {'path': P} for a folder written by sae-lens `save_model`. An optional 'hook' overrides where it "
                "attaches: a TransformerLens hook name ('blocks.3.hook_resid_post') or a module path "
                "('model.layers.3'). Without it the SAE's own `cfg.metadata.hook_name` decides."
            )
        },
    )
    component: str = field(
        default="scale",
        metadata={"help": "What to train per latent: 'scale' ((1+s)*z), 'bias' (z+b), 'scale_bias' (both), 'clamp' "
                          "(pull firing features towards a learned value) or 'latent_map' (sparse latent-to-latent "
                          "edges); see peft_isaerft.components."},
    )
    latent_map_rank: int = field(
        default=DEFAULT_LATENT_MAP_RANK,
        metadata={"help": "Rank r of the 'latent_map' component (z + B A^T z, A and B one row of r numbers per "
                          "latent): how many independent channels carry latent-to-latent edges. Only for "
                          "component='latent_map'."},
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": (
                "True starts from the identity (the model's outputs are unchanged); False draws random non-zero "
                "parameters, which is only useful for tests."
            )
        },
    )
    sae_dtype: str | None = field(
        default=None,
        metadata={
            "help": (
                "dtype the SAE runs in ('float32', 'bfloat16', ...). None keeps what sae-lens loads (float32). "
                "Its output is cast back to the model's dtype either way."
            )
        },
    )
    sae_tf32: bool = field(
        default=False,
        metadata={
            "help": (
                "Run the SAE encoder's float32 matmuls in TF32 on CUDA GPUs (Ampere and newer), only inside the "
                "splice: about 4x faster encoder passes for a relative change of the splice of 2.2% and of a "
                "trained adapter of 3.7% on an H200 (see the README's GPU table). No effect on CPUs or for a bfloat16 "
                "`sae_dtype`."
            )
        },
    )
    sae_split_encoder: bool = field(
        default=True,
        metadata={
            "help": (
                "On CUDA GPUs, for a bfloat16 model and a float32 SAE: compute the encoder product as one bfloat16 "
                "matrix product against the encoder split into three bfloat16 parts (all 24 bits of each weight), "
                "accumulated in float32 (peft_isaerft.active_latents.split_bf16). 3.9x faster encoder passes on an "
                "H200 for a splice change of 0.6% and a trained adapter change of 1.3%, against 0.8 to 1.0% "
                "between two float32 runs (same top-20 latents). False: the plain float32 product. No effect on CPUs."
            )
        },
    )
    sae_bf16_screen: bool = field(
        default=True,
        metadata={
            "help": (
                "On CPUs with bfloat16 matrix instructions (AVX512-BF16 or AMX), for a float32 TopK SAE with at "
                "least 200 latents per rescored candidate (d_sae >= 200 * (k + 16)): search each token's top-k in a "
                "bfloat16 product of the encoder, then rescore the best k + 16 candidates in float32 "
                "(peft_isaerft.active_latents.TopKSelector). The values are the float32 pre-activations and the set "
                "equalled the float32 top-k's in every token measured; the selector takes 0.89x the float32 search's "
                "time at 16384 latents and k 64 on 2 AVX512-BF16 cores. False: search the float32 product. No "
                "effect on GPUs."
            )
        },
    )
    l1_coeff: float = field(
        default=0.0,
        metadata={
            "help": (
                "Sparsity of the fine-tune: after every optimizer step each trained latent parameter is shrunk "
                "towards zero by lr * l1_coeff (a proximal soft-threshold step), so few latents end up changed. "
                "0 disables it."
            )
        },
    )
    latent_allowlist: dict[str, list[int]] | None = field(
        default=None,
        metadata={
            "help": "Per SAE (keyed by its index in `saes` as a string, or its hook), the only latents to train."
        },
    )
    latent_denylist: dict[str, list[int]] | None = field(
        default=None,
        metadata={"help": "Per SAE (keyed like `latent_allowlist`), latents that must never change."},
    )
    sae_fingerprints: list[dict[str, Any]] | None = field(
        default=None,
        metadata={
            "help": (
                "Filled in when the adapter is attached: per SAE of `saes`, its architecture, widths, sae-lens version "
                "and a digest of the weights that define its latents. Loading checks it, since another SAE of the same "
                "width would silently give every latent index another meaning."
            )
        },
    )
    bundle_saes: bool | None = field(
        default=None,
        metadata={
            "help": (
                "Carry local SAE folders inside the saved adapter (under sae_<index>/), so that it loads on other "
                "machines and from the Hub. None (default): bundle SAEs given by a local path; False: keep the path "
                "as it is. SAEs named by a sae-lens release are never copied."
            )
        },
    )
    verify_sae_fingerprints: bool = field(
        default=True,
        metadata={
            "help": (
                "Refuse to attach an SAE whose weights differ from those the adapter was trained with. Set False only "
                "if you know the change is harmless; a warning still names what differs."
            )
        },
    )
    target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": (
                "Filled in when the adapter is attached: the module path each SAE of `saes` was spliced into, in "
                "the same order. Reports read a saved adapter with it; the attach points themselves come from `saes`."
            )
        },
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Extra base-model modules to train and save in full, as in other PEFT methods."},
    )

    def checked_fingerprint(self, index: int, sae: Any, label: str, where: str) -> dict[str, Any]:
        """The fingerprint to record for SAE ``index``, after checking ``sae`` against the recorded one.

        Raises:
            ValueError: ``sae`` is not the SAE the adapter was trained with (unless ``verify_sae_fingerprints`` is
                False, which warns instead).
        """
        current = fingerprint_of(sae)
        recorded = self.sae_fingerprints[index] if self.sae_fingerprints else None
        if recorded is None:
            if getattr(self, "_from_saved_file", False):
                logger.warning(
                    "Adapter saved without an SAE fingerprint for %s (an older peft-isaerft): cannot check that it is "
                    "the SAE the adapter was trained with. Save the adapter again to record one.", label,
                )
            return current
        differences = fingerprint_differences(recorded, current)
        if differences:
            message = (
                f"SAE {label} (at {where}) is not the SAE this adapter was trained with: {'; '.join(differences)}. "
                "Every latent index would name a different feature. Point the adapter at the original SAE; if you "
                "know the change is harmless, load with verify_sae_fingerprints=False (PeftModel.from_pretrained(..., "
                "verify_sae_fingerprints=False), feature_report(..., verify_sae_fingerprints=False) or "
                "`isaerft report --allow-sae-change`)."
            )
            if self.verify_sae_fingerprints:
                raise ValueError(message)
            logger.warning(message)
        return recorded

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.ISAERFT
        if not isinstance(self.component, str):
            raise ValueError(f"component must be a name such as 'scale', got {self.component!r}.")
        get_component(self.component)
        if isinstance(self.latent_map_rank, bool) or not isinstance(self.latent_map_rank, int) \
                or self.latent_map_rank < 1:
            raise ValueError(f"latent_map_rank must be a whole number >= 1, got {self.latent_map_rank!r}.")
        if self.latent_map_rank != DEFAULT_LATENT_MAP_RANK and self.component != "latent_map":
            raise ValueError(f"latent_map_rank={self.latent_map_rank} only applies to component='latent_map', but "
                             f"component is {self.component!r}; drop latent_map_rank or use component='latent_map'.")
        if not isinstance(self.saes, (list, tuple)):
            raise ValueError(
                f"saes must be a list of SAE entries such as [{{'path': 'my_sae'}}], got {type(self.saes).__name__}."
            )
        if not self.saes:
            raise ValueError(
                "ISaeRFTConfig needs at least one SAE in `saes`, e.g. "
                "saes=[{'release': 'gemma-scope-2b-pt-res-canonical', 'sae_id': 'layer_20/width_16k/canonical'}] "
                "or saes=[{'path': 'my_sae_folder'}]."
            )
        self.saes = [SAEReference.from_dict(entry).to_dict() for entry in self.saes]
        if self.sae_dtype is not None and self.sae_dtype not in _DTYPES:
            raise ValueError(f"sae_dtype must be one of {sorted(_DTYPES)} or None, got {self.sae_dtype!r}.")
        if self.sae_fingerprints is not None and (
            not isinstance(self.sae_fingerprints, list) or len(self.sae_fingerprints) != len(self.saes)
            or not all(entry is None or isinstance(entry, dict) for entry in self.sae_fingerprints)
        ):
            raise ValueError(
                f"sae_fingerprints must list one fingerprint (a dict) per SAE of `saes` ({len(self.saes)}); it is "
                "written by save_pretrained, so remove it to record new ones."
            )
        if not (self.bundle_saes is None or isinstance(self.bundle_saes, bool)):
            raise ValueError(f"bundle_saes must be None, True or False, got {self.bundle_saes!r}.")
        for name in ("init_weights", "sae_tf32", "sae_split_encoder", "sae_bf16_screen", "verify_sae_fingerprints"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if isinstance(self.l1_coeff, bool) or not isinstance(self.l1_coeff, (int, float)):
            raise ValueError(f"l1_coeff must be a number, got {self.l1_coeff!r}.")
        if not math.isfinite(self.l1_coeff) or self.l1_coeff < 0:
            raise ValueError(f"l1_coeff must be a finite number >= 0, got {self.l1_coeff}.")
        for name in ("target_modules", "modules_to_save"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (list, tuple, set))
                                      or not all(isinstance(item, str) for item in value)):
                raise ValueError(f"{name} must be a list of module names or None, got {value!r}.")
        for name in ("latent_allowlist", "latent_denylist"):
            self._check_latent_lists(name, getattr(self, name))

    def _check_latent_lists(self, name: str, lists: dict[str, list[int]] | None) -> None:
        if lists is None:
            return
        if not isinstance(lists, dict):
            raise ValueError(f"{name} must map an SAE (its index in `saes` or its hook) to a list of latent ids.")
        valid_keys = {str(i) for i in range(len(self.saes))} | {e["hook"] for e in self.saes if "hook" in e}
        for key, latents in lists.items():
            if str(key) not in valid_keys:
                raise ValueError(
                    f"{name} key {key!r} names no SAE; use the SAE's index in `saes` ({sorted(valid_keys)})."
                )
            if not isinstance(latents, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in latents
            ):
                raise ValueError(f"{name}[{key!r}] must be a list of non-negative latent ids, got {latents!r}.")

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any
    ) -> ISaeRFTConfig:
        verify = kwargs.pop("verify_sae_fingerprints", None)
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        config._from_saved_file = True  # not a field: never written back
        if verify is not None:
            config.verify_sae_fingerprints = bool(verify)
        for entry in config.saes:
            if entry.get("bundled") and not os.path.isabs(entry.get("path", "")):
                from ..portable import resolve_bundled

                entry["path"] = resolve_bundled(entry, str(pretrained_model_name_or_path),
                                                {"subfolder": subfolder, **kwargs})
        weights = os.path.join(str(pretrained_model_name_or_path), subfolder or "", SAFETENSORS_WEIGHTS_NAME)
        if os.path.isfile(weights):
            # PEFT reads the weights later and reports a corrupt file without naming it
            try:
                with safe_open(weights, framework="pt"):
                    pass
            except Exception as error:
                raise ValueError(
                    f"Adapter weights {weights!r} cannot be read ({error}); the file is corrupt or truncated. "
                    "Save the adapter again or download it anew."
                ) from error
        return config

    @property
    def references(self) -> list[SAEReference]:
        return [SAEReference.from_dict(entry) for entry in self.saes]

    def latent_list(self, name: str, index: int, hook: str | None) -> list[int] | None:
        lists: dict[str, Any] | None = getattr(self, name)
        if not lists:
            return None
        for key in (str(index), hook):
            if key is not None and key in lists:
                return list(lists[key])
        return None

    def latent_mask(self, index: int, hook: str | None, d_sae: int, label: str = "") -> torch.Tensor | None:
        """1 for latents this SAE may train, 0 for the rest; None when no allow- or deny-list applies.

        Raises:
            ValueError: a list names a latent id the SAE does not have.
        """
        allow = self.latent_list("latent_allowlist", index, hook)
        deny = self.latent_list("latent_denylist", index, hook)
        if allow is None and deny is None:
            return None
        for name, latents in (("latent_allowlist", allow), ("latent_denylist", deny)):
            too_large = [i for i in latents or [] if i >= d_sae]
            if too_large:
                raise ValueError(
                    f"{name} for SAE {label or index} names latents {too_large[:5]}, but it has {d_sae} "
                    f"(0..{d_sae - 1})."
                )
        mask = torch.ones(d_sae) if allow is None else torch.zeros(d_sae)
        if allow is not None:
            mask[allow] = 1.0
        if deny is not None:
            mask[deny] = 0.0
        return mask


def is_isaerft_config(config: Any) -> bool:
    """Whether a PEFT adapter config is an ISaeRFT one (the hooks on PeftModel act only on those)."""
    return isinstance(config, ISaeRFTConfig)
