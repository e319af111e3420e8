"""The math of every ISaeRFT component, in one place.

At an attach point with activations ``h`` and a frozen SAE (encoder ``E``, decoder directions ``D``), the
SAE's reconstruction error is kept and only the latents are edited::

    z  = E(h)
    h' = h + (f(z) - z) @ D

so a fresh adapter (``f`` = identity) changes nothing. The components are

==============  ======================  ===============  =========================================
component       f(z)                    f(z) - z         cost
==============  ======================  ===============  =========================================
``scale``       (1 + s) * z             s * z            one encoder pass + one decode of s * z
``bias``        z + b                   b                none per token: b @ D is one vector
``scale_bias``  (1 + s) * z + b         s * z + b        as ``scale``
==============  ======================  ===============  =========================================

``s`` and ``b`` have one entry per SAE latent, so every trained number belongs to a named feature.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import kernels

__all__ = ["COMPONENTS", "Component", "SparseLatentScale", "get_component", "residual_delta"]


@dataclass(frozen=True)
class Component:
    """One kind of latent edit.

    Example:
        >>> COMPONENTS["bias"].mergeable, COMPONENTS["scale"].needs_latents
        (True, True)
    """

    name: str
    parameters: tuple[str, ...]
    """Which per-latent vectors it trains: a subset of ("scale", "bias")."""
    needs_latents: bool
    """Whether it reads the SAE latents z (and so needs an encoder pass per token)."""
    mergeable: bool
    """Whether the edit is a constant vector that can be folded into a bias of the base model."""
    summary: str


COMPONENTS: dict[str, Component] = {
    "scale": Component("scale", ("scale",), True, False, "z -> (1 + s) * z: amplify or damp features that fire"),
    "bias": Component("bias", ("bias",), False, True, "z -> z + b: add a fixed amount of each feature"),
    "scale_bias": Component("scale_bias", ("scale", "bias"), True, False, "z -> (1 + s) * z + b"),
}


def get_component(name: str) -> Component:
    """Look up a component by name.

    Raises:
        ValueError: the name is not a known component (the message lists them).

    Example:
        >>> get_component("scale_bias").parameters
        ('scale', 'bias')
    """
    if name not in COMPONENTS:
        raise ValueError(
            f"Unknown ISaeRFT component {name!r}. Choose one of {sorted(COMPONENTS)}: "
            + "; ".join(f"{c.name}: {c.summary}" for c in COMPONENTS.values())
        )
    return COMPONENTS[name]


def residual_delta(
    encode: Callable[[torch.Tensor], torch.Tensor],
    decoder: torch.Tensor,
    hidden: torch.Tensor,
    scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    select: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    encoder_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """The change ``(f(z) - z) @ D`` to add to ``hidden``, computed in the decoder's dtype.

    The bias part is one ``d_sae x d_in`` product for the whole batch; the scale part decodes only the
    change, never the full reconstruction, and never recomputes the error term (it cancels). When ``select``
    (an :mod:`~peft_isaerft.active_latents` selector: hidden -> each token's active ``(values, indices)``) and
    ``encoder_rows`` (``W_enc`` transposed, ``d_sae x d_in``, contiguous) are given, the scale part works on the
    active latents only (see :class:`SparseLatentScale`); otherwise it is plain autograd over dense latents.

    Example:
        >>> sae = StandardSAE(StandardSAEConfig(d_in=16, d_sae=64))  # doctest: +SKIP
        >>> hidden = torch.randn(2, 5, 16)  # doctest: +SKIP
        >>> delta = residual_delta(sae.encode, sae.W_dec, hidden, torch.zeros(64), None)  # doctest: +SKIP
        >>> bool(delta.abs().max() == 0)  # a zero scale changes nothing  # doctest: +SKIP
        True
    """
    compute_dtype = decoder.dtype
    out: torch.Tensor | None = None
    if scale is not None:
        sae_hidden = hidden.to(compute_dtype)
        scale = scale.to(compute_dtype)
        if select is not None and encoder_rows is not None:
            flat = sae_hidden.reshape(-1, sae_hidden.shape[-1])
            values, indices = select(flat.detach())
            out = SparseLatentScale.apply(flat, scale, values, indices, encoder_rows, decoder).reshape(hidden.shape)
        else:
            out = (encode(sae_hidden) * scale) @ decoder
    if bias is not None:
        constant = bias.to(compute_dtype) @ decoder
        out = constant if out is None else out + constant
    if out is None:
        raise ValueError("residual_delta needs a scale, a bias or both.")
    return out.to(hidden.dtype)


ACTIVE_DOT_ELEMENTS = {"cpu": 1 << 19}
"""Elements of gathered decoder rows materialised at once by :func:`active_dots`, per device type (default
:data:`DEFAULT_ACTIVE_DOT_ELEMENTS`). Measured on a 2-core CPU: blocks that stay in cache (2 MiB) halve the time of
one large gather; on a GPU large blocks keep the number of kernel launches small."""
DEFAULT_ACTIVE_DOT_ELEMENTS = 1 << 25

ACTIVE_DOT_METHOD = "gather"
"""How :func:`active_dots` works: "gather" (the active rows only) or "dense" (``grad @ rows.T``, then a gather: one
more encoder-sized product, which matrix units can make cheaper than gathering when ``width`` is large)."""


def weighted_row_sum(indices: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_j weights[t, j] * rows[indices[t, j]]``: a decode from each token's active latents only.

    A Triton kernel on CUDA where Triton is installed (:mod:`peft_isaerft.kernels`), ``embedding_bag`` elsewhere.
    """
    if kernels.usable(rows):
        return kernels.weighted_row_sum(indices, weights, rows)
    return torch.nn.functional.embedding_bag(indices, rows, per_sample_weights=weights, mode="sum")


def active_dots(grad: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor,
                values: torch.Tensor | None = None) -> torch.Tensor:
    """``out[t, j] = grad[t] . rows[indices[t, j]]``: the gradient of each token's active latents only.

    ``tokens x width x d_in`` multiply-adds instead of the ``tokens x d_sae x d_in`` of ``grad @ rows.T``. With
    ``values`` given and Triton on CUDA, a kernel reads only the rows of live slots (value != 0; it returns 0 for the
    others); otherwise the rows are gathered in blocks of at most :data:`ACTIVE_DOT_ELEMENTS` elements so memory stays
    flat.
    """
    if values is not None and ACTIVE_DOT_METHOD == "gather" and kernels.usable(rows):
        return kernels.active_dots(grad, indices, values, rows)
    if ACTIVE_DOT_METHOD == "dense":
        return (grad @ rows.T).gather(1, indices)
    tokens, width = indices.shape
    out = torch.empty(indices.shape, dtype=grad.dtype, device=grad.device)
    budget = ACTIVE_DOT_ELEMENTS.get(grad.device.type, DEFAULT_ACTIVE_DOT_ELEMENTS)
    chunk = max(1, budget // max(1, width * rows.shape[-1]))
    for start in range(0, tokens, chunk):
        stop = start + chunk
        gathered = rows[indices[start:stop]]  # chunk x width x d_in
        torch.bmm(gathered, grad[start:stop].unsqueeze(-1), out=out[start:stop].unsqueeze(-1))
    return out


class SparseLatentScale(torch.autograd.Function):
    """``delta = sum_j v_j * s[i_j] * D[i_j]`` over the active latents ``(v, i)`` of each token.

    Saves only the ``tokens x L0`` values and indices for backward (not ``tokens x d_sae`` latents), and its
    gradients touch only active latents: ``grad . D[i]`` is computed for active pairs only (:func:`active_dots`).
    For the gradient into ``hidden`` it uses ``dz_i/dh = W_enc[:, i]`` on active latents, exact for ReLU, TopK and
    JumpReLU encoders away from their switching points (the same convention autograd uses). Nothing in it reads a
    value back to the host, so a GPU step never waits.

    Example:
        >>> values, indices = selector_for(sae)(hidden)  # doctest: +SKIP
        >>> delta = SparseLatentScale.apply(hidden, scale, values, indices, encoder_rows, sae.W_dec)  # doctest: +SKIP
    """

    @staticmethod
    def forward(ctx, hidden, scale, values, indices, encoder_rows, decoder):  # type: ignore[override]
        weights = values * scale[indices]
        delta = weighted_row_sum(indices, weights, decoder)
        ctx.save_for_backward(scale, values, indices, encoder_rows, decoder)
        return delta

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        scale, values, indices, encoder_rows, decoder = ctx.saved_tensors
        grad = grad.contiguous()
        grad_latents = active_dots(grad, indices, decoder, values)
        grad_scale = grad_hidden = None
        if ctx.needs_input_grad[1]:
            grad_scale = torch.zeros_like(scale).index_add_(0, indices.flatten(), (grad_latents * values).flatten())
        if ctx.needs_input_grad[0]:
            # padding slots hold value 0 and must not pass a gradient (ReLU's derivative there is 0)
            weights = grad_latents * scale[indices] * (values != 0)
            grad_hidden = weighted_row_sum(indices, weights, encoder_rows)
        return grad_hidden, grad_scale, None, None, None, None
