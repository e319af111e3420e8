"""What an adapter trained, per SAE: read from a live PeftModel or straight from a saved adapter folder.

Reading a saved adapter needs its SAEs but not its base model: the trained numbers are in
``adapter_model.safetensors`` and ``adapter_config.json`` says which SAE each belongs to.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from safetensors.torch import load_file

from ..components import get_component
from ..saes import SAEReference, decoder_directions, load_sae, sae_hook_name
from ..tuner.config import ISaeRFTConfig
from ..tuner.layer import ISaeRFTLayer


@dataclass
class SpliceContents:
    """The trained parameters of one SAE in one adapter.

    Example:
        >>> for splice in load_contents("my_adapter"):  # doctest: +SKIP
        ...     print(splice.hook, splice.reference.label)
    """

    adapter: str
    hook: str
    module_path: str
    reference: SAEReference
    sae_index: int
    component: str
    values: dict[str, torch.Tensor]
    """Per parameter name of the component (``scale``, ``bias``, ``clamp_gate``, ...), one value per latent."""
    sae: SAE

    @property
    def decoder_norms(self) -> torch.Tensor:
        with torch.no_grad():
            return decoder_directions(self.sae).float().norm(dim=-1).cpu()

    @property
    def scale(self) -> torch.Tensor | None:
        return self.values.get("scale")

    @property
    def bias(self) -> torch.Tensor | None:
        return self.values.get("bias")

    def parameters(self) -> dict[str, torch.Tensor]:
        return dict(self.values)


def contents_from_model(model: Any, adapter_name: str | None = None) -> list[SpliceContents]:
    """Every splice of ``adapter_name`` (default: the active adapter) in a PeftModel."""
    adapter_name = adapter_name or active_adapter_name(model)
    config = model.peft_config[adapter_name]
    found: list[SpliceContents] = []
    for module in model.modules():
        if not isinstance(module, ISaeRFTLayer) or adapter_name not in module.isaerft_splices:
            continue
        splice = module.isaerft_splices[adapter_name]
        params = module.adapter_parameters(adapter_name)
        found.append(
            SpliceContents(
                adapter=adapter_name,
                hook=splice.point.hook,
                module_path=splice.point.module_path,
                reference=splice.reference,
                sae_index=splice.sae_index,
                component=config.component,
                values={name: value.detach().float().cpu() for name, value in params.items()},
                sae=splice.sae,
            )
        )
    return sorted(found, key=lambda c: c.sae_index)


def contents_from_folder(folder: str | os.PathLike[str], adapter_name: str | None = None,
                         verify_sae_fingerprints: bool = True) -> list[SpliceContents]:
    """Every splice of a saved adapter folder, loading only its SAEs.

    Raises:
        FileNotFoundError: the folder holds no ISaeRFT adapter.
        ValueError: an SAE differs from the one the adapter was trained with (see
            ``ISaeRFTConfig.verify_sae_fingerprints``).
    """
    folder = Path(folder)
    config_file = folder / "adapter_config.json"
    weights_file = folder / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} is not an adapter folder (it needs adapter_config.json and adapter_model.safetensors, "
            "as written by PeftModel.save_pretrained)."
        )
    raw = json.loads(config_file.read_text())
    if raw.get("peft_type") != "ISAERFT":
        raise ValueError(f"{str(folder)!r} holds a {raw.get('peft_type')} adapter, not an ISaeRFT adapter.")
    config = ISaeRFTConfig.from_pretrained(str(folder), verify_sae_fingerprints=verify_sae_fingerprints)
    if not config.target_modules or len(config.target_modules) != len(config.saes):
        raise ValueError(f"{config_file} does not record where each SAE was attached (target_modules); re-save it.")
    tensors = load_file(str(weights_file))
    name = adapter_name or folder.name
    component = get_component(config.component)
    found = []
    for index, (reference, module_path) in enumerate(zip(config.references, config.target_modules, strict=True)):
        sae = load_sae(reference, dtype=config.sae_dtype)
        where = f"{reference.hook or sae_hook_name(sae)}, {module_path}"
        config.checked_fingerprint(index, sae, reference.label, where)
        values = {}
        for parameter in component.parameters:
            key = f"base_model.model.{module_path}.isaerft_{parameter.name}"
            if key not in tensors:
                raise ValueError(f"{weights_file} has no {key!r}, which a {component.name!r} adapter needs; the file "
                                 "does not fit its config. Save the adapter again.")
            values[parameter.name] = tensors[key].float()
        mask = config.latent_mask(index, reference.hook, sae.cfg.d_sae, reference.label)
        if mask is not None:
            values = {parameter.name: parameter.masked(values[parameter.name], mask)
                      for parameter in component.parameters}
        found.append(
            SpliceContents(
                name,
                reference.hook or sae_hook_name(sae) or module_path,
                module_path,
                reference,
                index,
                config.component,
                values,
                sae,
            )
        )
    return found


def load_contents(source: Any, adapter_name: str | None = None,
                  verify_sae_fingerprints: bool = True) -> list[SpliceContents]:
    """Contents of a PeftModel or of a saved adapter folder (whose SAEs are checked against its fingerprints).

    Example:
        >>> [splice.hook for splice in load_contents("my_adapter")]  # doctest: +SKIP
        ['blocks.3.hook_resid_post']
    """
    if isinstance(source, (str, os.PathLike)):
        return contents_from_folder(source, adapter_name, verify_sae_fingerprints)
    if hasattr(source, "peft_config"):
        return contents_from_model(source, adapter_name)
    raise TypeError(f"Expected a PeftModel or an adapter folder, got {type(source).__name__}.")


def active_adapter_name(model: Any) -> str:
    """The (first) active adapter of a PeftModel."""
    active = getattr(model, "active_adapter", "default")
    return active[0] if isinstance(active, list) else active
