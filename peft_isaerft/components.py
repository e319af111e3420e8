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


@dataclass(frozen=True)
class Component:
    """One kind of latent edit."""

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
    """
    if name not in COMPONENTS:
        raise ValueError(
            f"Unknown ISaeRFT component {name!r}. Choose one of {sorted(COMPONENTS)}: "
            + "; ".join(f"{c.name}: {c.summary}" for c in COMPONENTS.values())
        )
    return COMPONENTS[name]


# encoders of the form z = act((h - b_dec) @ W_enc + b_enc) whose active latents have dz/dh = W_enc[:, i]
SPARSE_BACKWARD_ARCHITECTURES = frozenset({"standard", "topk", "jumprelu"})


def residual_delta(
    encode: Callable[[torch.Tensor], torch.Tensor],
    decoder: torch.Tensor,
    hidden: torch.Tensor,
    scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    encoder: torch.Tensor | None = None,
) -> torch.Tensor:
    """The change ``(f(z) - z) @ D`` to add to ``hidden``, computed in the decoder's dtype.

    The bias part is one ``d_sae x d_in`` product for the whole batch; the scale part decodes only the
    change, never the full reconstruction, and never recomputes the error term (it cancels). When the
    SAE's ``encoder`` (``W_enc`` transposed, ``d_sae x d_in``) is given, the scale part keeps only the active
    latents for the backward pass (see :class:`SparseLatentScale`); otherwise it is plain autograd over dense latents.
    """
    compute_dtype = decoder.dtype
    out: torch.Tensor | None = None
    if scale is not None:
        sae_hidden = hidden.to(compute_dtype)
        scale = scale.to(compute_dtype)
        if encoder is not None:
            out = sparse_scale_delta(encode, encoder, decoder, sae_hidden, scale)
        else:
            out = (encode(sae_hidden) * scale) @ decoder
    if bias is not None:
        constant = bias.to(compute_dtype) @ decoder
        out = constant if out is None else out + constant
    if out is None:
        raise ValueError("residual_delta needs a scale, a bias or both.")
    return out.to(hidden.dtype)


def sparse_scale_delta(
    encode: Callable[[torch.Tensor], torch.Tensor],
    encoder: torch.Tensor,
    decoder: torch.Tensor,
    hidden: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """``(s * z) @ D`` with z kept as (value, index) pairs of its active latents only.

    ``encoder`` is ``W_enc`` transposed (``d_sae x d_in``) and contiguous, so that gathering one latent's encoder
    row is a contiguous read.
    """
    with torch.no_grad():
        values, indices = active_latents(encode(hidden))
    delta = SparseLatentScale.apply(hidden.reshape(-1, hidden.shape[-1]), scale, values, indices, encoder, decoder)
    return delta.reshape(hidden.shape)


def active_latents(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)``, each ``tokens x L0max``, of the non-zero latents of every token (zero-padded)."""
    flat = latents.reshape(-1, latents.shape[-1])
    width = max(int((flat != 0).sum(-1).max()), 1)
    indices = flat.abs().topk(width, dim=-1, sorted=False).indices
    return flat.gather(1, indices), indices


_BACKWARD_CHUNK = 1024


class SparseLatentScale(torch.autograd.Function):
    """``delta = sum_j v_j * s[i_j] * D[i_j]`` over the active latents ``(v, i)`` of each token.

    Saves only the ``tokens x L0`` values and indices for backward (not ``tokens x d_sae`` latents), and its
    gradients touch only active latents: ``grad . D[i]`` is computed for active pairs only (``tokens x L0 x d_in``
    work instead of a ``tokens x d_sae x d_in`` product). For the gradient into ``hidden`` it uses
    ``dz_i/dh = W_enc[:, i]`` on active latents, exact for ReLU, TopK and JumpReLU encoders away from their
    switching points (the same convention autograd uses).
    """

    @staticmethod
    def forward(ctx, hidden, scale, values, indices, encoder, decoder):  # type: ignore[override]
        weights = values * scale[indices]
        delta = torch.nn.functional.embedding_bag(indices, decoder, per_sample_weights=weights, mode="sum")
        ctx.save_for_backward(scale, values, indices, encoder, decoder)
        return delta

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        scale, values, indices, encoder, decoder = ctx.saved_tensors
        grad_latents = torch.empty_like(values)
        for start in range(0, grad.shape[0], _BACKWARD_CHUNK):
            stop = start + _BACKWARD_CHUNK
            rows = decoder[indices[start:stop]]  # chunk x L0 x d_in
            grad_latents[start:stop] = torch.bmm(rows, grad[start:stop].unsqueeze(-1)).squeeze(-1)
        grad_scale = grad_hidden = None
        if ctx.needs_input_grad[1]:
            grad_scale = torch.zeros_like(scale).index_add_(0, indices.flatten(), (grad_latents * values).flatten())
        if ctx.needs_input_grad[0]:
            weights = grad_latents * scale[indices] * (values != 0)
            grad_hidden = torch.nn.functional.embedding_bag(indices, encoder, per_sample_weights=weights, mode="sum")
        return grad_hidden, grad_scale, None, None, None, None
