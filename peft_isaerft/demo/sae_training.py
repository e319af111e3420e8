"""Train a TopK SAE with sae-lens's `SAETrainer` on residual-stream activations taken from a transformers model,
and measure its quality (explained variance, L0, dead latents, LM loss spliced against clean)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer
from tqdm.auto import tqdm

from ..attach_points import resolve_attach_point
from ..cache import atomic_directory

logger = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by the capture hook so layers above the SAE's are never computed."""


@dataclass
class SAEQuality:
    explained_variance: float
    l0: float
    dead_fraction: float
    lm_loss_clean: float
    lm_loss_spliced: float
    training_tokens: int

    def summary(self) -> str:
        return (f"explained variance {self.explained_variance:.3f}, L0 {self.l0:.1f}, dead latents "
                f"{100 * self.dead_fraction:.1f}%, LM loss {self.lm_loss_clean:.3f} clean vs "
                f"{self.lm_loss_spliced:.3f} with the SAE spliced in")


def _chunks(tokenizer: Any, texts: Sequence[str], length: int, n_tokens: int) -> torch.Tensor:
    """Concatenate texts into ``length``-token rows until ``n_tokens`` tokens are gathered."""
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"])
        if len(stream) >= n_tokens:
            break
    rows = len(stream) // length
    return torch.tensor(stream[: rows * length]).view(rows, length)


@torch.no_grad()
def collect_activations(model: Any, tokens: torch.Tensor, hook: str, batch_size: int = 8,
                        skip_first: int = 1) -> torch.Tensor:
    """Residual-stream activations at ``hook`` for every token (but the first ``skip_first`` of each row,
    whose norms are outliers), running the model only up to that layer."""
    point = resolve_attach_point(model, hook)
    if point.position != "output":
        raise ValueError(f"collect_activations supports output attach points, not {hook}.")
    module = model.get_submodule(point.module_path)
    captured: list[torch.Tensor] = []

    def capture(_module: Any, _args: Any, output: Any) -> None:
        hidden = output if isinstance(output, torch.Tensor) else output[0]
        captured.append(hidden[:, skip_first:].reshape(-1, hidden.shape[-1]).float().cpu())
        raise _StopForward

    handle = module.register_forward_hook(capture)
    try:
        for start in tqdm(range(0, len(tokens), batch_size), desc="Collecting activations"):
            try:
                model(tokens[start : start + batch_size].to(model.device))
            except _StopForward:
                pass
    finally:
        handle.remove()
    return torch.cat(captured)


def _batches(activations: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    while True:
        for index in torch.randperm(len(activations), generator=generator).split(batch_size):
            if len(index) == batch_size:
                yield activations[index]


def train_topk_sae(activations: torch.Tensor, d_sae: int, k: int, hook: str, epochs: int = 4,
                   batch_size: int = 512, lr: float = 1e-3, seed: int = 0) -> TopKTrainingSAE:
    """Train a TopK SAE on ``activations`` with sae-lens's SAETrainer (save it with `save_inference_model`)."""
    torch.manual_seed(seed)
    config = TopKTrainingSAEConfig(d_in=activations.shape[1], d_sae=d_sae, k=k)
    config.metadata.hook_name = hook
    training_sae = TopKTrainingSAE(config)
    with torch.no_grad():  # start the decoder bias at the data mean, as sae-lens's runner does
        training_sae.b_dec.copy_(activations.mean(0))
    trainer_config = SAETrainerConfig(
        total_training_samples=epochs * len(activations), train_batch_size_samples=batch_size, lr=lr, lr_end=lr,
        lr_scheduler_name="constant", dead_feature_window=200, feature_sampling_window=400,
    )
    trainer = SAETrainer(trainer_config, training_sae, _batches(activations, batch_size, seed))
    return trainer.fit()


@torch.no_grad()
def measure_quality(model: Any, sae: SAE, tokens: torch.Tensor, activations: torch.Tensor, hook: str,
                    training_tokens: int, batch_size: int = 8) -> SAEQuality:
    """Quality of ``sae`` on held-out ``tokens`` (and their ``activations``)."""
    latents = sae.encode(activations)
    reconstruction = sae.decode(latents)
    residual = (activations - reconstruction).pow(2).sum()
    total = (activations - activations.mean(0)).pow(2).sum()
    point = resolve_attach_point(model, hook)
    module = model.get_submodule(point.module_path)

    def splice(_module: Any, _args: Any, output: Any) -> Any:
        hidden = output if isinstance(output, torch.Tensor) else output[0]
        # keep the first token untouched, as in training
        new = torch.cat([hidden[:, :1], sae(hidden[:, 1:].float()).to(hidden.dtype)], dim=1)
        return new if isinstance(output, torch.Tensor) else (new, *output[1:])

    losses = {}
    for name in ("clean", "spliced"):
        handle = module.register_forward_hook(splice) if name == "spliced" else None
        values = []
        for start in range(0, len(tokens), batch_size):
            batch = tokens[start : start + batch_size].to(model.device)
            values.append(float(model(batch, labels=batch).loss))
        if handle is not None:
            handle.remove()
        losses[name] = sum(values) / len(values)
    return SAEQuality(
        explained_variance=float(1 - residual / total),
        l0=float((latents > 0).float().sum(-1).mean()),
        dead_fraction=float(((latents > 0).sum(0) == 0).float().mean()),
        lm_loss_clean=losses["clean"],
        lm_loss_spliced=losses["spliced"],
        training_tokens=training_tokens,
    )


def train_or_load_demo_sae(model: Any, tokenizer: Any, texts: Sequence[str], hook: str, cache_dir: Path,
                           d_sae: int, k: int, n_tokens: int, epochs: int = 4) -> tuple[Path, SAEQuality]:
    """The demo's SAE: loaded from ``cache_dir`` when it is there in full, else trained and saved there (all or
    nothing: an interrupted training leaves no half-written cache; a corrupt or truncated one is retrained)."""
    quality = _whole_cached_sae(cache_dir)
    if quality is not None:
        logger.info("Using the cached SAE in %s", cache_dir)
        return cache_dir, quality
    if cache_dir.exists():
        logger.warning("The cached SAE in %s is incomplete or corrupt; training it again.", cache_dir)
    length = 64
    held_out_rows = max(4, math.ceil(n_tokens / length / 10))
    tokens = _chunks(tokenizer, texts, length, n_tokens + held_out_rows * length)
    train_tokens, held_out = tokens[:-held_out_rows], tokens[-held_out_rows:]
    activations = collect_activations(model, train_tokens, hook)
    with atomic_directory(cache_dir) as staging:
        train_topk_sae(activations, d_sae=d_sae, k=k, hook=hook, epochs=epochs).save_inference_model(staging)
        sae = SAE.load_from_disk(str(staging)).eval()
        held_out_activations = collect_activations(model, held_out, hook)
        quality = measure_quality(model, sae, held_out, held_out_activations, hook, training_tokens=len(activations))
        (staging / "quality.json").write_text(json.dumps(asdict(quality), indent=1))
    return cache_dir, quality


def _whole_cached_sae(folder: Path) -> SAEQuality | None:
    """The cached SAE's quality when its config, weights and quality files are all readable, else None."""
    from safetensors import safe_open

    try:
        quality = SAEQuality(**json.loads((folder / "quality.json").read_text()))
        json.loads((folder / "cfg.json").read_text())
        with safe_open(str(folder / "sae_weights.safetensors"), framework="pt") as weights:
            for name in weights.keys():
                weights.get_tensor(name)
    except Exception:  # a missing file, bad JSON, or safetensors' own error for a truncated file
        return None
    return quality
