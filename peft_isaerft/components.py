"""Every ISaeRFT component: one small class each, registered in :data:`COMPONENTS`.

At an attach point with activations ``h`` and a frozen SAE (encoder ``E``, decoder directions ``D``), the
SAE's reconstruction error is kept and only the latents are edited::

    z  = E(h)
    h' = h + (f(z) - z) @ D

so a fresh adapter (``f`` = identity) changes nothing. The components are

==============  =================================================  ==========================================
component       f(z)                                               cost
==============  =================================================  ==========================================
``scale``       (1 + s) * z                                        one encoder pass + a decode of active latents
``bias``        z + b                                              none per token: b @ D is one vector
``scale_bias``  (1 + s) * z + b                                    as ``scale``
``clamp``       z + [z > 0] * g * sigmoid(k (z - a)) * (c - z)     as ``scale``
``latent_map``  z + B (A^T z), A and B one row of r per latent     as ``scale``, plus ``r x d_in`` per token
==============  =================================================  ==========================================

Every parameter has one entry (or one row) per SAE latent, so every trained number belongs to a named feature. A
component class owns its parameters (names, identity values, which are sparse), its math, how it reads in a report
and whether and how it merges; the layer, the report, the card and the CLI ask it and never branch on its name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from . import kernels

__all__ = ["COMPONENTS", "Clamp", "Component", "LatentMap", "LatentParameter", "SparseLatentScale", "get_component",
           "per_latent", "residual_delta"]


@dataclass(frozen=True)
class LatentParameter:
    """One per-latent vector a component trains.

    Example:
        >>> LatentParameter("scale", identity=0.0).identity
        0.0
    """

    name: str
    identity: float = 0.0
    """The value at which this parameter leaves the model unchanged (the init with ``init_weights=True``)."""
    random_std: float = 0.1
    """Spread of the non-identity init (``init_weights=False``, for tests), around ``random_mean``."""
    random_mean: float = 0.0
    sparse: bool = True
    """Whether ``l1_coeff`` applies to it (the proximal step keeps only the latents the data needs)."""
    nonnegative: bool = False
    """Projected onto ``>= 0`` after every optimizer step (with the proximal step)."""
    columns: str | None = None
    """The config field giving the length of each latent's row (``latent_map_rank``); None: one number per latent."""
    init_std: float = 0.0
    """Non-zero: start random even with ``init_weights=True``, entries of spread ``init_std / sqrt(columns)`` (the
    component is still the identity at init through another parameter, as LoRA's ``A`` is while ``B = 0``)."""

    def shape(self, d_sae: int, config: object) -> tuple[int, ...]:
        """``(d_sae,)``, or ``(d_sae, columns)`` for a row per latent."""
        return (d_sae,) if self.columns is None else (d_sae, int(getattr(config, self.columns)))

    def masked(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``values`` where ``mask`` is 1, the identity value where it is 0 (latents outside an allow-list)."""
        mask = mask.reshape(mask.shape + (1,) * (values.dim() - mask.dim()))
        return self.identity + (values - self.identity) * mask


def per_latent(values: torch.Tensor) -> torch.Tensor:
    """One number per latent: the values themselves, or each latent's row norm for a parameter with rows.

    Example:
        >>> per_latent(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
        tensor([5., 0.])
    """
    return values if values.dim() == 1 else values.norm(dim=-1)


@dataclass(frozen=True)
class Reading:
    """How one latent's trained numbers read in a report: a value, how far it moves the residual stream, and words."""

    param: str
    value: torch.Tensor
    effect: torch.Tensor
    detail: Callable[[int], str | None] | None = None
    latents: torch.Tensor | None = None
    """When given, ``value`` and ``effect`` list entries (edges) instead of one number per latent, and this is the
    latent each entry acts on."""
    sources: torch.Tensor | None = None
    """For edges: the latent each entry reads from (``sources[k] -> latents[k]``)."""


@dataclass(frozen=True)
class SpliceInputs:
    """What a component's math needs at one attach point."""

    encode: Callable[[torch.Tensor], torch.Tensor]
    decoder: torch.Tensor
    hidden: torch.Tensor
    select: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    encoder_rows: torch.Tensor | None = None
    encoder_gain: torch.Tensor | None = None
    """Per latent, the factor between ``dz_i/dh`` and ``W_enc[:, i]`` (``LatentSelector.encoder_gain``); None: 1."""

    @property
    def sparse(self) -> bool:
        """Whether to work on each token's active latents (a selector and the encoder rows are given)."""
        return self.select is not None and self.encoder_rows is not None

    def flat(self, dtype: torch.dtype) -> torch.Tensor:
        """The hidden states as ``tokens x d_in`` in ``dtype`` (the SAE's)."""
        return self.hidden.to(dtype).reshape(-1, self.hidden.shape[-1])

    def active_latents(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(active, values, indices)``: each token's active latents, ``active`` differentiable with respect to
        ``flat`` through the encoder rows (:class:`ActiveValues`)."""
        # the selector gets the hidden states in their own dtype (a bfloat16 model's allow the split encoder product)
        values, indices = self.select(self.hidden.reshape(flat.shape).detach())
        return ActiveValues.apply(flat, values, indices, self.encoder_rows, self.encoder_gain), values, indices


class Component:
    """One kind of latent edit. Subclasses set the class attributes and implement :meth:`delta`.

    Example:
        >>> COMPONENTS["bias"].mergeable, COMPONENTS["scale"].needs_latents
        (True, True)
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    parameters: ClassVar[tuple[LatentParameter, ...]]
    needs_latents: ClassVar[bool] = True
    """Whether it reads the SAE latents z (and so needs an encoder pass per token)."""
    merge_refusal: ClassVar[str | None] = None
    """Why it cannot be folded into the base model's weights (None: it can)."""

    @property
    def mergeable(self) -> bool:
        return self.merge_refusal is None

    @property
    def parameter_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parameters)

    def delta(self, params: dict[str, torch.Tensor], inputs: SpliceInputs) -> torch.Tensor:
        """``(f(z) - z) @ D`` for ``inputs.hidden``, in the hidden states' dtype."""
        raise NotImplementedError

    def readings(self, params: dict[str, torch.Tensor], decoder_norms: torch.Tensor,
                 mean_activation: torch.Tensor | None) -> list[Reading]:
        """Per trained vector: its values and their effect per latent (``|value| * ||d||``, times the latent's mean
        activation for edits proportional to it when data was given)."""
        return [Reading(name, values, values.abs() * decoder_norms) for name, values in params.items()]

    def merged_constant(self, params: dict[str, torch.Tensor], decoder: torch.Tensor) -> torch.Tensor:
        """The constant residual change a merge folds into a bias (mergeable components only)."""
        raise ValueError(self.merge_refusal or f"component {self.name!r} cannot be merged")


class Scale(Component):
    name = "scale"
    summary = "z -> (1 + s) * z: amplify or damp features that fire"
    parameters = (LatentParameter("scale"),)
    merge_refusal = ("its edit (1 + s) * z depends on each token through the SAE encoder's nonlinearity, so it is "
                     "not a fixed change of any weight")

    def delta(self, params: dict[str, torch.Tensor], inputs: SpliceInputs) -> torch.Tensor:
        return residual_delta(inputs.encode, inputs.decoder, inputs.hidden, params["scale"], None,
                              select=inputs.select, encoder_rows=inputs.encoder_rows,
                              encoder_gain=inputs.encoder_gain)

    def readings(self, params: dict[str, torch.Tensor], decoder_norms: torch.Tensor,
                 mean_activation: torch.Tensor | None) -> list[Reading]:
        readings = super().readings(params, decoder_norms, mean_activation)
        if mean_activation is None:
            return readings
        return [Reading(r.param, r.value, r.effect * mean_activation.clamp_min(0) if r.param == "scale" else r.effect)
                for r in readings]


class Bias(Component):
    name = "bias"
    summary = "z -> z + b: add a fixed amount of each feature"
    parameters = (LatentParameter("bias"),)
    needs_latents = False

    def delta(self, params: dict[str, torch.Tensor], inputs: SpliceInputs) -> torch.Tensor:
        return residual_delta(inputs.encode, inputs.decoder, inputs.hidden, None, params["bias"])

    def merged_constant(self, params: dict[str, torch.Tensor], decoder: torch.Tensor) -> torch.Tensor:
        return params["bias"].double() @ decoder.double().to(params["bias"].device)


class ScaleBias(Scale):
    name = "scale_bias"
    summary = "z -> (1 + s) * z + b"
    parameters = (LatentParameter("scale"), LatentParameter("bias"))

    def delta(self, params: dict[str, torch.Tensor], inputs: SpliceInputs) -> torch.Tensor:
        return residual_delta(inputs.encode, inputs.decoder, inputs.hidden, params["scale"], params["bias"],
                              select=inputs.select, encoder_rows=inputs.encoder_rows,
                              encoder_gain=inputs.encoder_gain)


class Clamp(Component):
    """A learned clamp per latent, acting only where the latent fires::

        f(z)_i = z_i + [z_i > 0] * g_i * sigmoid(k * (z_i - a_i)) * (c_i - z_i)

    ``g`` (the gate, non-negative and sparse under ``l1_coeff``; 1 pulls all the way) says how strongly latent ``i``
    is pulled, ``a`` above which activation
    it acts, ``c`` the value it is pulled to (free to go negative: SAE-based unlearning clamps features to negative
    values when they fire). Exactly the identity at init (``g = 0``).

    Example:
        >>> ISaeRFTConfig(saes=[{"path": "my_sae"}], component="clamp", l1_coeff=1e-3)  # doctest: +SKIP
    """

    name = "clamp"
    summary = "z -> z + [z>0] g sigmoid(k (z - a)) (c - z): pull firing features towards a learned value"
    parameters = (LatentParameter("clamp_gate", nonnegative=True, random_mean=0.3),
                  LatentParameter("clamp_threshold", sparse=False),
                  LatentParameter("clamp_target", sparse=False, random_std=1.0))
    sharpness = 4.0
    """``k``: how sharply the gate switches around the threshold, per unit of activation."""
    merge_refusal = "a clamp depends on each token's activation, so it is not a fixed change of any weight"

    def delta(self, params: dict[str, torch.Tensor], inputs: SpliceInputs) -> torch.Tensor:
        flat = inputs.flat(inputs.decoder.dtype)
        gate, threshold, target = (params[n].to(flat.dtype) for n in self.parameter_names)
        if inputs.sparse:
            active, values, indices = inputs.active_latents(flat)
            weights = self.edit(active, gate[indices], threshold[indices], target[indices])
            delta = SparseDecode.apply(weights, indices, values, inputs.decoder)
        else:
            latents = inputs.encode(flat)
            delta = self.edit(latents, gate, threshold, target) @ inputs.decoder
        return delta.reshape(inputs.hidden.shape).to(inputs.hidden.dtype)

    def edit(self, z: torch.Tensor, gate: torch.Tensor, threshold: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``f(z) - z`` elementwise (zero where ``z`` is not active)."""
        return (z > 0) * gate * torch.sigmoid(self.sharpness * (z - threshold)) * (target - z)

    def readings(self, params: dict[str, torch.Tensor], decoder_norms: torch.Tensor,
                 mean_activation: torch.Tensor | None) -> list[Reading]:
        gate, threshold, target = (params[n] for n in self.parameter_names)
        # how far a firing latent moves: the pull (c - z) at its typical activation, scaled by the gate
        typical = mean_activation.clamp_min(0) if mean_activation is not None else threshold.clamp_min(0)
        effect = gate.abs() * (target - typical).abs() * decoder_norms

        def detail(latent: int) -> str:
            g, a, c = float(gate[latent]), float(threshold[latent]), float(target[latent])
            if g <= 1:
                return f"when above {a:.3g}, pulled to {c:+.3g}"
            # a gate above 1 overshoots the target: fully switched on, z -> (1 - g) z + g c
            return f"when above {a:.3g}, z -> {1 - g:+.3g} z {g * c:+.3g} (overshoots {c:+.3g})"

        return [Reading("clamp", gate, effect, detail)]


class LatentMap(Component):
    """Latents that drive other latents, through a sparse low-rank map::

        f(z) = z + B (A^T z)        A, B: d_sae x r (one row of r numbers per latent), B = 0 at init

    so the learned map is ``W = B A^T``: an edge ``i -> j`` of weight ``W[j, i]`` adds ``W[j, i] * z_i`` to latent
    ``j``. Both sides are sparse under ``l1_coeff`` (a proximal step per entry), so few source rows and few target rows
    end non-zero and the map reads as a short list of edges. Computed from the active latents only: ``A^T z`` gathers
    the rows of each token's L0 active latents, and ``(B u) @ D = u @ (B^T D)`` decodes through one ``r x d_in``
    matrix per step instead of ``d_sae`` latents per token.

    Example:
        >>> ISaeRFTConfig(saes=[{"path": "my_sae"}], component="latent_map", latent_map_rank=8,
        ...               l1_coeff=1e-3)  # doctest: +SKIP
    """

    name = "latent_map"
    summary = "z -> z + B (A^T z): firing latents drive others through a sparse rank-r map, read as edges i -> j"
    parameters = (LatentParameter("map_source", columns="latent_map_rank", init_std=1.0, random_std=1.0),
                  LatentParameter("map_target", columns="latent_map_rank", random_std=0.1))
    merge_refusal = "a latent map depends on each token's latents, so it is not a fixed change of any weight"
    edges_per_target = 8
    """How many incoming edges the reading keeps per target latent (the strongest)."""
    targets_per_block = 1024

    def delta(self, params: dict[str, torch.Tensor], inputs: SpliceInputs) -> torch.Tensor:
        flat = inputs.flat(inputs.decoder.dtype)
        source, target = (params[n].to(flat.dtype) for n in self.parameter_names)
        if inputs.sparse:
            active, _values, indices = inputs.active_latents(flat)
            channels = torch.nn.functional.embedding_bag(indices, source, per_sample_weights=active, mode="sum")
        else:
            channels = inputs.encode(flat) @ source
        delta = channels @ (target.T @ inputs.decoder)
        return delta.reshape(inputs.hidden.shape).to(inputs.hidden.dtype)

    def readings(self, params: dict[str, torch.Tensor], decoder_norms: torch.Tensor,
                 mean_activation: torch.Tensor | None) -> list[Reading]:
        source, target = (params[n].float() for n in self.parameter_names)
        # only rows the L1 step left non-zero can carry an edge; a NaN row counts as non-zero so it is reported
        sources = ((source != 0).any(-1)).nonzero().flatten()
        targets = ((target != 0).any(-1)).nonzero().flatten()
        # per unit of source activation, or at the source's mean activation on the data when given
        source_weight = (mean_activation.clamp_min(0)[sources] if mean_activation is not None
                         else torch.ones(len(sources)))
        weights, effects, ends, starts = [], [], [], []
        keep = min(self.edges_per_target, len(sources))
        for block in targets.split(self.targets_per_block) if keep else ():
            edges = target[block] @ source[sources].T  # block x sources
            effect = edges.abs() * source_weight * decoder_norms[block, None]
            effect = torch.where(torch.isfinite(edges), effect, torch.full_like(effect, float("inf")))
            top = effect.topk(keep, dim=-1)
            weights.append(edges.gather(1, top.indices).flatten())
            effects.append(top.values.flatten())
            ends.append(block.repeat_interleave(keep))
            starts.append(sources[top.indices].flatten())
        if not weights:
            empty = torch.zeros(0)
            return [Reading("map", empty, empty, latents=empty.long(), sources=empty.long())]
        return [Reading("map", torch.cat(weights), torch.cat(effects), latents=torch.cat(ends),
                        sources=torch.cat(starts))]

    def edges(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The whole map ``W = B A^T`` (``d_sae x d_sae``, target by source): for small SAEs and tests."""
        source, target = (params[n].float() for n in self.parameter_names)
        return target @ source.T


COMPONENTS: dict[str, Component] = {c.name: c() for c in (Scale, Bias, ScaleBias, Clamp, LatentMap)}
"""Component name -> the component; ``ISaeRFTConfig.component`` names one."""


def get_component(name: str) -> Component:
    """Look up a component by name.

    Raises:
        ValueError: the name is not a known component (the message lists them).

    Example:
        >>> get_component("scale_bias").parameter_names
        ('scale', 'bias')
    """
    if name not in COMPONENTS:
        raise ValueError(
            f"Unknown ISaeRFT component {name!r}. Choose one of {sorted(COMPONENTS)}: "
            + "; ".join(f"{c.name}: {c.summary}" for c in COMPONENTS.values())
        )
    return COMPONENTS[name]


def parameter_container_names() -> tuple[str, ...]:
    """The ``isaerft_<parameter>`` containers every layer holds: one per parameter name of any component."""
    names = dict.fromkeys(p.name for c in COMPONENTS.values() for p in c.parameters)
    return tuple(f"isaerft_{name}" for name in names)


def residual_delta(
    encode: Callable[[torch.Tensor], torch.Tensor],
    decoder: torch.Tensor,
    hidden: torch.Tensor,
    scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    select: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    encoder_rows: torch.Tensor | None = None,
    encoder_gain: torch.Tensor | None = None,
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
            values, indices = select(hidden.reshape(flat.shape).detach())
            out = SparseLatentScale.apply(flat, scale, values, indices, encoder_rows, decoder,
                                          encoder_gain).reshape(hidden.shape)
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


def _input_gradient(latent_grads: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                   encoder_rows: torch.Tensor, encoder_gain: torch.Tensor | None) -> torch.Tensor:
    """``sum_j latent_grads[t, j] * gain[i_j] * W_enc[:, i_j]`` over each token's live slots: the gradient into the
    hidden states through the active latents (``dz_i/dh = gain_i * W_enc[:, i]``; gain 1 where None)."""
    # padding slots hold value 0 and must not pass a gradient (ReLU's derivative there is 0)
    weights = latent_grads * (values != 0)
    if encoder_gain is not None:
        weights = weights * encoder_gain[indices]
    return weighted_row_sum(indices, weights, encoder_rows)


class SparseLatentScale(torch.autograd.Function):
    """``delta = sum_j v_j * s[i_j] * D[i_j]`` over the active latents ``(v, i)`` of each token.

    Saves only the ``tokens x L0`` values and indices for backward (not ``tokens x d_sae`` latents), and its
    gradients touch only active latents: ``grad . D[i]`` is computed for active pairs only (:func:`active_dots`).
    For the gradient into ``hidden`` it uses ``dz_i/dh = W_enc[:, i]`` on active latents (times ``encoder_gain[i]``
    where the SAE rescales its latents by decoder norm), exact for ReLU, TopK and JumpReLU encoders away from their
    switching points (the same convention autograd uses). Nothing in it reads a value back to the host, so a GPU
    step never waits.

    Example:
        >>> values, indices = selector_for(sae)(hidden)  # doctest: +SKIP
        >>> delta = SparseLatentScale.apply(hidden, scale, values, indices, encoder_rows, sae.W_dec)  # doctest: +SKIP
    """

    @staticmethod
    def forward(ctx, hidden, scale, values, indices, encoder_rows, decoder, encoder_gain=None):  # type: ignore[override]
        weights = values * scale[indices]
        delta = weighted_row_sum(indices, weights, decoder)
        ctx.save_for_backward(scale, values, indices, encoder_rows, decoder, encoder_gain)
        return delta

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        scale, values, indices, encoder_rows, decoder, encoder_gain = ctx.saved_tensors
        grad = grad.contiguous()
        grad_latents = active_dots(grad, indices, decoder, values)
        grad_scale = grad_hidden = None
        if ctx.needs_input_grad[1]:
            grad_scale = torch.zeros_like(scale).index_add_(0, indices.flatten(), (grad_latents * values).flatten())
        if ctx.needs_input_grad[0]:
            grad_hidden = _input_gradient(grad_latents * scale[indices], values, indices, encoder_rows, encoder_gain)
        return grad_hidden, grad_scale, None, None, None, None, None


class ActiveValues(torch.autograd.Function):
    """The active latents' values, differentiable with respect to the hidden states through ``dz_i/dh = W_enc[:, i]``
    (times ``encoder_gain[i]`` where given; exact for ReLU, TopK and JumpReLU encoders away from their switching
    points; padding slots pass nothing)."""

    @staticmethod
    def forward(ctx, hidden, values, indices, encoder_rows, encoder_gain=None):  # type: ignore[override]
        ctx.save_for_backward(values, indices, encoder_rows, encoder_gain)
        return values.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        values, indices, encoder_rows, encoder_gain = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        return _input_gradient(grad, values, indices, encoder_rows, encoder_gain), None, None, None, None


class SparseDecode(torch.autograd.Function):
    """``delta[t] = sum_j weights[t, j] * D[indices[t, j]]``; its backward reads the decoder rows of live slots only."""

    @staticmethod
    def forward(ctx, weights, indices, values, decoder):  # type: ignore[override]
        ctx.save_for_backward(indices, values, decoder)
        return weighted_row_sum(indices, weights, decoder)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        indices, values, decoder = ctx.saved_tensors
        grad_weights = active_dots(grad.contiguous(), indices, decoder, values) * (values != 0)
        return grad_weights, None, None, None
