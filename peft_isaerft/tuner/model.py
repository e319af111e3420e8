"""`ISaeRFTModel`: the PEFT tuner that turns an `ISaeRFTConfig` into spliced SAEs."""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.integrations import init_empty_weights
from peft.utils.other import set_additional_trainable_modules
from torch import nn
from tqdm import tqdm
from transformers.pytorch_utils import Conv1D

from ..attach_points import AttachPoint, layout_for, resolve_attach_point
from ..components import get_component, parameter_container_names
from ..saes import load_sae, sae_hook_name
from .config import ISaeRFTConfig
from .layer import ISaeRFTLayer, Splice

logger = logging.getLogger(__name__)

_BASE_LAYER_SEGMENT = re.compile(r"\.base_layer(?=\.)")


class ISaeRFTModel(BaseTuner):
    """Splices frozen sae-lens SAEs into a transformers model and trains per-latent scales and biases.

    Created by ``peft.get_peft_model`` once ``peft_isaerft`` is imported.

    Example:
        >>> import peft_isaerft
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, peft_isaerft.ISaeRFTConfig(saes=[{"path": "my_sae"}]))  # doctest: +SKIP
        >>> model.print_trainable_parameters()  # doctest: +SKIP
    """

    prefix: str = "isaerft_"
    tuner_layer_cls = ISaeRFTLayer
    target_module_mapping: dict[str, list[str]] = {}

    # ------------------------------------------------------------------------------------------ injection

    def _prepare_adapter_config(self, peft_config: ISaeRFTConfig, model_config: dict) -> ISaeRFTConfig:
        return peft_config

    def _build_splices(self, model: nn.Module, config: ISaeRFTConfig) -> list[tuple[Splice, torch.Tensor | None]]:
        """Load every SAE of ``config`` and decide where it goes; raises before the model is touched."""
        component = get_component(config.component)
        splices: list[tuple[Splice, torch.Tensor | None]] = []
        fingerprints: list[dict[str, Any]] = []
        seen: dict[tuple[str, str], str] = {}
        for index, reference in enumerate(config.references):
            sae = load_sae(reference, dtype=config.sae_dtype)
            hook = reference.hook or sae_hook_name(sae)
            if not hook:
                raise ValueError(
                    f"SAE {reference.label} records no hook name in its metadata, so ISaeRFT does not know where to "
                    "attach it. Add one to its entry, e.g. {'path': ..., 'hook': 'blocks.3.hook_resid_post'}."
                )
            point = resolve_attach_point(model, hook)
            slot = (point.module_path, point.position)
            if slot in seen:
                raise ValueError(
                    f"SAEs {seen[slot]} and {reference.label} both attach at {point.module_path} ({point.position}) "
                    "in one adapter. Use one SAE per attach point, or put the second in another adapter."
                )
            seen[slot] = reference.label
            module = model.get_submodule(point.module_path)
            expected = _width_at(model, module, point)
            if expected is not None and expected != sae.cfg.d_in:
                raise ValueError(
                    f"SAE {reference.label} reads {sae.cfg.d_in}-dimensional activations, but {hook} "
                    f"({point.module_path}, {point.position}) of this model is {expected}-dimensional. Use an SAE "
                    "trained on this model at this hook, or attach it where the width matches."
                )
            fingerprints.append(config.checked_fingerprint(index, sae, reference.label, f"{hook}, {point.module_path}"))
            device = _device_of(module)
            if device is not None and sae.W_dec.device != device:
                sae.to(device)
            mask = config.latent_mask(index, hook, sae.cfg.d_sae, reference.label)
            splices.append((Splice(point, reference, index, component, sae, tf32=config.sae_tf32,
                                   split=config.sae_split_encoder, screen=config.sae_bf16_screen), mask))
        config.sae_fingerprints = fingerprints
        return splices

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        # PEFT's generic loop visits parents before children, so a wrapped decoder layer would hide its own
        # MLP from a second splice; wrapping deepest modules first keeps nested attach points working
        peft_config: ISaeRFTConfig = self.peft_config[adapter_name]
        self._check_new_adapter_config(peft_config)
        existing = [p for n, m in model.named_modules() if isinstance(m, BaseTunerLayer) for p in m.parameters()]
        existing_ids = {id(p) for p in existing}
        previous_requires_grad = (
            [(p, p.requires_grad) for p in model.parameters() if id(p) not in existing_ids] if existing else []
        )

        splices = self._build_splices(model, peft_config)
        ordered = sorted(splices, key=lambda item: item[0].point.module_path.count("."), reverse=True)
        # as PEFT's own methods: with low_cpu_mem_usage the new parameters stay on the meta device until loaded
        empty = init_empty_weights if low_cpu_mem_usage else contextlib.nullcontext
        for splice, mask in ordered:
            parent, target, target_name = _locate(model, splice.point.module_path)
            self._pending = (splice, mask)
            with empty():
                self._create_and_replace(
                    peft_config, adapter_name, target, target_name, parent, current_key=splice.point.module_path
                )
        self._pending = None
        # one module per SAE, in the order of `saes`: readers of a saved adapter map weights to SAEs with it
        peft_config.target_modules = [splice.point.module_path for splice, _ in splices]
        for name in sorted(set(peft_config.target_modules)):
            if name not in self.targeted_module_names:
                self.targeted_module_names.append(name)

        self.set_adapter(self.active_adapters, inference_mode=peft_config.inference_mode)
        self._mark_only_adapters_as_trainable(model)
        set_additional_trainable_modules(
            model=model,
            peft_config=peft_config,
            model_config=BaseTuner.get_model_config(self),
            adapter_name=adapter_name,
            activate_adapter=adapter_name in self.active_adapters,
        )
        for parameter, requires_grad in previous_requires_grad:
            parameter.requires_grad = requires_grad

    def _create_and_replace(
        self,
        peft_config: ISaeRFTConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        splice, mask = self._pending
        if isinstance(target, ISaeRFTLayer):
            target.update_layer(adapter_name, splice, peft_config, mask)
            return
        new_module = ISaeRFTLayer(target, adapter_name, splice, peft_config, mask)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # the base implementation copies `.weight` off the child, which a decoder layer does not have
        setattr(parent, child_name, new_module)

    # ------------------------------------------------------------------------------------------ state dict

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # the checkpoint must not depend on which other adapters were wrapped around this module first
        return super()._remove_adapter_name_from_key(_BASE_LAYER_SEGMENT.sub("", key), adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: ISaeRFTConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        expected = {
            name: param
            for name, param in model.named_parameters()
            if any(f".{container}." in name for container in parameter_container_names())
            and name.endswith("." + adapter_name)
        }
        parameters = dict(model.named_parameters())
        missing = sorted(set(expected) - set(remapped))
        # besides the ISaeRFT vectors, an adapter file may only hold the copies of its modules_to_save: any other
        # key would be ignored or would overwrite a base-model weight
        unexpected = sorted(k for k in remapped if k not in expected
                            and not (".modules_to_save." in k and k in parameters))
        if missing or unexpected:
            raise ValueError(
                f"The adapter weights of {adapter_name!r} do not fit its config on this model: missing "
                f"{[cls._remove_adapter_name_from_key(k, adapter_name) for k in missing[:5]]}, unexpected "
                f"{unexpected[:5]}. The adapter file was written for other SAEs or another base model, or it is "
                "corrupt; load it onto the base model it was trained on."
            )
        for name, value in remapped.items():
            if name in expected and tuple(value.shape) != tuple(expected[name].shape):
                raise ValueError(
                    f"Adapter weight {cls._remove_adapter_name_from_key(name, adapter_name)} has shape "
                    f"{tuple(value.shape)} in the file but the SAE at that point has {tuple(expected[name].shape)} "
                    "latents: the adapter was trained with a different SAE than its config names now."
                )
            if name not in expected and tuple(value.shape) != tuple(parameters[name].shape):
                raise ValueError(
                    f"Adapter weight {cls._remove_adapter_name_from_key(name, adapter_name)} has shape "
                    f"{tuple(value.shape)} in the file but {tuple(parameters[name].shape)} in this model: the adapter "
                    "was saved from another base model, or its file is corrupt."
                )
        return remapped

    # ------------------------------------------------------------------------------------------ unloading

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        wrapped = [name for name, module in self.model.named_modules() if isinstance(module, ISaeRFTLayer)]
        if merge:
            self._check_merge_allowed()
            # check every layer first so a refused merge leaves the model untouched
            for name in wrapped:
                layer = self.model.get_submodule(name)
                names = adapter_names or [a for a in layer.active_adapters if a in layer.isaerft_splices]
                for adapter_name in names:
                    if adapter_name in layer.isaerft_splices:
                        layer._merge_target(adapter_name)
        created_bias: list[nn.Module] = []
        desc = "Unloading " + ("and merging " if merge else "") + "model"
        # children before parents: a parent's path stays valid while its children are unwrapped
        for name in tqdm(list(reversed(wrapped)), disable=not progressbar, desc=desc):
            parent_name, _, child_name = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            layer = getattr(parent, child_name)
            if merge:
                before = {id(m) for m, created, _ in layer._merged_constants.values() if created}
                layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
                created_bias += [
                    m for m, created, _ in layer._merged_constants.values() if created and id(m) not in before
                ]
            setattr(parent, child_name, layer.get_base_layer())
        if created_bias:
            self._declare_new_biases(created_bias)
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model

    def _declare_new_biases(self, linears: list[nn.Module]) -> None:
        """Make biases created by a merge survive `save_pretrained` / `from_pretrained` of the merged model."""
        layout = layout_for(self.model)
        config = getattr(self.model, "config", None)
        flags = [flag for flag in (layout.mlp_bias_flag, layout.attn_bias_flag) if flag]
        if config is None or not flags:
            logger.warning(
                "Merging added a bias to %d linear layer(s) that had none. The merged model computes exactly what "
                "the adapter did, but its architecture has no config switch for these biases, so its "
                "save_pretrained() refuses (from_pretrained would drop them). Keep the adapter (PeftModel) to store "
                "this model.", len(linears),
            )
            _refuse_lossy_save(self.model, len(linears))
            return
        leaf = {"mlp_bias": layout.mlp_proj.rpartition(".")[2], "attention_bias": layout.attn_proj.rpartition(".")[2]}
        for flag in flags:
            names = {leaf[flag]} if flag in leaf else set()
            if flag == "attention_bias":
                names |= {"q_proj", "k_proj", "v_proj", "o_proj"}
            if flag == "mlp_bias":
                names |= {"gate_proj", "up_proj", "down_proj"}
            touched = [m for n, m in self.model.named_modules() if n.rpartition(".")[2] in names]
            if not any(m in linears for m in touched):
                continue
            setattr(config, flag, True)
            for module in touched:
                if isinstance(module, (nn.Linear, Conv1D)) and module.bias is None:
                    out_features = module.weight.shape[0]
                    module.bias = nn.Parameter(
                        torch.zeros(out_features, dtype=module.weight.dtype, device=module.weight.device),
                        requires_grad=False,
                    )
            logger.info("Set config.%s=True so the merged biases are saved and loaded with the model.", flag)


def _refuse_lossy_save(model: nn.Module, count: int) -> None:
    """Make ``model.save_pretrained`` refuse: what it writes would reload without the merged biases."""
    original = model.save_pretrained
    architecture = type(model).__name__

    def save_pretrained(*args: Any, allow_dropping_merged_biases: bool = False, **kwargs: Any) -> Any:
        if not allow_dropping_merged_biases:
            raise ValueError(
                f"This {architecture} holds biases merged from an ISaeRFT adapter in {count} linear layer(s) that "
                "its config says have none, so from_pretrained would load it without them and silently lose the "
                "adapter's change. Save the adapter instead (PeftModel.save_pretrained, before merging), or pass "
                "allow_dropping_merged_biases=True to save the base weights only."
            )
        return original(*args, **kwargs)

    model.save_pretrained = save_pretrained


def _locate(model: nn.Module, path: str) -> tuple[nn.Module, nn.Module, str]:
    """(parent, target, name) for ``path``, looking through modules that are already wrapped."""
    parent: nn.Module = model
    *parents, name = path.split(".")
    for part in parents:
        parent = getattr(parent, part)
        if isinstance(parent, BaseTunerLayer):
            parent = parent.get_base_layer()
    return parent, getattr(parent, name), name


def _device_of(module: nn.Module) -> torch.device | None:
    for tensor in module.parameters():
        return tensor.device
    return None


def _width_at(model: nn.Module, module: nn.Module, point: AttachPoint) -> int | None:
    """The activation width at an attach point, where it can be known without running the model."""
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    if isinstance(module, nn.Linear):
        return module.in_features if point.position == "input" else module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0] if point.position == "input" else module.nf
    if point.kind is None:
        return None
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    for attribute in ("hidden_size", "n_embd", "d_model"):
        if config is not None and getattr(config, attribute, None):
            return int(getattr(config, attribute))
    return None
