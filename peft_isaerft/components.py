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


def residual_delta(
    encode: Callable[[torch.Tensor], torch.Tensor],
    decoder: torch.Tensor,
    hidden: torch.Tensor,
    scale: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """The change ``(f(z) - z) @ D`` to add to ``hidden``, computed in the decoder's dtype.

    The bias part is one ``d_sae x d_in`` product for the whole batch; the scale part decodes only the
    change, never the full reconstruction, and never recomputes the error term (it cancels).
    """
    compute_dtype = decoder.dtype
    sae_hidden = hidden.to(compute_dtype) if scale is not None else hidden
    out: torch.Tensor | None = None
    if scale is not None:
        out = (encode(sae_hidden) * scale.to(compute_dtype)) @ decoder
    if bias is not None:
        constant = bias.to(compute_dtype) @ decoder
        out = constant if out is None else out + constant
    if out is None:
        raise ValueError("residual_delta needs a scale, a bias or both.")
    return out.to(hidden.dtype)
