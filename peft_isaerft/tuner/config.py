"""`ISaeRFTConfig`: which SAEs to splice where, and what to train on their latents."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.config import PeftConfig
from peft.utils import SAFETENSORS_WEIGHTS_NAME, PeftType
from safetensors import safe_open

from ..components import get_component
from ..saes import SAEReference

_DTYPES = {"float32", "float16", "bfloat16", "float64"}


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
        metadata={"help": "What to train per latent: 'scale' ((1+s)*z), 'bias' (z+b) or 'scale_bias' (both)."},
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
                "splice: several times faster encoder passes for a relative change of the splice of about 1e-3 "
                "(see the README's GPU table). No effect on CPUs or for a bfloat16 `sae_dtype`."
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

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.ISAERFT
        get_component(self.component)
        if not self.saes:
            raise ValueError(
                "ISaeRFTConfig needs at least one SAE in `saes`, e.g. "
                "saes=[{'release': 'gemma-scope-2b-pt-res-canonical', 'sae_id': 'layer_20/width_16k/canonical'}] "
                "or saes=[{'path': 'my_sae_folder'}]."
            )
        self.saes = [SAEReference.from_dict(entry).to_dict() for entry in self.saes]
        if self.sae_dtype is not None and self.sae_dtype not in _DTYPES:
            raise ValueError(f"sae_dtype must be one of {sorted(_DTYPES)} or None, got {self.sae_dtype!r}.")
        if not isinstance(self.sae_tf32, bool):
            raise ValueError(f"sae_tf32 must be True or False, got {self.sae_tf32!r}.")
        if self.l1_coeff < 0:
            raise ValueError(f"l1_coeff must be >= 0, got {self.l1_coeff}.")
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
            if not all(isinstance(i, int) and i >= 0 for i in latents):
                raise ValueError(f"{name}[{key!r}] must be a list of non-negative latent ids, got {latents!r}.")

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any
    ) -> ISaeRFTConfig:
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
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
