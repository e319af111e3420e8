"""Model cards for ISaeRFT adapters: the SAEs (with Neuronpedia links) and a table of the top features.

PEFT writes the card in ``PeftModel.create_or_update_model_card`` and offers no hook for methods outside
the library, so importing ``peft_isaerft`` wraps that method: it runs PEFT's own card logic first, then adds
an ISaeRFT section for every ISaeRFT adapter in the model. Other adapters' cards are left untouched.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from peft import PeftModel

from ..saes import SAEReference
from .render import render
from .report import feature_report

logger = logging.getLogger(__name__)
_SECTION = "## ISaeRFT adapter"


def model_card_section(model: Any, adapter_name: str, top_k: int = 10) -> str:
    """Markdown describing one ISaeRFT adapter of ``model``.

    Example:
        >>> print(model_card_section(peft_model))  # doctest: +SKIP
    """
    config = model.peft_config[adapter_name]
    lines = [
        _SECTION,
        "",
        f"Component: `{config.component}`. Every trained number belongs to a named SAE latent.",
        "",
        "SAEs (frozen, not stored in this repository; re-attached from these references on load):",
        "",
    ]
    for entry in config.saes:
        reference = SAEReference.from_dict(entry)
        link = (
            f" ([Neuronpedia](https://www.neuronpedia.org/{reference.neuronpedia_id}))"
            if reference.neuronpedia_id
            else ""
        )
        lines.append(f"- `{reference.label}` at `{reference.hook or 'its own hook'}`{link}")
    records = feature_report(model, top_k=top_k, adapter_name=adapter_name)
    lines += [
        "",
        f"Top {len(records)} features by effect on the residual stream:",
        "",
        render(records, "md"),
        "Load with `import peft_isaerft` before `PeftModel.from_pretrained` / `AutoPeftModelForCausalLM`.",
    ]
    return "\n".join(lines)


def install_model_card_hook() -> None:
    """Wrap ``PeftModel.create_or_update_model_card`` once per process.

    Example:
        >>> install_model_card_hook()  # done by `import peft_isaerft`; calling it again changes nothing
    """
    from ..patching import wrap_once
    from ..tuner.config import is_isaerft_config

    def card(original: Any) -> Any:
        def create_or_update_model_card(self: PeftModel, output_dir: str) -> None:
            original(self, output_dir)
            adapters = [name for name, cfg in self.peft_config.items() if is_isaerft_config(cfg)]
            if not adapters:
                return
            path = os.path.join(output_dir, "README.md")
            try:
                text = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
                # an adapter folder holds one adapter: describe the one saved there
                name = os.path.basename(os.path.normpath(output_dir))
                adapter = (
                    name if name in adapters else self.active_adapter if self.active_adapter in adapters
                    else adapters[0]
                )
                section = model_card_section(self, adapter)
                if _SECTION in text:
                    text = text[: text.index(_SECTION)]
                with open(path, "w", encoding="utf-8") as handle:
                    handle.write(text.rstrip() + "\n\n" + section + "\n")
            except Exception as error:  # a card must never make saving the weights fail
                logger.warning("Could not write the ISaeRFT model card section: %s", error)

        return create_or_update_model_card

    # transformers' push_to_hub replaces the README written by save_pretrained with a generic card just before the
    # upload; write the PEFT and ISaeRFT card into the upload folder again, and say when the upload cannot be loaded
    # elsewhere
    def upload(original: Any) -> Any:
        def _upload_modified_files(self: PeftModel, working_dir: str, *args: Any, **kwargs: Any) -> Any:
            if any(is_isaerft_config(cfg) for cfg in self.peft_config.values()):
                self.create_or_update_model_card(working_dir)
                from ..portable import unportable_references

                folders = [Path(working_dir), *(p for p in Path(working_dir).iterdir() if p.is_dir())]
                local = [ref for folder in folders for ref in unportable_references(folder)]
                if local:
                    logger.warning(
                        "Uploading an ISaeRFT adapter that references SAE folder(s) on this machine only: %s. Nobody "
                        "else can load it. Save with bundle_saes=None (the default) to carry the SAE files, or use a "
                        "sae-lens release.", ", ".join(local),
                    )
            return original(self, working_dir, *args, **kwargs)

        return _upload_modified_files

    wrap_once(PeftModel, "create_or_update_model_card", "_isaerft", card)
    wrap_once(PeftModel, "_upload_modified_files", "_isaerft", upload)
