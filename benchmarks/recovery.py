"""Does an ISaeRFT audit name the features a dataset pushes? Plant them and measure.

    python benchmarks/recovery.py            # the full grid (about 10 minutes on 2 CPU cores)
    python benchmarks/recovery.py --quick    # one cell per component, less data (the test suite runs it)
    python benchmarks/recovery.py --smollm2 --components scale --ks 3,10 --seeds 0,1 --sequences 256,2048
        # SmolLM2-135M with the demo's SAE, planted scales of mid-frequency latents, two data sizes
    python benchmarks/recovery.py --smollm2 ... --resume   # finish a run that was cut: the output is written after
        # each cell, and --resume keeps the cells it holds (same settings) and runs the others

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
import copy
import itertools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from sae_lens import SAE, TopKSAE, TopKSAEConfig
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from records import write_json

import peft_isaerft  # noqa: F401
from peft_isaerft import ISaeRFTConfig, feature_report
from peft_isaerft.attach_points import resolve_attach_point
from peft_isaerft.audit import AuditSettings, disable_dropout, fit_adapter_on_tokens
from peft_isaerft.cli import positive_int
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


@dataclass
class Subject:
    """A base model to plant into and audit, with its SAE: everything a cell needs besides the grid values."""

    name: str
    fresh_model: Callable[[], Any]
    """A new copy of the untouched base model (the teacher, the audit and LoRA each get their own)."""
    sae_path: Path
    hook: str
    prompts: Callable[[int, int], torch.Tensor]
    """(n, seed) -> n prompts of PROMPT_LENGTH tokens each."""
    lora_targets: list[str]


def random_prompts(n: int, seed: int) -> torch.Tensor:
    """The tiny models' prompts: uniformly random tokens."""
    return torch.randint(0, VOCAB, (n, PROMPT_LENGTH), generator=torch.Generator().manual_seed(seed))


def tiny_subject(arch: str, multiple: int, seed: int, folder: Path) -> Subject:
    return Subject(arch, lambda: build_model(arch, seed), build_sae(folder, multiple * D_MODEL, seed), HOOK,
                   random_prompts, ["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj"])


def smollm2_subject() -> Subject:
    """SmolLM2-135M-Instruct (GGUF, offline) with the demo's SAE (4608 latents at layer 15, trained with sae-lens on
    real text; cached after the first `isaerft demo`); prompts are the first tokens of that text."""
    from peft_isaerft.demo import DemoSettings, demo_sae, load_demo_model
    from peft_isaerft.demo.corpus import load_corpus

    base, tokenizer, name = load_demo_model()
    settings = DemoSettings()
    sae_path, _quality = demo_sae(base, tokenizer, name, settings)
    texts, _sources = load_corpus()
    starts = [ids[:PROMPT_LENGTH] for ids in tokenizer(texts[:4000])["input_ids"] if len(ids) >= PROMPT_LENGTH]

    def text_prompts(n: int, prompt_seed: int) -> torch.Tensor:
        chosen = torch.randperm(len(starts), generator=torch.Generator().manual_seed(prompt_seed))[:n]
        return torch.tensor([starts[i] for i in chosen.tolist()])

    return Subject("smollm2", lambda: copy.deepcopy(base), sae_path, settings.hook, text_prompts,
                   ["q_proj", "v_proj"])


@torch.no_grad()
def residual(model: Any, ids: torch.Tensor, hook: str = HOOK) -> torch.Tensor:
    """The residual stream at the attach point (after any splice there), shape tokens x d_model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    point = resolve_attach_point(base, hook)
    layers_path, _, index = point.module_path.rpartition(".")
    captured = []
    nxt = base.get_submodule(f"{layers_path}.{int(index) + 1}")
    handle = nxt.register_forward_pre_hook(lambda _m, args, kwargs: captured.append(
        args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    for batch in ids.split(64):
        model(batch)
    handle.remove()
    return torch.cat([c.reshape(-1, c.shape[-1]) for c in captured])


@torch.no_grad()
def sample(model: Any, n: int, length: int, seed: int,
           prompts: Callable[[int, int], torch.Tensor] = random_prompts) -> torch.Tensor:
    """n sequences of ``length`` tokens: PROMPT_LENGTH prompt tokens, then the model's own samples."""
    torch.manual_seed(seed)
    return model.generate(input_ids=prompts(n, seed), max_new_tokens=length - PROMPT_LENGTH,
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


def planted_scale_latents(base_z: torch.Tensor, k: int, band: str, generator: torch.Generator) -> list[int]:
    """k latents to scale. ``frequent``: among the 4k (at least 40) latents that fire most; ``mid``: among those that
    fire on 1 to 15 % of the tokens after the first and carry less than half their activation on the first token (on
    SmolLM2 the most frequent latents include attention-sink latents of activation 1000 and more on token 0, which
    no realistic fine-tune scales). A scale of a silent latent changes nothing and nobody could recover it."""
    by_sequence = base_z.reshape(-1, base_z.shape[-2], base_z.shape[-1])  # sequences x tokens x d_sae
    if band == "frequent":
        rate = (by_sequence > 0).float().mean((0, 1))
        candidates = rate.argsort(descending=True)[: max(4 * k, 40)]
        candidates = candidates[rate[candidates] > 0]
    else:
        later_rate = (by_sequence[:, 1:] > 0).float().mean((0, 1))
        first_share = by_sequence[:, 0].sum(0) / by_sequence.sum((0, 1)).clamp_min(1e-12)
        candidates = ((later_rate >= 0.01) & (later_rate <= 0.15) & (first_share < 0.5)).nonzero().flatten()
    return candidates[torch.randperm(len(candidates), generator=generator)[:k]].tolist()


def run_cell(subject: Subject, component: str, k: int, seed: int, settings: AuditSettings, folder: Path,
             sizes: list[int], length: int, with_lora: bool = True, band: str = "frequent") -> list[dict[str, Any]]:
    """One planted teacher, audited on the first n of its sampled sequences for each n in ``sizes`` (LoRA: on the
    largest only). One result per size."""
    sae = SAE.load_from_disk(str(subject.sae_path))
    decoder = sae.W_dec.detach()
    d_sae = decoder.shape[0]
    base = subject.fresh_model().eval()
    reference_ids = sample(base, 256, length, seed + 7, subject.prompts)
    base_residual = residual(base, reference_ids, subject.hook)
    base_z = sae.encode(base_residual)
    generator = torch.Generator().manual_seed(seed)
    if component == "scale":
        latents = planted_scale_latents(base_z.reshape(len(reference_ids), length, d_sae), k, band, generator)
        strength = 2.0
    else:
        latents = torch.randperm(d_sae, generator=generator)[:k].tolist()
        # one alpha for every planted latent, as in sum_i alpha * W_dec[i]: each planted feature is equally strong
        # whatever k is (a third of the median token's residual norm; the median, since real models carry a few
        # tokens of 100x the norm)
        strength = float(base_residual.norm(dim=-1).median()) / 3
    teacher = plant(subject.fresh_model(), subject.sae_path, component, latents, strength)
    all_audit_ids = sample(teacher, max(sizes), length, seed + 11, subject.prompts)
    cosines = decoder[latents] @ decoder.T
    cosines[torch.arange(len(latents)), latents] = 0
    results = []
    for n_sequences in sorted(sizes):
        audit_ids = all_audit_ids[:n_sequences]
        # loss on the teacher's tokens only, as the audit's prompt/completion rows do: fitting the prompt tokens too
        # would pull every fit (audit and LoRA alike) towards what the teacher did not write
        rows = [{"input_ids": row.tolist(), "labels": [-100] * PROMPT_LENGTH + row[PROMPT_LENGTH:].tolist()}
                for row in audit_ids]
        timings = {}

        start = time.perf_counter()
        audited, calibration = fit_adapter_on_tokens(subject.fresh_model(), [{"path": str(subject.sae_path)}], rows,
                                                     settings, folder / "trainer", progress=False)
        # ranked by effect on the audit data where the audit measured it (screened scales)
        records = feature_report(audited, top_k=10 * k, statistics=calibration.statistics or None)
        ranking = list(dict.fromkeys(r.latent for r in records))
        timings["audit_s"] = time.perf_counter() - start
        del audited

        # (a) dataset diffing
        base_audit_residual = residual(base, audit_ids, subject.hook)
        base_on_audit = sae.encode(base_audit_residual).mean(0)
        diffing = (base_on_audit - base_z.mean(0)).abs().argsort(descending=True).tolist()

        # (b) LoRA fitted on the same data, its residual change projected onto the decoder
        lora_scores: dict[str, float | None] = {"lora_projection": None, "lora_sparse_code": None}
        if with_lora and n_sequences == max(sizes):
            start = time.perf_counter()
            lora = fit_lora(subject.fresh_model(), rows, settings, subject.lora_targets)
            delta = (residual(lora, audit_ids, subject.hook) - base_audit_residual).mean(0)
            del lora
            projection = decoder @ delta
            lora_scores["lora_projection"] = precision(projection.abs().argsort(descending=True).tolist(), latents)
            # the same change sparse-coded as the audit codes its steering vector (ties among zeros: by projection)
            code, _ = sparse_code(delta, decoder, settings.l1, nonnegative=settings.nonnegative_bias)
            by_projection = projection.abs().argsort(descending=True)
            lora_scores["lora_sparse_code"] = precision(
                by_projection[code[by_projection].argsort(descending=True, stable=True)].tolist(), latents)
            timings["lora_s"] = time.perf_counter() - start

        # (c) model diffing with the teacher, read after its splice
        teacher_z = sae.encode(residual(teacher, audit_ids, subject.hook)).mean(0)
        model_diff = (teacher_z - base_on_audit).abs().argsort(descending=True).tolist()

        results.append({
            "arch": subject.name, "component": component, "k": k, "d_sae": d_sae,
            "d_sae_multiple": d_sae // decoder.shape[1], "seed": seed, "band": band if component == "scale" else None,
            "sequences": n_sequences, "planted": latents,
            "audit": precision(ranking, latents), "dataset_diffing": precision(diffing, latents), **lora_scores,
            "model_diffing": precision(model_diff, latents),
            "audit_nonzero": len(ranking), "max_cosine_to_other_latent": float(cosines.abs().max()), **timings,
        })
    return results


def fit_lora(model: Any, rows: list[dict[str, list[int]]], settings: AuditSettings, targets: list[str]) -> Any:
    from datasets import Dataset
    from transformers import PrinterCallback, Trainer, TrainingArguments

    disable_dropout(model)  # as the audit does
    lora = get_peft_model(model, LoraConfig(r=8, target_modules=targets))
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=settings.steps,
                             per_device_train_batch_size=settings.batch_size, learning_rate=5e-3,
                             lr_scheduler_type="constant", save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, log_level="warning", seed=0)
    trainer = Trainer(model=lora, args=args, train_dataset=Dataset.from_list(rows))
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return lora.eval()


def summarise(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for cell in cells:
        groups.setdefault((cell["component"], cell["k"], cell["d_sae_multiple"], cell.get("sequences", 0)), []).append(
            cell)
    table = []
    for (component, k, multiple, sequences), members in sorted(groups.items()):
        row = {"component": component, "k": k, "d_sae": f"{multiple}x", "sequences": sequences, "cells": len(members)}
        for method in METHODS:
            scores = [m[method] for m in members if m[method] is not None]
            row[method] = statistics.mean(scores) if scores else None
        table.append(row)
    return table


def _score(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smollm2", action="store_true",
                        help="plant into SmolLM2-135M-Instruct with the demo's SAE instead of random tiny models "
                        "(--archs, --multiples and --d-model do not apply)")
    parser.add_argument("--output", default=None,
                        help="JSON file (default benchmarks/results/recovery.json, or recovery_smollm2.json)")
    parser.add_argument("--d-model", type=positive_int, default=None, help="width of the random models (default 128; "
                        "vocabulary: 2x)")
    parser.add_argument("--sequences", default=None, help="sequences of 32 tokens sampled from the teacher (default "
                        "256; 2048 with --smollm2); several, comma-separated, audit the first n of one sample for "
                        "each n: a curve of precision against data size (LoRA runs on the largest only)")
    parser.add_argument("--band", choices=["frequent", "mid"], default=None,
                        help="where planted scales are drawn from (default: frequent for the tiny models, mid on "
                        "SmolLM2: latents firing on 1-15%% of tokens, not mostly on the first)")
    parser.add_argument("--archs", default=None, help="tiny model architectures (default llama,gpt2)")
    parser.add_argument("--components", default="bias,scale")
    parser.add_argument("--ks", default="1,3,10")
    parser.add_argument("--multiples", default=None, help="d_sae as multiples of d_model (default 8,32)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--no-lora", action="store_true", help="skip the LoRA baseline (the slowest part on a real "
                        "model)")
    parser.add_argument("--l1", type=float, help="override the audit's l1 (a fraction of lambda_max)")
    parser.add_argument("--steps", type=positive_int, help="override the audit's steps")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override any AuditSettings field, e.g. --set bias_fit=proximal --set steering_lr=0.1")
    parser.add_argument("--resume", action="store_true",
                        help="keep the cells already in --output (written after each cell, by a run with the same "
                        "settings) and run only the others: a long run can be cut and finished later. The file keeps "
                        "every cell it gathers, also those of other --ks or --seeds; its \"complete\" is true once "
                        "this command's own cells are all in")
    args = parser.parse_args(argv)
    if args.smollm2 and (args.quick or any(v is not None for v in (args.archs, args.multiples, args.d_model))):
        parser.error("--smollm2 plants into one real model and SAE: drop --quick, --archs, --multiples and --d-model")
    global D_MODEL, VOCAB
    D_MODEL = args.d_model or 128
    VOCAB = 2 * D_MODEL
    settings = AuditSettings()
    for name, value in (("l1", args.l1), ("steps", args.steps)):
        if value is not None:
            setattr(settings, name, value)
    for assignment in args.set:
        name, _, text = assignment.partition("=")
        if name not in {f.name for f in fields(AuditSettings)}:
            parser.error(f"--set {assignment}: AuditSettings has no field {name!r}")
        current = getattr(settings, name)
        value = text.lower() in ("1", "true", "yes") if isinstance(current, bool) else type(current)(text)
        setattr(settings, name, value)
    folder = Path(tempfile.mkdtemp())
    components = args.components.split(",")
    ks = [int(k) for k in args.ks.split(",")]
    seeds = [int(seed) for seed in args.seeds.split(",")]
    if args.quick:
        # a scale cell, and the bias cell that the proximal recipe got wrong (GPT-2, k = 10, 32x, seed 1), on less data
        grid = [("llama", 32, "scale", 3, 0), ("gpt2", 32, "bias", 10, 1)]
        sizes, length = [256], 24
    elif args.smollm2:
        grid = [("smollm2", 0, component, k, seed) for component, k, seed in itertools.product(components, ks, seeds)]
        sizes, length = [int(n) for n in (args.sequences or "2048").split(",")], 32
    else:
        grid = list(itertools.product((args.archs or "llama,gpt2").split(","),
                                      [int(m) for m in (args.multiples or "8,32").split(",")], components, ks, seeds))
        sizes, length = [int(n) for n in (args.sequences or "256").split(",")], 32
    band = args.band or ("mid" if args.smollm2 else "frequent")
    output = Path(args.output or f"benchmarks/results/recovery{'_smollm2' if args.smollm2 else ''}.json")
    run = {"settings": {k: v for k, v in asdict(settings).items() if k != "component"},
           "subject": "smollm2" if args.smollm2 else f"tiny, d_model {D_MODEL}", "sequences": sizes, "length": length,
           "band": band, "lora": not args.no_lora}
    cells = resumed_cells(output, run, parser) if args.resume else []
    done = {tuple(cell["grid_entry"]) for cell in cells}
    remaining = [entry for entry in grid if entry not in done]
    real_subject = smollm2_subject() if args.smollm2 and remaining else None
    for entry in tqdm(remaining, desc="recovery cells", disable=len(remaining) < 4):
        arch, multiple, component, k, seed = entry
        subject = real_subject or tiny_subject(arch, multiple, seed, folder)
        settings.component = component
        for cell in run_cell(subject, component, k, seed, settings, folder, sizes, length,
                             with_lora=not args.no_lora, band=band):
            cells.append({**cell, "grid_entry": list(entry)})
            tqdm.write(f"{arch:7s} {component:5s} k={k:2d} d_sae={cell['d_sae_multiple']}x seed={seed} "
                       f"n={cell['sequences']}: audit {cell['audit']:.2f} | diffing {cell['dataset_diffing']:.2f} | "
                       f"LoRA {_score(cell['lora_projection'])} | LoRA coded {_score(cell['lora_sparse_code'])} | "
                       f"model diffing {cell['model_diffing']:.2f}")
        write_json(output, {**run, "complete": False, "cells": cells, "table": summarise(cells)})
    # the file keeps every cell it has gathered (a run of some cells adds to it), and the table covers them all
    table = summarise(cells)
    print("\n| component | k | d_sae | sequences | cells | ISaeRFT audit | dataset diffing | LoRA projection "
          "| LoRA, sparse-coded | model diffing (teacher) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in table:
        print(f"| {row['component']} | {row['k']} | {row['d_sae']} | {row['sequences']} | {row['cells']} | "
              + " | ".join(_score(row[method]) for method in METHODS) + " |")
    result = {**run, "complete": True, "cells": cells, "table": table}
    write_json(output, result)
    print(f"\nwrote {output}")
    return result


def resumed_cells(output: Path, run: dict[str, Any], parser: argparse.ArgumentParser) -> list[dict[str, Any]]:
    """The cells an earlier run with the same ``run`` description wrote to ``output`` (none if there is no file)."""
    if not output.exists():
        print(f"--resume: {output} does not exist yet; starting from the first cell")
        return []
    previous = json.loads(output.read_text())
    differs = [key for key in run if previous.get(key) != run[key]]
    if differs or any("grid_entry" not in cell for cell in previous.get("cells", [])):
        parser.error(f"--resume: {output} was written by a run with other {', '.join(differs) or 'cells'} "
                     "(or before runs could be resumed); drop --resume to start over, or pass another --output")
    print(f"--resume: keeping {len(previous['cells'])} cells from {output}")
    return previous["cells"]


if __name__ == "__main__":
    main()
