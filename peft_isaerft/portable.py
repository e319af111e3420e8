"""Portable adapters: an adapter whose SAE is a local folder carries that folder's files, so it loads on any machine.

``save_pretrained`` (and so ``push_to_hub``, which saves first) copies each local SAE folder of an ISaeRFT adapter
into ``sae_<index>/`` inside the adapter (hard links where the file system allows, so checkpoints cost no space) and
stores that reference relative to the adapter (``ISaeRFTConfig.bundle_saes``: None, the default, bundles local
folders; False never bundles). ``ISaeRFTConfig.from_pretrained`` (used by ``PeftModel.from_pretrained`` and
``AutoPeftModelForCausalLM.from_pretrained``) resolves such a reference inside the adapter folder, or downloads the
bundled files from the same Hub repository. SAEs named by a sae-lens release are never bundled: every machine can load
them. Pushing an adapter whose SAE would not resolve elsewhere warns first.

Example:
    >>> model.save_pretrained("out/adapter")  # doctest: +SKIP
    >>> sorted(p.name for p in Path("out/adapter/sae_0").iterdir())  # doctest: +SKIP
    ['cfg.json', 'sae_weights.safetensors']
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

__all__ = ["bundle_saes", "install_bundling", "resolve_bundled", "unportable_references"]

logger = logging.getLogger(__name__)
BUNDLE_PREFIX = "sae_"
"""Bundled SAE ``i`` lives in ``sae_<i>/``: one folder level, which is what transformers' Hub upload walks."""


def bundle_saes(adapter_dir: str | os.PathLike[str], bundle: bool | None = None) -> list[str]:
    """Copy the local SAE folders an adapter folder references into it and point its config at the copies.

    Returns one line per bundled SAE (what and how large). ``bundle=False`` leaves the references as they are.

    Example:
        >>> bundle_saes("out/adapter")  # save_pretrained does this  # doctest: +SKIP
        ['SAE 0 (/home/me/my_sae, 2.4 MB) -> sae_0']
    """
    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / "adapter_config.json"
    config = json.loads(config_file.read_text())
    if bundle is None:
        bundle = config.get("bundle_saes", None) is not False
    if not bundle:
        return []
    done = []
    for index, entry in enumerate(config.get("saes", [])):
        source = entry.get("path")
        if not source:
            continue
        source_dir = Path(source) if os.path.isabs(source) else adapter_dir / source
        target = adapter_dir / f"{BUNDLE_PREFIX}{index}"
        if not source_dir.is_dir():
            raise FileNotFoundError(
                f"Cannot bundle SAE {index} of the adapter: its folder {str(source_dir)!r} does not exist. Save with "
                "bundle_saes=False to keep the reference as it is."
            )
        files = sorted(p.name for p in source_dir.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors"))
        if source_dir.resolve() != target.resolve():
            target.mkdir(parents=True, exist_ok=True)
            for name in files:
                (target / name).unlink(missing_ok=True)
                try:
                    os.link(source_dir / name, target / name)
                except OSError:  # another file system, or links not allowed
                    shutil.copy2(source_dir / name, target / name)
        size = sum((target / name).stat().st_size for name in files)
        entry["path"] = f"{BUNDLE_PREFIX}{index}"
        entry["bundled"] = files
        done.append(f"SAE {index} ({source}, {size / 2**20:.1f} MB) -> {BUNDLE_PREFIX}{index}")
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
    for line in done:
        logger.info("Bundled %s", line)
    return done


def resolve_bundled(entry: dict[str, Any], source: str, download_kwargs: dict[str, Any] | None = None) -> str:
    """The local folder of a bundled SAE entry of an adapter loaded from ``source`` (a folder or a Hub repository id).

    Example:
        >>> resolve_bundled({"path": "sae_0", "bundled": ["cfg.json"]}, "out/adapter")  # doctest: +SKIP
        '/abs/out/adapter/sae_0'
    """
    relative = entry["path"]
    if os.path.isdir(source):
        return str((Path(source) / relative).resolve())
    from huggingface_hub import hf_hub_download

    kwargs = {k: v for k, v in (download_kwargs or {}).items() if k in ("revision", "cache_dir", "token") and v}
    subfolder = (download_kwargs or {}).get("subfolder")
    prefix = f"{subfolder}/{relative}" if subfolder else relative
    local = None
    for name in entry["bundled"]:
        local = hf_hub_download(source, f"{prefix}/{name}", **kwargs)
    if local is None:
        raise ValueError(f"Bundled SAE entry {entry!r} lists no files; save the adapter again.")
    return str(Path(local).parent)


def unportable_references(adapter_dir: str | os.PathLike[str]) -> list[str]:
    """SAE references of a saved adapter folder that only this machine can resolve (absolute local paths).

    Example:
        >>> unportable_references("out/adapter")  # doctest: +SKIP
        ['/home/me/my_sae']
    """
    config_file = Path(adapter_dir) / "adapter_config.json"
    if not config_file.is_file():
        return []
    config = json.loads(config_file.read_text())
    if config.get("peft_type") != "ISAERFT":
        return []
    return [entry["path"] for entry in config.get("saes", []) if entry.get("path") and os.path.isabs(entry["path"])]


def install_bundling() -> None:
    """Make ``PeftModel.save_pretrained`` bundle local SAEs into ISaeRFT adapters (once per process).

    Example:
        >>> install_bundling()  # done by `import peft_isaerft`; calling it again changes nothing
    """
    from peft import PeftModel

    from .patching import wrap_once
    from .tuner.config import is_isaerft_config

    def make(original: Any) -> Any:
        def save_pretrained(self: Any, save_directory: str, *args: Any, **kwargs: Any) -> Any:
            result = original(self, save_directory, *args, **kwargs)
            selected = kwargs.get("selected_adapters") or list(self.peft_config)
            if kwargs.get("is_main_process", True):
                for name in selected:
                    if name in self.peft_config and is_isaerft_config(self.peft_config[name]):
                        folder = Path(save_directory) if name == "default" else Path(save_directory) / name
                        if (folder / "adapter_config.json").is_file():
                            bundle_saes(folder, self.peft_config[name].bundle_saes)
            return result

        return save_pretrained

    wrap_once(PeftModel, "save_pretrained", "_isaerft_bundling", make)
