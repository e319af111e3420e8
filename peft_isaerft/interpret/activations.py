"""How SAE latents fire on a dataset at each splice of an adapter, with the adapter switched off.

Used to weight scale parameters by how much their latent actually fires, and to label latents offline by
their top-activating token contexts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..tuner.layer import ISaeRFTLayer
from .contents import active_adapter_name


@dataclass
class LatentStatistics:
    """Per-latent firing statistics of one splice over a dataset.

    Example:
        >>> stats = latent_statistics(peft_model, tokenizer, ["some text", "more text"])  # doctest: +SKIP
        >>> stats[key].frequency.topk(5)  # doctest: +SKIP
    """

    mean_activation: torch.Tensor
    """Mean of z over all (non-padding) tokens, zeros included: frequency times strength."""
    firing_rate: torch.Tensor
    top_values: torch.Tensor
    """``d_sae x n_top`` largest activations."""
    top_positions: torch.Tensor
    """``d_sae x n_top x 2``: (text index, token index) of each top activation."""
    tokens: list[list[str]] = field(default_factory=list)

    def contexts(self, latent: int, window: int = 8) -> list[str]:
        """Every stored top context of ``latent``, strongest first (up to ``n_top``; fewer if it fired less often)."""
        found = (self.context(latent, rank, window) for rank in range(self.top_values.shape[1]))
        return [text for text in found if text is not None]

    def context(self, latent: int, rank: int = 0, window: int = 8) -> str | None:
        """The text around the ``rank``-th strongest activation of ``latent``, the firing token in [[ ]]."""
        if rank >= self.top_values.shape[1] or self.top_values[latent, rank] <= 0:
            return None
        text_index, token_index = (int(v) for v in self.top_positions[latent, rank])
        tokens = self.tokens[text_index]
        before = "".join(tokens[max(0, token_index - window) : token_index])
        after = "".join(tokens[token_index + 1 : token_index + 1 + window // 2])
        return f"{before}[[{tokens[token_index]}]]{after}".replace("\n", "\\n")


@torch.no_grad()
def latent_statistics(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    adapter_name: str | None = None,
    n_top: int = 3,
    max_length: int = 128,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, LatentStatistics]:
    """Firing statistics of every splice of the adapter on ``texts``, keyed by module path.

    The adapter is disabled while reading, so the statistics describe the base model the adapter edits.

    Example:
        >>> stats = latent_statistics(peft_model, tokenizer, texts)  # doctest: +SKIP
        >>> records = feature_report(peft_model, statistics=stats)  # doctest: +SKIP
    """
    adapter_name = adapter_name or active_adapter_name(model)
    # keyed like SpliceContents.module_path, i.e. relative to the transformers model
    layers = {
        module.isaerft_splices[adapter_name].point.module_path: module
        for module in model.modules()
        if isinstance(module, ISaeRFTLayer) and adapter_name in module.isaerft_splices
    }
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name, layer in layers.items():
        splice = layer.isaerft_splices[adapter_name]
        if splice.point.position == "input":
            handles.append(layer.base_layer.register_forward_pre_hook(_capture_input(captured, name, len(layers)),
                                                                      with_kwargs=True))
        else:
            handles.append(layer.base_layer.register_forward_hook(_capture_output(captured, name, len(layers))))
    totals: dict[str, dict[str, Any]] = {}
    all_tokens: list[list[str]] = []
    device = next(model.parameters()).device
    try:
        with model.disable_adapter():
            batches = range(0, len(texts), batch_size)
            for start in tqdm(batches, desc="Reading latents", disable=not progress):
                chunk = list(texts[start : start + batch_size])
                encoded = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
                encoded = {k: v.to(device) for k, v in encoded.items()}
                captured.clear()
                try:
                    model(**encoded)
                except _AllCaptured:
                    pass
                mask = encoded["attention_mask"].bool()
                # padding reads as nothing in a context (positions kept: top activations index the padded rows)
                for row, keep in zip(encoded["input_ids"].tolist(), mask.tolist(), strict=True):
                    all_tokens.append([tokenizer.decode([t]) if real else "" for t, real in zip(row, keep,
                                                                                                   strict=True)])
                for name, layer in layers.items():
                    sae = layer.isaerft_splices[adapter_name].sae
                    z = sae.encode(captured[name].to(sae.W_dec.dtype)).float()
                    z = z * mask.unsqueeze(-1).to(z.device)
                    _accumulate(totals.setdefault(name, {}), z, mask, start, n_top)
    finally:
        for handle in handles:
            handle.remove()
    return {
        name: LatentStatistics(
            mean_activation=(t["sum"] / t["count"]).cpu(),
            firing_rate=(t["fired"] / t["count"]).cpu(),
            top_values=t["top_values"].cpu(),
            top_positions=t["top_positions"].cpu(),
            tokens=all_tokens,
        )
        for name, t in totals.items()
    }


def _accumulate(total: dict[str, Any], z: torch.Tensor, mask: torch.Tensor, first_text: int, n_top: int) -> None:
    batch, length, d_sae = z.shape
    flat = z.reshape(batch * length, d_sae)
    total["sum"] = total.get("sum", 0) + flat.sum(0)
    total["fired"] = total.get("fired", 0) + (flat > 0).float().sum(0)
    total["count"] = total.get("count", 0) + int(mask.sum())
    k = min(n_top, flat.shape[0])
    values, flat_index = flat.topk(k, dim=0)  # k x d_sae
    positions = torch.stack([flat_index // length + first_text, flat_index % length], dim=-1)  # k x d_sae x 2
    values, positions = values.T, positions.permute(1, 0, 2)
    if "top_values" in total:
        values = torch.cat([total["top_values"], values], dim=1)
        positions = torch.cat([total["top_positions"], positions], dim=1)
    order = values.argsort(dim=1, descending=True)[:, :n_top]
    total["top_values"] = values.gather(1, order)
    total["top_positions"] = positions.gather(1, order.unsqueeze(-1).expand(-1, -1, 2))


class _AllCaptured(Exception):
    """Raised by the capture hook that completes a batch's reading: the layers after the last splice and the
    language-model head (half of SmolLM2's forward pass for a splice at its layer 15) cannot change it."""


def _capture_output(store: dict[str, torch.Tensor], name: str, splices: int):
    def hook(_module, _args, output):
        store[name] = output if isinstance(output, torch.Tensor) else output[0]
        if len(store) == splices:
            raise _AllCaptured

    return hook


def _capture_input(store: dict[str, torch.Tensor], name: str, splices: int):
    def hook(_module, args, kwargs):
        store[name] = args[0] if args else kwargs["hidden_states"]
        if len(store) == splices:
            raise _AllCaptured

    return hook


