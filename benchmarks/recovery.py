"""Does an ISaeRFT audit name the features a dataset pushes? Plant them and measure.

    python benchmarks/recovery.py            # the full grid (about 20 minutes on 2 CPU cores)
    python benchmarks/recovery.py --quick    # one cell per component, less data (the test suite runs it)

For each cell: build a random tiny model (initializer_range 0.2, so it reacts to its residual stream) and a TopK SAE
with unit-norm decoder rows at ``blocks.1.hook_resid_post``; plant a change on k latents in a *teacher* (bias: add
sum alpha * W_dec[i] at the attach point; scale: multiply the chosen latents by 1 + s); sample a dataset from the
teacher (each sequence starts with 4 random prompt tokens, which no loss is taken on); run the audit (a sparse
ISaeRFT adapter fitted on the untouched base) and score precision@k of the planted
set among the k latents it reports first. The reported set has exactly k latents, so recall of the planted set equals
precision@k here.

Baselines in the same run:
  (a) dataset diffing (data only): latents ranked by how much more they fire in the base model on the audit data than
      on the base model's own samples;
  (b) LoRA projection (data only): a LoRA (r = 8, q/v) fitted on the same data for the same steps; its mean change of
      the residual stream at the attach point, projected onto each decoder direction; and the same change
      sparse-coded on the decoder exactly as the audit codes its steering vector ("LoRA, sparse-coded");
  (c) model diffing (needs the teacher, which an auditor does not have): the mean change of each latent's activation
      between teacher and base on the same data, as an upper reference.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from sae_lens import SAE, TopKSAE, TopKSAEConfig
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import peft_isaerft  # noqa: F401
from peft_isaerft import ISaeRFTConfig, feature_report
from peft_isaerft.attach_points import resolve_attach_point
from peft_isaerft.audit import AuditSettings, disable_dropout, fit_adapter_on_tokens
from peft_isaerft.sparsity import sparse_code

D_MODEL, LAYERS, HOOK = 128, 3, "blocks.1.hook_resid_post"
VOCAB = 2 * D_MODEL  # more tokens than dimensions, as in real models, so the outputs can show any change
METHODS = ("audit", "dataset_diffing", "lora_projection", "lora_sparse_code", "model_diffing")
PROMPT_LENGTH = 4  # random prompt tokens that start each sampled sequence; the teacher did not write them


def build_model(arch: str, seed: int) -> Any:
    torch.manual_seed(seed)
    if arch == "gpt2":
        config = GPT2Config(n_embd=D_MODEL, n_layer=LAYERS, n_head=4, vocab_size=VOCAB, n_positions=64,
                            initializer_range=0.2)
    else:
        config = LlamaConfig(hidden_size=D_MODEL, intermediate_size=2 * D_MODEL, num_hidden_layers=LAYERS,
                             num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB, initializer_range=0.2)
    return AutoModelForCausalLM.from_config(config).eval()


def build_sae(folder: Path, d_sae: int, seed: int) -> Path:
    torch.manual_seed(1000 + seed)
    cfg = TopKSAEConfig(d_in=D_MODEL, d_sae=d_sae, k=16)
    cfg.metadata.hook_name = HOOK
    sae = TopKSAE(cfg)
    with torch.no_grad():
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(d_sae, D_MODEL), dim=-1))
        sae.W_enc.copy_(sae.W_dec.T)
    path = folder / f"sae_{d_sae}_{seed}"
    sae.save_model(path)
    return path


@torch.no_grad()
def residual(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """The residual stream at the attach point (after any splice there), shape tokens x d_model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    point = resolve_attach_point(base, HOOK)
    layers_path, _, index = point.module_path.rpartition(".")
    captured = []
    nxt = base.get_submodule(f"{layers_path}.{int(index) + 1}")
    handle = nxt.register_forward_pre_hook(lambda _m, args, kwargs: captured.append(
        args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    model(ids)
    handle.remove()
    return captured[0].reshape(-1, D_MODEL)


@torch.no_grad()
def sample(model: Any, n: int, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, VOCAB, (n, PROMPT_LENGTH), generator=generator)
    torch.manual_seed(seed)
    return model.generate(input_ids=prompts, max_new_tokens=length - PROMPT_LENGTH,
                          min_new_tokens=length - PROMPT_LENGTH, do_sample=True,
                          temperature=1.0, top_k=0, pad_token_id=0)


def plant(base: Any, sae_path: Path, component: str, latents: list[int], strength: float) -> Any:
    teacher = get_peft_model(base, ISaeRFTConfig(saes=[{"path": str(sae_path)}], component=component))
    layer = next(m for m in teacher.modules() if hasattr(m, "isaerft_splices"))
    with torch.no_grad():
        getattr(layer, f"isaerft_{component}")["default"][latents] = strength
    return teacher.eval()


def precision(ranking: list[int], planted: list[int]) -> float:
    return len(set(ranking[: len(planted)]) & set(planted)) / len(planted)


def run_cell(arch: str, component: str, k: int, multiple: int, seed: int, settings: AuditSettings,
             folder: Path, n_sequences: int, length: int) -> dict[str, Any]:
    d_sae = multiple * D_MODEL
    sae_path = build_sae(folder, d_sae, seed)
    sae = SAE.load_from_disk(str(sae_path))
    base = build_model(arch, seed)
    reference_ids = sample(base, n_sequences, length, seed + 7)
    base_z = sae.encode(residual(base, reference_ids))
    generator = torch.Generator().manual_seed(seed)
    if component == "scale":
        # among the latents that fire most: a scale of a silent latent changes nothing and nobody can recover it
        rate = (base_z > 0).float().mean(0)
        candidates = rate.argsort(descending=True)[: max(4 * k, 40)]
        candidates = candidates[rate[candidates] > 0]
        latents = candidates[torch.randperm(len(candidates), generator=generator)[:k]].tolist()
        strength = 2.0
    else:
        latents = torch.randperm(d_sae, generator=generator)[:k].tolist()
        # one alpha for every planted latent, as in sum_i alpha * W_dec[i]: each planted feature is equally strong
        # whatever k is (a third of the residual stream's mean norm)
        strength = float(residual(base, reference_ids).norm(dim=-1).mean()) / 3
    teacher = plant(build_model(arch, seed), sae_path, component, latents, strength)
    audit_ids = sample(teacher, n_sequences, length, seed + 11)
    # loss on the teacher's tokens only, as the audit's prompt/completion rows do: fitting the uniformly random
    # prompt tokens too would pull every fit (audit and LoRA alike) away from the planted change
    rows = [{"input_ids": row.tolist(), "labels": [-100] * PROMPT_LENGTH + row[PROMPT_LENGTH:].tolist()}
            for row in audit_ids]
    timings = {}

    start = time.perf_counter()
    audited, _ = fit_adapter_on_tokens(build_model(arch, seed), [{"path": str(sae_path)}], rows, settings,
                                    folder / "trainer", progress=False)
    records = feature_report(audited, top_k=10 * k)
    ranking = list(dict.fromkeys(r.latent for r in records))
    timings["audit_s"] = time.perf_counter() - start

    # (a) dataset diffing
    base_on_audit = sae.encode(residual(base, audit_ids)).mean(0)
    diffing = (base_on_audit - base_z.mean(0)).abs().argsort(descending=True).tolist()

    # (b) LoRA fitted on the same data, its residual change projected onto the decoder
    start = time.perf_counter()
    lora = fit_lora(build_model(arch, seed), rows, settings)
    delta = (residual(lora, audit_ids) - residual(base, audit_ids)).mean(0)
    projection = sae.W_dec @ delta
    lora_rank = projection.abs().argsort(descending=True).tolist()
    # the same change sparse-coded as the audit codes its steering vector (ties among zeros: by projection)
    code, _ = sparse_code(delta, sae.W_dec, settings.l1, nonnegative=settings.nonnegative_bias)
    by_projection = projection.abs().argsort(descending=True)
    lora_code_rank = by_projection[code[by_projection].argsort(descending=True, stable=True)].tolist()
    timings["lora_s"] = time.perf_counter() - start

    # (c) model diffing with the teacher
    teacher_z = sae.encode(residual(teacher, audit_ids)).mean(0)
    model_diff = (teacher_z - base_on_audit).abs().argsort(descending=True).tolist()

    cosines = sae.W_dec[latents] @ sae.W_dec.T
    cosines[torch.arange(len(latents)), latents] = 0
    return {
        "arch": arch, "component": component, "k": k, "d_sae": d_sae, "seed": seed, "planted": latents,
        "audit": precision(ranking, latents), "dataset_diffing": precision(diffing, latents),
        "lora_projection": precision(lora_rank, latents), "lora_sparse_code": precision(lora_code_rank, latents),
        "model_diffing": precision(model_diff, latents),
        "audit_nonzero": len(ranking), "max_cosine_to_other_latent": float(cosines.abs().max().detach()), **timings,
    }


def fit_lora(model: Any, rows: list[dict[str, list[int]]], settings: AuditSettings) -> Any:
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    target = ["c_attn"] if model.config.model_type == "gpt2" else ["q_proj", "v_proj"]
    disable_dropout(model)  # as the audit does
    lora = get_peft_model(model, LoraConfig(r=8, target_modules=target))
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=settings.steps,
                             per_device_train_batch_size=settings.batch_size, learning_rate=5e-3,
                             lr_scheduler_type="constant", save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, log_level="warning", seed=0)
    Trainer(model=lora, args=args, train_dataset=Dataset.from_list(rows)).train()
    return lora.eval()


def summarise(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for cell in cells:
        groups.setdefault((cell["component"], cell["k"], cell["d_sae"] // D_MODEL), []).append(cell)
    table = []
    for (component, k, multiple), members in sorted(groups.items()):
        row = {"component": component, "k": k, "d_sae": f"{multiple}x", "cells": len(members)}
        for method in METHODS:
            row[method] = statistics.mean(m[method] for m in members)
        table.append(row)
    return table


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", default="benchmarks/results/recovery.json")
    parser.add_argument("--d-model", type=int, default=128, help="width of the random models (vocabulary: 2x)")
    parser.add_argument("--sequences", type=int, default=256, help="sequences of 32 tokens sampled from the teacher")
    parser.add_argument("--archs", default="llama,gpt2")
    parser.add_argument("--components", default="bias,scale")
    parser.add_argument("--ks", default="1,3,10")
    parser.add_argument("--multiples", default="8,32", help="d_sae as multiples of d_model")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--l1", type=float, help="override the audit's l1 (a fraction of lambda_max)")
    parser.add_argument("--steps", type=int, help="override the audit's steps")
    parser.add_argument("--bias-lr", type=float, help="override the audit's bias_lr (per unit residual norm)")
    parser.add_argument("--scale-lr", type=float, help="override the audit's scale_lr")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override any AuditSettings field, e.g. --set batch_size=16 --set nonnegative_bias=false")
    args = parser.parse_args(argv)
    global D_MODEL, VOCAB
    D_MODEL, VOCAB = args.d_model, 2 * args.d_model
    torch.set_num_threads(max(1, torch.get_num_threads()))
    settings = AuditSettings()
    if args.quick:
        # a scale cell, and the bias cell that the proximal recipe got wrong (GPT-2, k = 10, 32x, seed 1), on less data
        grid = [("llama", "scale", 3, 32, 0), ("gpt2", "bias", 10, 32, 1)]
        n_sequences, length = 128, 24
    else:
        grid = list(itertools.product(args.archs.split(","), args.components.split(","),
                                      [int(k) for k in args.ks.split(",")], [int(m) for m in args.multiples.split(",")],
                                      [int(seed) for seed in args.seeds.split(",")]))
        n_sequences, length = args.sequences, 32
    for name, value in (("l1", args.l1), ("steps", args.steps), ("bias_lr", args.bias_lr),
                        ("scale_lr", args.scale_lr)):
        if value is not None:
            setattr(settings, name, value)
    for assignment in args.set:
        name, _, text = assignment.partition("=")
        if not hasattr(settings, name):
            parser.error(f"--set {assignment}: AuditSettings has no field {name!r}")
        current = getattr(settings, name)
        value = text.lower() in ("1", "true", "yes") if isinstance(current, bool) else type(current)(text)
        setattr(settings, name, value)
    folder = Path(tempfile.mkdtemp())
    cells = []
    for arch, component, k, multiple, seed in grid:
        settings.component = component
        cell = run_cell(arch, component, k, multiple, seed, settings, folder, n_sequences, length)
        cells.append(cell)
        print(f"{arch:5s} {component:5s} k={k:2d} d_sae={multiple}x seed={seed}: audit {cell['audit']:.2f} | "
              f"diffing {cell['dataset_diffing']:.2f} | LoRA {cell['lora_projection']:.2f} | "
              f"LoRA coded {cell['lora_sparse_code']:.2f} | model diffing {cell['model_diffing']:.2f}", flush=True)
    table = summarise(cells)
    print("\n| component | k | d_sae | cells | ISaeRFT audit | dataset diffing | LoRA projection "
          "| LoRA, sparse-coded | model diffing (teacher) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in table:
        print(f"| {row['component']} | {row['k']} | {row['d_sae']} | {row['cells']} | "
              + " | ".join(f"{row[method]:.2f}" for method in METHODS) + " |")
    result = {"settings": settings.__dict__, "d_model": D_MODEL, "cells": cells, "table": table}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {output}")
    return result


if __name__ == "__main__":
    main()
