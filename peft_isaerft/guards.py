"""Non-finite guards: a training step that makes an ISaeRFT parameter NaN or infinite stops, naming the adapter, the
attach point and the step, and ``save_pretrained`` refuses to write such an adapter unless told to.

The step check is a global ``torch.optim`` step post-hook (like the proximal L1 step in :mod:`peft_isaerft.sparsity`),
so it runs in ``transformers.Trainer``, TRL, accelerate and plain loops alike. On a CPU it checks at once. On a GPU,
reading a flag would make the host wait for the device every step, so the flag is copied to pinned memory without
waiting and read on a later step (or at the latest when the model is saved); the error still names the step whose
update went non-finite.

Example:
    >>> optimizer.step()  # doctest: +SKIP
    FloatingPointError: ISaeRFT adapter 'default' at blocks.3.hook_resid_post (model.layers.3): 12 non-finite values
    in isaerft_scale after optimizer step 41 ...
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["NonFiniteAdapterError", "check_finite", "install_save_guard", "non_finite_parameters", "watch"]


class NonFiniteAdapterError(FloatingPointError):
    """An ISaeRFT parameter became NaN or infinite.

    Example:
        >>> raise NonFiniteAdapterError("adapter 'default' at blocks.3.hook_resid_post ...")  # doctest: +SKIP
    """


_watched: dict[int, tuple[weakref.ref[torch.nn.Parameter], str]] = {}
_steps: dict[int, int] = {}
_pending: list[tuple[torch.Tensor, Any, str, int]] = []
_lock = threading.Lock()
_handle: Any = None


def watch(parameter: torch.nn.Parameter, description: str) -> None:
    """Stop training when ``parameter`` stops being finite after an optimizer step; ``description`` names it.

    Example:
        >>> weight = torch.nn.Parameter(torch.zeros(4))
        >>> watch(weight, "adapter 'default' at blocks.1.hook_resid_post, isaerft_scale")
    """
    global _handle
    key = id(parameter)
    _watched[key] = (weakref.ref(parameter, lambda _ref: _watched.pop(key, None)), description)
    with _lock:
        if _handle is None:
            _handle = register_optimizer_step_post_hook(_after_step)


def _after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if not _watched:
        return
    step = _steps[id(optimizer)] = _steps.get(id(optimizer), 0) + 1
    read_pending()
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            entry = _watched.get(id(parameter))
            if entry is None or entry[0]() is not parameter:
                continue
            bad = (~torch.isfinite(parameter.detach())).sum()
            if parameter.device.type == "cpu":
                _raise_if(int(bad), entry[1], step)
            else:
                host = torch.empty((), dtype=bad.dtype, pin_memory=torch.cuda.is_available())
                host.copy_(bad, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                _pending.append((host, event, entry[1], step))


def read_pending(wait: bool = False) -> None:
    """Read the GPU flags of earlier steps that are ready (all of them with ``wait``) and raise for a non-finite one."""
    while _pending and (wait or _pending[0][1].query()):
        host, event, description, step = _pending.pop(0)
        if wait:
            event.synchronize()
        _raise_if(int(host), description, step)


def _raise_if(count: int, description: str, step: int) -> None:
    if count:
        _pending.clear()
        raise NonFiniteAdapterError(
            f"ISaeRFT {description}: {count} non-finite value(s) after optimizer step {step}. Training was stopped "
            "there: lower the learning rate, clip gradients (max_grad_norm), or check the loss for NaNs (e.g. an "
            "ORPO/DPO log-ratio on empty completions); resume from the last finite checkpoint."
        )


def non_finite_parameters(model: Any) -> list[str]:
    """Descriptions of the ISaeRFT parameters of ``model`` that hold NaN or infinite values.

    Example:
        >>> non_finite_parameters(peft_model)  # doctest: +SKIP
        ["adapter 'default' at blocks.1.hook_resid_post (model.layers.1), isaerft_scale: 3 of 128 values"]
    """
    from .tuner.layer import ISaeRFTLayer

    found = []
    for module in model.modules():
        if not isinstance(module, ISaeRFTLayer):
            continue
        for container_name in module.adapter_layer_names:
            for adapter_name, parameter in getattr(module, container_name).items():
                bad = int((~torch.isfinite(parameter.detach())).sum())
                if bad:
                    splice = module.isaerft_splices[adapter_name]
                    found.append(f"adapter {adapter_name!r} at {splice.point.hook} ({splice.point.module_path}), "
                                 f"{container_name}: {bad} of {parameter.numel()} values")
    return found


def check_finite(model: Any, allow_non_finite: bool = False) -> None:
    """Raise :class:`NonFiniteAdapterError` when an ISaeRFT parameter of ``model`` is NaN or infinite.

    Example:
        >>> check_finite(peft_model)  # before saving; save_pretrained calls it  # doctest: +SKIP
    """
    read_pending(wait=True)
    found = non_finite_parameters(model)
    if found and not allow_non_finite:
        raise NonFiniteAdapterError(
            "Refusing to save an ISaeRFT adapter with non-finite parameters: " + "; ".join(found) + ". Fix the "
            "training run, or pass allow_non_finite=True to save_pretrained to write it anyway."
        )


def install_save_guard() -> None:
    """Make ``PeftModel.save_pretrained`` refuse ISaeRFT adapters with non-finite parameters (once per process).

    ``save_pretrained(..., allow_non_finite=True)`` writes them anyway, with a warning.

    Example:
        >>> install_save_guard()  # done by `import peft_isaerft`; calling it again changes nothing
    """
    import logging

    from peft import PeftModel

    from .patching import wrap_once
    from .tuner.config import is_isaerft_config

    def make(original: Any) -> Any:
        def save_pretrained(self: Any, *args: Any, allow_non_finite: bool = False, **kwargs: Any) -> Any:
            if any(is_isaerft_config(cfg) for cfg in self.peft_config.values()):
                found = non_finite_parameters(self)
                if found and allow_non_finite:
                    logging.getLogger(__name__).warning("Saving non-finite ISaeRFT parameters: %s", "; ".join(found))
                else:
                    check_finite(self)
            return original(self, *args, **kwargs)

        return save_pretrained

    wrap_once(PeftModel, "save_pretrained", "_isaerft_guard", make)
