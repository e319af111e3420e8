"""Where an SAE attaches: TransformerLens hook names mapped onto Hugging Face module paths.

This module is the one table that knows how each architecture lays out its residual stream. Everything
else in the package asks :func:`resolve_attach_point` and never hard-codes a module name.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=4, vocab_size=100))
    >>> resolve_attach_point(model, "blocks.1.hook_mlp_out").module_path
    'model.layers.1.mlp'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from torch import nn

Position = Literal["input", "output"]

HOOK_KINDS = ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "attn.hook_z")
_TL_HOOK = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|hook_attn_out|hook_mlp_out|attn\.hook_z)$")


@dataclass(frozen=True)
class ArchitectureLayout:
    """Names, relative to one decoder layer, of the modules that carry each residual-stream contribution."""

    layers: str
    """Attribute name of the ``nn.ModuleList`` of decoder layers (found anywhere in the model)."""
    attn_out: str
    """Module whose output is the attention block's contribution to the residual stream."""
    mlp_out: str
    """Module whose output is the MLP block's contribution to the residual stream."""
    attn_proj: str
    """Linear whose input is the concatenated per-head outputs (TransformerLens ``attn.hook_z``)."""
    mlp_proj: str
    """Last linear of the MLP: a constant added to the MLP output can live in its bias."""
    attn_bias_flag: str | None = None
    """Config attribute that turns on biases in every attention output projection, if the model has one."""
    mlp_bias_flag: str | None = None
    """Config attribute that turns on biases in every MLP projection, if the model has one."""
    post_norms: bool = False
    """Attention and MLP outputs pass through a norm before the residual add (Gemma 2/3): a constant
    change of those outputs can not be folded into a bias exactly."""


_LLAMA_LIKE = ArchitectureLayout(
    layers="layers",
    attn_out="self_attn",
    mlp_out="mlp",
    attn_proj="self_attn.o_proj",
    mlp_proj="mlp.down_proj",
)
_GEMMA2_LIKE = ArchitectureLayout(
    layers="layers",
    attn_out="post_attention_layernorm",
    mlp_out="post_feedforward_layernorm",
    attn_proj="self_attn.o_proj",
    mlp_proj="mlp.down_proj",
    post_norms=True,
)

ARCHITECTURES: dict[str, ArchitectureLayout] = {
    "llama": ArchitectureLayout(
        **{**_LLAMA_LIKE.__dict__, "attn_bias_flag": "attention_bias", "mlp_bias_flag": "mlp_bias"}
    ),
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "gemma2": _GEMMA2_LIKE,
    "gemma3": _GEMMA2_LIKE,
    "gemma3_text": _GEMMA2_LIKE,
    "gpt2": ArchitectureLayout(
        layers="h", attn_out="attn", mlp_out="mlp", attn_proj="attn.c_proj", mlp_proj="mlp.c_proj"
    ),
    "gpt_neox": ArchitectureLayout(
        layers="layers",
        attn_out="attention",
        mlp_out="mlp",
        attn_proj="attention.dense",
        mlp_proj="mlp.dense_4h_to_h",
    ),
}
"""The one table from ``config.model_type`` to residual-stream layout. Unknown model types fall back to the
Llama layout when its module names exist; any module path can always be given directly."""


@dataclass(frozen=True)
class AttachPoint:
    """One place in a model where an SAE reads and rewrites activations.

    Example:
        >>> point = resolve_attach_point(model, "blocks.3.hook_resid_post")  # doctest: +SKIP
        >>> point.module_path, point.position  # doctest: +SKIP
        ('model.layers.3', 'output')
    """

    hook: str
    """What the user asked for: a TransformerLens hook name or a module path."""
    module_path: str
    """Full name of the module in ``model.named_modules()`` that gets wrapped."""
    position: Position
    """Whether the module's first input or its output is spliced."""
    layer: int | None = None
    kind: str | None = None
    """The TransformerLens hook kind (``hook_resid_post``, ...) or None for a raw module path."""
    merge_linear: str | None = None
    """Full path of the linear whose bias can absorb a constant change at this point."""
    merge_through_weight: bool = False
    """True when the constant enters the linear's input, so the bias grows by ``W @ c`` instead of ``c``."""
    merge_blocker: str | None = None
    """Why a constant change here can not be merged exactly, when it can not."""


def layout_for(model: nn.Module) -> ArchitectureLayout:
    """The :class:`ArchitectureLayout` of ``model``, by ``config.model_type``, with a Llama-style fallback."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    return _LLAMA_LIKE


def find_layer_stack(model: nn.Module, layout: ArchitectureLayout) -> tuple[str, nn.ModuleList]:
    """Locate the decoder layer ``ModuleList`` (e.g. ``model.layers`` or ``transformer.h``)."""
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and (name == layout.layers or name.endswith("." + layout.layers))
        and "base_layer" not in name.split(".")
    ]
    if not candidates:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(
            f"Could not find the decoder layers of this {model_type!r} model (looked for a ModuleList named "
            f"{layout.layers!r}). Give each SAE an explicit module path as its 'hook', e.g. "
            f"{{'path': ..., 'hook': 'model.layers.3'}}, or add the architecture to "
            "peft_isaerft.attach_points.ARCHITECTURES."
        )
    # the shallowest match is the model's own stack, not a nested vision tower or similar
    return min(candidates, key=lambda item: item[0].count("."))


def valid_hook_names(model: nn.Module) -> list[str]:
    """Every TransformerLens hook name that :func:`resolve_attach_point` accepts for ``model``."""
    try:
        _, layers = find_layer_stack(model, layout_for(model))
    except ValueError:
        return []
    return [f"blocks.{i}.{kind}" for i in range(len(layers)) for kind in HOOK_KINDS]


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def resolve_attach_point(model: nn.Module, hook: str) -> AttachPoint:
    """Turn a TransformerLens hook name or a module path into an :class:`AttachPoint` of ``model``.

    ``blocks.L.hook_resid_pre`` for ``L > 0`` is the output of layer ``L - 1`` (the same tensor), so that a
    layer is only ever spliced at its output; ``blocks.0.hook_resid_pre`` is the input of the first layer.

    Raises:
        ValueError: the hook names no layer or module of ``model``; the message lists what is valid.

    Example:
        >>> resolve_attach_point(model, "blocks.2.hook_mlp_out").module_path  # doctest: +SKIP
        'model.layers.2.mlp'
    """
    match = _TL_HOOK.match(hook)
    if match is None:
        return _resolve_module_path(model, hook)

    layout = layout_for(model)
    stack_path, layers = find_layer_stack(model, layout)
    layer, kind = int(match.group(1)), match.group(2)
    if layer >= len(layers):
        raise ValueError(
            f"Hook {hook!r} names layer {layer}, but the model has {len(layers)} layers (0..{len(layers) - 1})."
        )
    layer_path = f"{stack_path}.{layer}"
    mlp_proj = f"{layer_path}.{layout.mlp_proj}"
    attn_proj = f"{layer_path}.{layout.attn_proj}"
    norm_blocker = (
        "this architecture normalises the block output after its last projection (Gemma 2/3 post-norms), "
        "so a constant added there is not a bias of any linear"
    )

    if kind == "hook_resid_pre" and layer > 0:
        previous = resolve_attach_point(model, f"blocks.{layer - 1}.hook_resid_post")
        return AttachPoint(**{**previous.__dict__, "hook": hook, "layer": layer, "kind": kind})
    if kind == "hook_resid_pre":
        point = AttachPoint(
            hook,
            layer_path,
            "input",
            layer,
            kind,
            merge_blocker="the input of the first layer comes straight from the embeddings, which have no bias",
        )
    elif kind == "hook_resid_post":
        blocker = norm_blocker if layout.post_norms else None
        point = AttachPoint(hook, layer_path, "output", layer, kind, None if blocker else mlp_proj, False, blocker)
    elif kind == "hook_mlp_out":
        blocker = norm_blocker if layout.post_norms else None
        point = AttachPoint(
            hook, f"{layer_path}.{layout.mlp_out}", "output", layer, kind, None if blocker else mlp_proj, False, blocker
        )
    elif kind == "hook_attn_out":
        blocker = norm_blocker if layout.post_norms else None
        point = AttachPoint(
            hook,
            f"{layer_path}.{layout.attn_out}",
            "output",
            layer,
            kind,
            None if blocker else attn_proj,
            False,
            blocker,
        )
    else:  # attn.hook_z: the concatenated head outputs are the input of the attention output projection
        point = AttachPoint(hook, attn_proj, "input", layer, kind, attn_proj, True, None)

    if not _has_module(model, point.module_path):
        raise ValueError(
            f"Hook {hook!r} maps to module {point.module_path!r}, which this model does not have. "
            "Pass a module path that exists as the SAE's 'hook' instead."
        )
    if point.merge_linear is not None and not _has_module(model, point.merge_linear):
        point = AttachPoint(
            **{
                **point.__dict__,
                "merge_linear": None,
                "merge_blocker": f"the model has no {point.merge_linear!r} to hold a bias",
            }
        )
    return point


def _resolve_module_path(model: nn.Module, path: str) -> AttachPoint:
    names = {name for name, _ in model.named_modules() if name}
    if path in names:
        return AttachPoint(path, path, "output", merge_blocker="a raw module path has no known bias to merge into")
    # allow paths written relative to the bare backbone ("layers.3" for "model.layers.3")
    suffix_matches = sorted(name for name in names if name.endswith("." + path))
    if len(suffix_matches) == 1:
        resolved = suffix_matches[0]
        return AttachPoint(path, resolved, "output", merge_blocker="a raw module path has no known bias to merge into")
    examples = valid_hook_names(model)[:5]
    ambiguity = f" It matches several modules: {suffix_matches[:5]}." if len(suffix_matches) > 1 else ""
    raise ValueError(
        f"Attach point {path!r} is neither a TransformerLens hook name nor a module of this model.{ambiguity} "
        f"Valid hook names look like {examples} (pattern blocks.<layer>.<{'|'.join(HOOK_KINDS)}>); "
        "module paths are the names in model.named_modules(), e.g. 'model.layers.3'."
    )
