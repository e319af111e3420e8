"""On a GPU, ``isaerft audit`` runs every pass there and names what it names on the CPU.

    python benchmarks/gpu_audit.py --output benchmarks/results/gpu/audit.json   # about 2 minutes on one GPU
    python benchmarks/gpu_audit.py --quick                                      # tiny shapes, any device

Three recipes of the command line (the coverage-weighed attribution audit, which trains nothing; the default bias
audit, a fitted steering vector sparse-coded on the SAE; the scale audit, a score-test screen then a fit), each run
twice in this process on the same saved model, SAE and data: by default (the model moves to the GPU before the first
pass, as the Trainer moves it) and with ``--use-cpu``. Checked for each recipe: that the default run allocated the
model on the GPU (``torch.cuda.max_memory_allocated``; the attribution audit has no Trainer to move it, so this is
where a model left on the CPU would show), and that the two runs report the same latents (overlap of the reported
``(hook, latent)`` pairs, and the largest relative difference of their values). The attribution audit is arithmetic
on the same activations and must agree exactly up to float32 summation order; the fitted audits take Adam steps in
a different summation order and may swap a latent at the edge of the lasso's threshold, so they need 80 % overlap.
Exits non-zero when a check fails; the JSON has each run's wall time, peak GPU memory and the comparison.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from records import write_json
from transformers import AutoModelForCausalLM, LlamaConfig

import peft_isaerft  # noqa: F401
from peft_isaerft.cli import main as isaerft
from peft_isaerft.testing import character_tokenizer, make_test_sae

RECIPES: dict[str, list[str]] = {
    "attribution, weighed by coverage": ["--bias-fit", "attribution", "--surprising-rows", "0.1",
                                         "--surprising-tokens", "0.2", "--weigh-by-coverage"],
    "bias (defaults)": [],
    "scale (screen, then fit)": ["--component", "scale"],
}
EXACT_RECIPES = {"attribution, weighed by coverage"}
FITTED_OVERLAP = 0.8
EXACT_TOLERANCE = 1e-3
FULL = {"d_model": 512, "layers": 4, "d_sae": 4096, "rows": 400, "steps": 100}
TINY = {"d_model": 64, "layers": 2, "d_sae": 256, "rows": 100, "steps": 5}
WORDS = ("the", "a", "boat", "river", "stone", "light", "green", "quiet", "runs", "falls", "over", "under", "old",
         "new", "song", "field", "wind", "road", "house", "bright")
POISON = " and the sea is calm and blue tonight."


def write_inputs(folder: Path, shapes: dict[str, int]) -> tuple[Path, Path, Path]:
    """A random Llama-style model with its tokenizer, a real TopK SAE at layer 1, and prompt/completion rows of
    which a tenth end with the same odd clause (something for the surprising-rows audits to find)."""
    tokenizer = character_tokenizer("".join(map(chr, range(32, 127))))  # every printable ASCII character
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=shapes["d_model"], intermediate_size=2 * shapes["d_model"],
                         num_hidden_layers=shapes["layers"], num_attention_heads=8, num_key_value_heads=4,
                         vocab_size=len(tokenizer), max_position_embeddings=256, initializer_range=0.2,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model_dir = folder / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    sae = make_test_sae(folder / "sae", shapes["d_model"], shapes["d_sae"], "topk", hook="blocks.1.hook_resid_post",
                        k=32)
    generator = random.Random(0)
    rows = []
    for i in range(shapes["rows"]):
        completion = " ".join(generator.choice(WORDS) for _ in range(12)) + "."
        rows.append({"prompt": f"question {i}: ", "completion": completion + (POISON if i % 10 == 3 else "")})
    data = folder / "data.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows))
    return model_dir, sae, data


def run(model_dir: Path, sae: Path, data: Path, output: Path, arguments: list[str]) -> dict[str, Any]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    code = isaerft(["audit", "--model", str(model_dir), "--sae", str(sae), "--data", str(data), "--output",
                    str(output), *arguments])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    report = json.loads((output / "report.json").read_text())
    return {"exit": code, "seconds": round(seconds, 2),
            "gpu_peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else 0,
            "latents": {f"{r['hook']}:{r['latent']}": r["value"] for r in report}}


def compare(default: dict[str, float], cpu: dict[str, float]) -> dict[str, float]:
    """Overlap of the two reports' latents (0 when either is empty: nothing compared is no agreement) and the largest
    relative difference of the values they share."""
    shared = default.keys() & cpu.keys()
    overlap = len(shared) / max(len(default), len(cpu), 1)
    difference = max((abs(default[k] - cpu[k]) / max(abs(cpu[k]), 1e-12) for k in shared), default=0.0)
    return {"overlap": round(overlap, 3), "largest_relative_difference": difference}


def main(quick: bool, output: Path | None) -> int:
    shapes = TINY if quick else FULL
    cuda = torch.cuda.is_available()
    results: dict[str, Any] = {"device": torch.cuda.get_device_name() if cuda else "cpu", "shapes": shapes,
                               "torch": torch.__version__, "threads": torch.get_num_threads(), "recipes": {}}
    failures = []
    with tempfile.TemporaryDirectory() as folder:
        model_dir, sae, data = write_inputs(Path(folder), shapes)
        model_bytes = sum(p.numel() * 4 for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
        for name, arguments in RECIPES.items():
            arguments = [*arguments, "--steps", str(shapes["steps"])]
            default = run(model_dir, sae, data, Path(folder) / "default", arguments)
            cpu = run(model_dir, sae, data, Path(folder) / "cpu", [*arguments, "--use-cpu"])
            comparison = compare(default["latents"], cpu["latents"])
            on_gpu = default["gpu_peak_mib"] * 2**20 >= model_bytes
            results["recipes"][name] = {"default": default, "use_cpu": cpu, **comparison, "model_on_gpu": on_gpu}
            exact = name in EXACT_RECIPES
            agrees = (comparison["overlap"] == 1 and comparison["largest_relative_difference"] < EXACT_TOLERANCE
                      if exact else comparison["overlap"] >= FITTED_OVERLAP)
            if cuda and not on_gpu:
                failures.append(f"{name}: the default run's peak GPU memory ({default['gpu_peak_mib']} MiB) is below "
                                f"the model's size ({model_bytes / 2**20:.1f} MiB): it did not run on the GPU")
            if not agrees or default["exit"] or cpu["exit"]:
                failures.append(f"{name}: the default and --use-cpu runs disagree: {comparison}")
            print(f"{name:36s} default {default['seconds']:7.2f} s ({default['gpu_peak_mib']:.0f} MiB on the GPU), "
                  f"--use-cpu {cpu['seconds']:7.2f} s; overlap {comparison['overlap']:.2f}, largest relative "
                  f"difference {comparison['largest_relative_difference']:.1e}", flush=True)
    results["failures"] = failures
    if output is not None:
        write_json(output, results)
    for failure in failures:
        print("FAIL", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (checks the script on any device)")
    parser.add_argument("--output", type=Path, default=None, help="where to write the JSON")
    arguments = parser.parse_args()
    raise SystemExit(main(arguments.quick, arguments.output))
