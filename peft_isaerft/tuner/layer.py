"""`ISaeRFTLayer`: wraps one module of the base model and splices frozen SAEs into its input or output."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from sae_lens import SAE
from torch import nn
from transformers.pytorch_utils import Conv1D

from .. import guards
from ..active_latents import selector_for, tf32_matmuls
from ..attach_points import AttachPoint
from ..components import Component, SpliceInputs, parameter_container_names
from ..saes import SAEReference, decoder_directions
from ..sparsity import register_l1
from .config import ISaeRFTConfig

logger = logging.getLogger(__name__)


@dataclass
class Splice:
    """Everything about one adapter's SAE at one wrapped module, except its trained parameters."""

    point: AttachPoint
    reference: SAEReference
    sae_index: int
    """Position of the SAE in the config's `saes` list."""
    component: Component
    sae: SAE
    sparse_backward: bool = True
    """Work on each token's active latents only (see components.SparseLatentScale) where the SAE allows it; set it
    to False to use plain autograd over dense latents instead."""
    tf32: bool = False
    """Run the SAE encoder's float32 matmuls in TF32 on CUDA (``ISaeRFTConfig.sae_tf32``)."""
    split: bool = True
    """The split bfloat16 encoder product for bfloat16 models on CUDA (``ISaeRFTConfig.sae_split_encoder``)."""
    screen: bool = True
    """The bfloat16 screen of a TopK SAE's top-k on CPUs (``ISaeRFTConfig.sae_bf16_screen``)."""

    def __post_init__(self) -> None:
        self.selector = selector_for(self.sae, tf32=self.tf32, split=self.split, screen=self.screen)
        self.sparse_backward = self.sparse_backward and self.selector is not None

    def encoder_rows(self) -> torch.Tensor:
        """``W_enc`` transposed (one contiguous row per latent), without a second copy of the encoder.

        The first call stores the frozen SAE's ``W_enc`` row-per-latent in memory (same values, ``W_enc`` becomes a
        transposed view), so ``x @ W_enc`` in the encoder and the backward's row gathers share one storage.
        """
        weight = self.sae.W_enc
        if not weight.T.is_contiguous():
            weight.data = weight.data.T.contiguous().T
        return weight.detach().T

    def encode(self, hidden: torch.Tensor) -> torch.Tensor:
        """The SAE's dense latents (the plain-autograd path), in TF32 where asked."""
        with tf32_matmuls(self.tf32):
            return self.sae.encode(hidden)


class ISaeRFTLayer(nn.Module, BaseTunerLayer):
    """A base-model module with one SAE splice per adapter at its input or output.

    Trained parameters live in ``isaerft_<parameter>[adapter]`` (``isaerft_scale``, ``isaerft_bias``,
    ``isaerft_clamp_gate``, ...: whatever the adapter's component declares, one entry or row per SAE latent). The SAE
    itself is frozen and kept outside the module tree, so it is never trained, saved, sharded into optimizer state, or
    cast by ``model.half()``; ``model.to(device)`` still moves it.

    Example:
        >>> layer = peft_model.base_model.model.model.layers[3]  # doctest: +SKIP
        >>> layer.adapter_parameters("default")["scale"]  # doctest: +SKIP
    """

    adapter_layer_names = parameter_container_names()
    other_param_names = ("isaerft_latent_mask", "isaerft_splices")

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        splice: Splice,
        config: ISaeRFTConfig,
        latent_mask: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        for container in self.adapter_layer_names:
            setattr(self, container, nn.ParameterDict({}))
        # derived from the config on every load, so not part of the adapter file
        self.isaerft_latent_mask = BufferDict({}, persistent=False)
        self.isaerft_splices: dict[str, Splice] = {}
        self._merged_constants: dict[str, tuple[nn.Module, bool, torch.Tensor]] = {}
        self._l1_coeffs: dict[str, float] = {}
        self.register_load_state_dict_post_hook(self._after_load)
        self._active_adapter = adapter_name
        self.merged_adapters: list[str] = []
        self.update_layer(adapter_name, splice, config, latent_mask)

    def __getattr__(self, name: str) -> Any:
        # models read attributes such as `attention_type` off their layers
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def update_layer(
        self, adapter_name: str, splice: Splice, config: ISaeRFTConfig, latent_mask: torch.Tensor | None = None
    ) -> None:
        """Add (or replace) the splice and parameters of ``adapter_name`` on this module."""
        if adapter_name in self.isaerft_splices:
            other = self.isaerft_splices[adapter_name]
            raise ValueError(
                f"Adapter {adapter_name!r} already splices {other.reference.label} at {other.point.module_path} "
                f"({other.point.position}); an adapter can hold one SAE per attach point. Put "
                f"{splice.reference.label} in a separate adapter or at another hook. (Loading an adapter onto a "
                "model that already holds one of that name? Pass another adapter_name, or start from a fresh base.)"
            )
        d_sae = splice.sae.cfg.d_sae
        device = splice.sae.W_dec.device
        self.isaerft_splices[adapter_name] = splice
        for parameter in splice.component.parameters:
            shape = parameter.shape(d_sae, config)
            generator = torch.Generator().manual_seed(
                zlib.crc32(f"{adapter_name}/{parameter.name}/{splice.sae_index}".encode())
            )
            # a row per latent is spread over its columns, so the row's norm does not grow with their number
            spread = shape[-1] ** -0.5 if len(shape) > 1 else 1.0
            if config.init_weights and not parameter.init_std:
                values = torch.full(shape, parameter.identity, dtype=torch.float32, device=device)
            elif config.init_weights:
                values = (parameter.identity + torch.randn(shape, generator=generator) * parameter.init_std
                          * spread).to(device)
            else:
                noise = torch.randn(shape, generator=generator) * parameter.random_std * spread + parameter.random_mean
                values = (parameter.identity + noise).to(device)
            if latent_mask is not None:  # latents outside the allow-list stay at the identity
                values = parameter.masked(values, latent_mask.to(device))
            self._container(parameter.name)[adapter_name] = nn.Parameter(values)
        self._l1_coeffs[adapter_name] = config.l1_coeff
        self._register_hooks(adapter_name)
        if latent_mask is not None:
            self.isaerft_latent_mask[adapter_name] = latent_mask.to(device=device, dtype=torch.float32)
        self.set_adapter(self.active_adapters)

    def _container(self, parameter: str) -> nn.ParameterDict:
        return getattr(self, f"isaerft_{parameter}")

    def _register_hooks(self, adapter_name: str) -> None:
        """Attach the proximal L1 step and the non-finite guard to the current parameter objects of an adapter."""
        splice = self.isaerft_splices[adapter_name]
        for parameter in splice.component.parameters:
            container = self._container(parameter.name)
            if adapter_name in container:
                l1_coeff = self._l1_coeffs.get(adapter_name, 0.0) if parameter.sparse else 0.0
                register_l1(container[adapter_name], l1_coeff, nonnegative=parameter.nonnegative)
                guards.watch(container[adapter_name], f"adapter {adapter_name!r} at {splice.point.hook} "
                             f"({splice.point.module_path}), isaerft_{parameter.name}")

    def _after_load(self, _module: nn.Module, _keys: Any) -> None:
        # loading with assign=True (low_cpu_mem_usage) replaces the parameter objects the hooks were attached to
        for adapter_name in self.isaerft_splices:
            self._register_hooks(adapter_name)

    # ---------------------------------------------------------------------------------------------- math

    def adapter_parameters(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The effective (allow/deny-masked) per-latent parameters of ``adapter_name``, by parameter name."""
        splice = self.isaerft_splices[adapter_name]
        mask = self.isaerft_latent_mask[adapter_name] if adapter_name in self.isaerft_latent_mask else None
        params = {}
        for parameter in splice.component.parameters:
            values = self._container(parameter.name)[adapter_name]
            if mask is not None:
                values = parameter.masked(values, mask)
            params[parameter.name] = values
        return params

    def _delta(self, adapter_name: str, hidden: torch.Tensor) -> torch.Tensor:
        splice = self.isaerft_splices[adapter_name]
        decoder = decoder_directions(splice.sae)
        if hidden.shape[-1] != decoder.shape[-1]:
            raise ValueError(
                f"SAE {splice.reference.label} reads {decoder.shape[-1]}-dimensional activations but "
                f"{splice.point.module_path} ({splice.point.position}) carries {hidden.shape[-1]}; attach it where "
                "the width matches."
            )
        sparse = splice.sparse_backward and splice.component.needs_latents
        selector = splice.selector if sparse else None
        inputs = SpliceInputs(splice.encode, decoder, hidden, select=selector,
                              encoder_rows=splice.encoder_rows() if sparse else None,
                              encoder_gain=selector.encoder_gain() if selector is not None else None)
        return splice.component.delta(self.adapter_parameters(adapter_name), inputs)

    def _apply_splices(self, hidden: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        for adapter_name in adapters:
            hidden = hidden + self._delta(adapter_name, hidden)
        return hidden

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(*args, **kwargs)
        active = [a for a in self.active_adapters if a in self.isaerft_splices and a not in self.merged_adapters]
        if not active:
            return self.base_layer(*args, **kwargs)
        at_input = [a for a in active if self.isaerft_splices[a].point.position == "input"]
        at_output = [a for a in active if self.isaerft_splices[a].point.position == "output"]
        if at_input:
            args, kwargs = _map_first_input(args, kwargs, lambda h: self._apply_splices(h, at_input))
        result = self.base_layer(*args, **kwargs)
        if at_output:
            result = _map_first_output(result, lambda h: self._apply_splices(h, at_output))
        return result

    # ---------------------------------------------------------------------------------------------- devices

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> ISaeRFTLayer:
        super()._apply(fn, recurse)
        # SAEs follow the module's device but keep their own dtype (a deliberate choice, see `sae_dtype`)
        for splice in self.isaerft_splices.values():
            probe = fn(torch.empty(0, device=splice.sae.W_dec.device, dtype=splice.sae.W_dec.dtype))
            if probe.device != splice.sae.W_dec.device:
                splice.sae.to(probe.device)
        return self

    # ---------------------------------------------------------------------------------------------- merging

    def _merge_target(self, adapter_name: str) -> tuple[nn.Module, bool]:
        splice = self.isaerft_splices[adapter_name]
        point = splice.point
        if not splice.component.mergeable:
            raise ValueError(
                f"Adapter {adapter_name!r} uses component {splice.component.name!r}, which cannot be merged: "
                f"{splice.component.merge_refusal}. Keep the adapter unmerged (it runs at about the cost of one "
                "encoder pass), or train a 'bias' adapter if you need a mergeable one."
            )
        if point.merge_linear is None:
            raise ValueError(
                f"Adapter {adapter_name!r} adds a constant at {point.hook} ({point.module_path}), but it cannot be "
                f"merged exactly there: {point.merge_blocker}. Keep the adapter unmerged (a bias adapter costs "
                "one vector add per layer)."
            )
        relative = point.merge_linear[len(point.module_path) + 1 :] if point.merge_linear != point.module_path else ""
        linear = self.get_base_layer().get_submodule(relative) if relative else self.get_base_layer()
        if isinstance(linear, BaseTunerLayer):
            linear = linear.get_base_layer()
        if not isinstance(linear, (nn.Linear, Conv1D)):
            raise ValueError(f"Cannot merge into {point.merge_linear}: it is a {type(linear).__name__}, not a linear.")
        return linear, point.merge_through_weight

    def merged_constant(self, adapter_name: str, linear: nn.Module, through_weight: bool) -> torch.Tensor:
        """The vector a merge adds to ``linear``'s bias for a bias adapter."""
        splice = self.isaerft_splices[adapter_name]
        with torch.no_grad():
            constant = splice.component.merged_constant(self.adapter_parameters(adapter_name),
                                                        decoder_directions(splice.sae))
            if through_weight:
                weight = linear.weight.double().to(constant.device)
                constant = constant @ weight if isinstance(linear, Conv1D) else weight @ constant
        return constant

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold bias adapters into a bias of the base model (exact up to float rounding).

        Raises:
            ValueError: a scale component, or an attach point with no bias to absorb the constant.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        adapter_names = [a for a in adapter_names if a in self.isaerft_splices]
        targets = {name: self._merge_target(name) for name in adapter_names}  # raise before changing anything
        for adapter_name, (linear, through_weight) in targets.items():
            constant = self.merged_constant(adapter_name, linear, through_weight)
            if safe_merge and not torch.isfinite(constant).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken: "
                                 f"adapter {adapter_name!r} holds NaNs or infs; the merge was not applied.")
            created = linear.bias is None
            if created:
                out_features = linear.weight.shape[1] if isinstance(linear, Conv1D) else linear.weight.shape[0]
                linear.bias = nn.Parameter(
                    torch.zeros(out_features, dtype=linear.weight.dtype, device=linear.weight.device),
                    requires_grad=False,
                )
            linear.bias.data += constant.to(linear.bias.dtype)
            self._merged_constants[adapter_name] = (linear, created, constant)
            self.merged_adapters.append(adapter_name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            adapter_name = self.merged_adapters.pop()
            linear, created, constant = self._merged_constants.pop(adapter_name)
            if created and not any(entry[0] is linear for entry in self._merged_constants.values()):
                linear.bias = None
            else:
                linear.bias.data -= constant.to(linear.bias.dtype)

    def __repr__(self) -> str:
        return "isaerft." + super().__repr__()


def _map_first_input(args: tuple, kwargs: dict, fn: Callable[[torch.Tensor], torch.Tensor]) -> tuple[tuple, dict]:
    if args:
        return (fn(args[0]), *args[1:]), kwargs
    for name in ("hidden_states", "input", "x"):
        if name in kwargs:
            return args, {**kwargs, name: fn(kwargs[name])}
    raise ValueError(
        f"ISaeRFT could not find the activations to splice among the keyword arguments {sorted(kwargs)}; "
        "attach the SAE at a module output instead."
    )


def _map_first_output(result: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    # transformers 5 decoder layers return a Tensor, 4.x and attention modules a tuple
    if isinstance(result, torch.Tensor):
        return fn(result)
    if isinstance(result, tuple):
        return (fn(result[0]), *result[1:])
    if isinstance(result, list):
        return [fn(result[0]), *result[1:]]
    raise TypeError(f"ISaeRFT cannot splice a module output of type {type(result).__name__}.")
