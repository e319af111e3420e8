"""Sparse fine-tunes: a proximal L1 step that runs after every optimizer step, in any training loop.

Adam divides each coordinate's gradient by its own running scale, so an L1 term added to the loss moves
every latent at the same rate and leaves none at exactly zero. The proximal (soft-threshold) step

    w <- sign(w) * max(|w| - lr * l1_coeff, 0)

applied after each step sets the latents the data does not need to exactly zero, which is what makes a
report of "the features this fine-tune changed" short and true.

It is wired in as a global ``torch.optim`` step post-hook that only touches parameters registered here, so
it works inside ``transformers.Trainer``, TRL trainers, accelerate and plain loops without any callback.

Example:
    >>> config = ISaeRFTConfig(saes=[{"path": "my_sae"}], component="bias", l1_coeff=1e-3)  # doctest: +SKIP
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

# keyed by id(): tensors compare elementwise, so they cannot be dictionary keys themselves
_coefficients: dict[int, tuple[weakref.ref[torch.nn.Parameter], float]] = {}
_hook_lock = threading.Lock()
_hook_handle: Any = None


def register_l1(parameter: torch.nn.Parameter, l1_coeff: float) -> None:
    """Apply a proximal L1 step to ``parameter`` after every optimizer step that updates it."""
    global _hook_handle
    key = id(parameter)
    if l1_coeff <= 0:
        _coefficients.pop(key, None)
        return
    _coefficients[key] = (weakref.ref(parameter, lambda _ref: _coefficients.pop(key, None)), float(l1_coeff))
    with _hook_lock:
        if _hook_handle is None:
            _hook_handle = register_optimizer_step_post_hook(_proximal_step)


def l1_coefficient(parameter: torch.nn.Parameter) -> float:
    """The L1 coefficient registered for ``parameter`` (0 if none)."""
    entry = _coefficients.get(id(parameter))
    return entry[1] if entry is not None and entry[0]() is parameter else 0.0


@torch.no_grad()
def soft_threshold_(tensor: torch.Tensor, threshold: float) -> torch.Tensor:
    """In place: shrink every entry towards zero by ``threshold``, clamping at zero."""
    return tensor.copy_(tensor.sign() * (tensor.abs() - threshold).clamp_min(0))


def _proximal_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if not _coefficients:
        return
    for group in optimizer.param_groups:
        lr = group.get("lr", 0.0)
        lr = float(lr.item() if isinstance(lr, torch.Tensor) else lr)
        for parameter in group["params"]:
            coefficient = l1_coefficient(parameter)
            if coefficient > 0 and parameter.requires_grad:
                soft_threshold_(parameter.data, lr * coefficient)
