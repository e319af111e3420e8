"""Watching latents during training: a TrainerCallback with compact logs and a JSON history, and a plot."""

from __future__ import annotations

import json
import os
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..components import per_latent
from .contents import contents_from_model
from .render import figure_png


class LatentTrackingCallback(TrainerCallback):
    """Track the top-k latents of an ISaeRFT adapter while a ``transformers.Trainer`` (or TRL trainer) trains.

    At each log step it adds a few compact keys to the Trainer's logs (so TensorBoard, wandb, ... get them):
    ``isaerft/nonzero`` (how many latents are changed) and ``isaerft/top_<rank>`` (the value of the rank-th
    latent by size), not one key per latent. The full trajectory of every latent that ever entered the top-k
    goes to ``<output_dir>/isaerft_history.json``.

    Example:
        >>> trainer = Trainer(model=peft_model, args=args, train_dataset=data)  # doctest: +SKIP
        >>> LatentTrackingCallback(top_k=10).attach(trainer)  # doctest: +SKIP
    """

    def __init__(self, top_k: int = 10, history_file: str | None = None) -> None:
        self.top_k = top_k
        self.history_file = history_file
        self.history: dict[str, Any] = {"steps": [], "latents": {}}

    def _snapshot(self, model: Any) -> dict[str, float]:
        values: dict[str, float] = {}
        for splice in contents_from_model(model):
            for param, trained in splice.parameters().items():
                tensor = per_latent(trained)  # a row per latent (latent_map) is tracked by its norm
                magnitude = tensor.abs()
                for latent in magnitude.topk(min(self.top_k, magnitude.numel())).indices.tolist():
                    if magnitude[latent] > 0:
                        values[f"{splice.hook}|{latent}|{param}"] = float(tensor[latent])
                values[f"_nonzero|{splice.hook}|{param}"] = float((tensor != 0).sum())
        return values

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            return
        snapshot = self._snapshot(model)
        step = state.global_step
        if not self.history["steps"] or self.history["steps"][-1] != step:
            self.history["steps"].append(step)
        tracked = {k: v for k, v in snapshot.items() if not k.startswith("_nonzero")}
        for key, value in tracked.items():
            self.history["latents"].setdefault(key, {})[str(step)] = value
        compact = {"isaerft/nonzero": sum(v for k, v in snapshot.items() if k.startswith("_nonzero"))}
        ranked = sorted(tracked.values(), key=abs, reverse=True)[: self.top_k]
        compact.update({f"isaerft/top_{rank}": value for rank, value in enumerate(ranked)})
        if logs is not None:
            logs.update(compact)
        if state.log_history and state.log_history[-1].get("step") == step:
            state.log_history[-1].update(compact)

    def attach(self, trainer: Any) -> LatentTrackingCallback:
        """Add this callback ahead of the Trainer's reporting callbacks, so TensorBoard, wandb, ... receive its
        keys in the same log event (callbacks passed as ``callbacks=[...]`` run after them)."""
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero:
            path = self.history_file or os.path.join(args.output_dir, "isaerft_history.json")
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "w") as handle:
                json.dump(self.history, handle, indent=1)


def plot_trajectories(history: dict[str, Any], top_n: int = 12) -> bytes:
    """A PNG of the tracked latents' values over training steps (the ``top_n`` largest at the end).

    Example:
        >>> history = json.loads(Path("out/isaerft_history.json").read_text())  # doctest: +SKIP
        >>> plot_trajectories(history, "trajectories.png")  # doctest: +SKIP
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latents = history.get("latents", {})
    final = {k: abs(list(v.values())[-1]) for k, v in latents.items() if v}
    fig, ax = plt.subplots(figsize=(8, 4))
    for key in sorted(final, key=final.get, reverse=True)[:top_n]:
        points = sorted((int(step), value) for step, value in latents[key].items())
        hook, latent, param = key.split("|")
        ax.plot([p[0] for p in points], [p[1] for p in points], label=f"{hook} #{latent} {param}")
    ax.set_xlabel("training step")
    ax.set_ylabel("value")
    ax.axhline(0, color="black", linewidth=0.6)
    if final:
        ax.legend(fontsize=7, loc="best")
    return figure_png(fig)
