"""Sparsity: a proximal L1 step that runs after every optimizer step, in any training loop, and
:func:`sparse_code`, the lasso code of a residual-stream vector on an SAE's decoder directions (what the bias
audit writes into its adapter).

Adam divides each coordinate's gradient by its own running scale, so an L1 term added to the loss moves
every latent at the same rate and leaves none at exactly zero. Instead, after every optimizer step, a
proximal (soft-threshold) step is applied in the optimizer's own metric:

    w <- sign(w) * max(|w| - lr * l1_coeff / d, 0)

with ``d = sqrt(v_hat) + eps`` for Adam-family optimizers (read from their state) and ``d = 1`` otherwise
(plain proximal SGD). This is the proximal step of ``loss + l1_coeff * |w|_1`` under Adam's diagonal
preconditioner: a latent stays at zero unless the data pushes it with a gradient larger than
``l1_coeff``, so ``l1_coeff`` is in the units of the loss gradient and the latents the data does not need
end exactly at zero. That is what makes a report of "the features this fine-tune changed" short and true.

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
_coefficients: dict[int, tuple[weakref.ref[torch.nn.Parameter], float, bool]] = {}
_hook_lock = threading.Lock()
_hook_handle: Any = None


__all__ = ["l1_coefficient", "register_l1", "soft_threshold_", "sparse_code"]


def register_l1(parameter: torch.nn.Parameter, l1_coeff: float, nonnegative: bool = False) -> None:
    """Apply a proximal L1 step to ``parameter`` after every optimizer step that updates it.

    With ``nonnegative=True`` the step also projects onto ``w >= 0`` (the proximal step of
    ``l1_coeff * |w|_1`` restricted to non-negative ``w``): a bias audit that asks which features the data
    *adds* uses it, since an SAE latent's activation is never negative.

    Example:
        >>> weight = torch.nn.Parameter(torch.zeros(8))
        >>> register_l1(weight, 1e-3)
        >>> l1_coefficient(weight)
        0.001
    """
    global _hook_handle
    key = id(parameter)
    if l1_coeff <= 0 and not nonnegative:
        _coefficients.pop(key, None)
        return
    _coefficients[key] = (weakref.ref(parameter, lambda _ref: _coefficients.pop(key, None)), float(l1_coeff),
                          nonnegative)
    with _hook_lock:
        if _hook_handle is None:
            _hook_handle = register_optimizer_step_post_hook(_proximal_step)


def l1_coefficient(parameter: torch.nn.Parameter) -> float:
    """The L1 coefficient registered for ``parameter`` (0 if none).

    Example:
        >>> l1_coefficient(torch.nn.Parameter(torch.zeros(3)))
        0.0
    """
    entry = _registration(parameter)
    return entry[1] if entry is not None else 0.0


def _registration(parameter: torch.nn.Parameter) -> tuple[Any, float, bool] | None:
    entry = _coefficients.get(id(parameter))
    return entry if entry is not None and entry[0]() is parameter else None


@torch.no_grad()
def soft_threshold_(tensor: torch.Tensor, threshold: float | torch.Tensor, nonnegative: bool = False) -> torch.Tensor:
    """In place: shrink every entry towards zero by ``threshold``, clamping at zero (and, with ``nonnegative``,
    clamping negative entries to zero).

    Example:
        >>> soft_threshold_(torch.tensor([-2.0, 0.5, 3.0]), 1.0)
        tensor([-1.,  0.,  2.])
    """
    if nonnegative:
        return tensor.copy_((tensor - threshold).clamp_min(0))
    return tensor.copy_(tensor.sign() * (tensor.abs() - threshold).clamp_min(0))


def _proximal_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if not _coefficients:
        return
    for group in optimizer.param_groups:
        lr = group.get("lr", 0.0)
        lr = float(lr.item() if isinstance(lr, torch.Tensor) else lr)
        for parameter in group["params"]:
            entry = _registration(parameter)
            if entry is not None and parameter.requires_grad:
                _ref, coefficient, nonnegative = entry
                threshold = lr * coefficient
                state = optimizer.state.get(parameter, {})
                if "exp_avg_sq" in state:
                    threshold = threshold / _adam_denominator(state, group)
                soft_threshold_(parameter.data, threshold, nonnegative)


def _adam_denominator(state: dict[str, Any], group: dict[str, Any]) -> torch.Tensor:
    """Adam's per-coordinate step divisor sqrt(v_hat) + eps: the metric the proximal step must use.

    A coordinate no gradient has reached yet has no metric of its own (``v_hat = 0`` would make the step
    ``lr * l1_coeff / eps`` and wipe any non-zero start at once, such as the source side of a latent map while its
    target side is still zero); it uses the mean metric of the coordinates that were reached, and a parameter no
    gradient has reached at all is not shrunk (infinite divisor). Computed on the device, with no host sync.
    """
    step = state.get("step", 1)
    step = float(step.item() if isinstance(step, torch.Tensor) else step)
    beta2 = group.get("betas", (0.9, 0.999))[1]
    root = (state["exp_avg_sq"] / (1 - beta2 ** max(step, 1.0))).sqrt()
    reached = root > 0
    typical = root.sum() / reached.sum().clamp_min(1)
    typical = torch.where(typical > 0, typical, torch.full_like(typical, float("inf")))
    return torch.where(reached, root, typical) + group.get("eps", 1e-8)


@torch.no_grad()
def sparse_code(
    target: torch.Tensor,
    directions: torch.Tensor,
    l1: float,
    nonnegative: bool = True,
    allowed: torch.Tensor | None = None,
    max_iterations: int = 3000,
    tolerance: float = 1e-6,
) -> tuple[torch.Tensor, float]:
    """The lasso code of ``target`` in the dictionary ``directions`` (one row per latent), by FISTA:

        argmin_a  0.5 * |a @ directions - target|^2 + lam * |a|_1     (a >= 0 with ``nonnegative``)

    with ``lam = l1 * lambda_max``, where ``lambda_max = max_i directions[i] . target`` (absolute value when
    signed) is the smallest ``lam`` whose code is all zeros; so ``l1`` is a fraction in [0, 1), as in the audit.
    ``allowed`` (a 0/1 mask over latents) keeps the other latents at zero. Returns the code and ``lambda_max``.

    Example:
        >>> directions = torch.nn.functional.normalize(torch.randn(512, 32), dim=-1)
        >>> code, lambda_max = sparse_code(3 * directions[7] + 2 * directions[40], directions, l1=0.05)
        >>> sorted(code.topk(2).indices.tolist())
        [7, 40]
    """
    directions = directions.detach().float()
    target = target.detach().float().to(directions.device)
    keep = None if allowed is None else allowed.to(directions.device).float()
    correlations = directions @ target
    if keep is not None:
        correlations = correlations * keep
    lambda_max = float(correlations.max() if nonnegative else correlations.abs().max())
    code = torch.zeros(directions.shape[0], device=directions.device)
    if lambda_max <= 0:
        return code, max(lambda_max, 0.0)
    lam = l1 * lambda_max
    # the gradient's Lipschitz constant: the top eigenvalue of directions^T directions, by power iteration
    vector = torch.nn.functional.normalize(torch.ones(directions.shape[1], device=directions.device), dim=0)
    for _ in range(50):
        vector = torch.nn.functional.normalize((directions @ vector) @ directions, dim=0)
    step = 1.0 / (1.01 * float(((directions @ vector) ** 2).sum()))
    momentum_point, momentum = code.clone(), 1.0
    for _ in range(max_iterations):
        gradient = (momentum_point @ directions - target) @ directions.T
        updated = momentum_point - step * gradient
        updated = (updated - step * lam).clamp_min(0) if nonnegative else \
            updated.sign() * (updated.abs() - step * lam).clamp_min(0)
        if keep is not None:
            updated = updated * keep
        next_momentum = (1 + (1 + 4 * momentum * momentum) ** 0.5) / 2
        momentum_point = updated + (momentum - 1) / next_momentum * (updated - code)
        change = float((updated - code).norm())
        code, momentum = updated, next_momentum
        if change <= tolerance * max(float(code.norm()), 1e-12):
            break
    return code, lambda_max
