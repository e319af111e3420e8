"""Speed and memory of ISaeRFT against LoRA and the frozen base, measured side by side in one run.

    python benchmarks/speed.py                       # the CPU grid (about 10 minutes on 2 CPU cores)
    python benchmarks/speed.py --quick               # a tiny grid, to check that it runs
    python benchmarks/speed.py --preset gemma-2-2b   # one GPU: Gemma-2-2B shapes with Gemma Scope-like SAEs
    python benchmarks/speed.py --single scale        # one method of the CPU headline cell, alone in its process

``--single`` is for whole-process figures (peak resident memory, wall time), each method in its own process, e.g.
run ``/usr/bin/time -v python benchmarks/speed.py --single lora`` and ``... --single scale`` in turn, several times.
The GPU preset is described in ``benchmarks/gpu_preset.py``.

Model: Llama-style, d_model 512, 8 layers; TopK SAEs (k = 64) at the middle layer (1 SAE) or at layers 1, 3, 5, 7
(4 SAEs); d_sae in {8x, 32x} d_model; sequence lengths 128, 512, 2048 at batch 4.

Figures per configuration: train step time (forward, backward, AdamW step), memory (peak CUDA memory on a GPU;
on a CPU the bytes autograd saves for backward, which is what grows with d_sae x tokens), generation tokens/s,
each also as a ratio to LoRA (r = 8 on q_proj, v_proj) and to the base. The bare encoder pass (encode of the same
tokens) is timed too: it is the floor for a scale adapter's extra cost over a bias adapter.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from sae_lens import TopKSAE, TopKSAEConfig
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from records import write_json

import peft_isaerft  # noqa: F401
from peft_isaerft import ISaeRFTConfig
from peft_isaerft.cli import positive_int


class SavedTensorMeter:
    """Bytes of tensors autograd saves for backward (deduplicated by storage)."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if (not isinstance(tensor, torch.nn.Parameter) and not tensor.requires_grad) or tensor.grad_fn is not None:
            storage = tensor.untyped_storage()
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def megabytes(self) -> float:
        return sum(self.storages.values()) / 2**20


def build_model(quick: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64 if quick else 512, intermediate_size=128 if quick else 1376, num_hidden_layers=8,
        num_attention_heads=4 if quick else 8, num_key_value_heads=4 if quick else 8, vocab_size=512 if quick else 8192,
        max_position_embeddings=4096,
    )
    return LlamaForCausalLM(config)


def build_sae(folder: Path, d_model: int, d_sae: int, layer: int, k: int) -> str:
    torch.manual_seed(layer)
    cfg = TopKSAEConfig(d_in=d_model, d_sae=d_sae, k=k)
    cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
    sae = TopKSAE(cfg)
    path = folder / f"sae_{d_sae}_{layer}"
    sae.save_model(path)
    return str(path)


VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "scale-no-screen": ("scale", {"sae_bf16_screen": False}),  # the top-k searched in the float32 product
}
"""Methods that are a component with non-default options: name -> (component, ISaeRFTConfig options)."""


def attach(model: LlamaForCausalLM, method: str, saes: list[str], sparse: bool = True) -> Any:
    if method == "base":
        return model
    if method == "lora":
        return get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    component, options = VARIANTS.get(method, (method.removesuffix("-dense"), {}))
    peft_model = get_peft_model(model, ISaeRFTConfig(saes=[{"path": p} for p in saes], component=component,
                                                     init_weights=False, **options))
    if not sparse:
        for module in peft_model.modules():
            for splice in getattr(module, "isaerft_splices", {}).values():
                splice.sparse_backward = False
    return peft_model


def time_steps(model: Any, ids: torch.Tensor, repeats: int, method: str) -> tuple[float, float]:
    """Median train step seconds and memory (MB) of ``model`` on ``ids``."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    times, memory = [], 0.0
    cuda = ids.device.type == "cuda"
    for step in range(repeats + 1):
        meter = SavedTensorMeter()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
            if method == "base":  # the frozen model's backward down to its inputs
                embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                loss = model(inputs_embeds=embeds, labels=ids).loss
            else:
                loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step > 0:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - start)
            memory = torch.cuda.max_memory_allocated() / 2**20 if cuda else meter.megabytes
    return statistics.median(times), memory


@torch.no_grad()
def encoder_seconds(sae_path: str, model: LlamaForCausalLM, ids: torch.Tensor, repeats: int) -> float:
    from sae_lens import SAE

    sae = SAE.load_from_disk(sae_path, device=str(ids.device))
    hidden = torch.randn(ids.shape[0], ids.shape[1], model.config.hidden_size, device=ids.device)
    sae.encode(hidden)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sae.encode(hidden)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def generation_tokens_per_second(model: Any, device: str, new_tokens: int) -> float:
    prompt = torch.randint(0, 500, (1, 32), device=device)
    model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False)
    start = time.perf_counter()
    model.generate(input_ids=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return new_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=positive_int, default=2)
    parser.add_argument("--output", default="benchmarks/results/speed.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from --output's JSON")
    parser.add_argument("--preset", choices=["cpu", "gemma-2-2b"], default="cpu",
                        help="cpu: the grid below; gemma-2-2b: the GPU table of benchmarks/gpu_preset.py")
    parser.add_argument("--single", choices=["base", "lora", "bias", "scale", "scale_bias", "clamp", "latent_map",
                                             "scale-dense", *VARIANTS, "encoder"],
                        help="time only this method in the d_sae 32x, seq 512 cell (1 SAE) and exit")
    args = parser.parse_args()
    if args.preset == "gemma-2-2b":
        import gpu_preset

        gpu_preset.main(quick=args.quick, output=Path(args.output).with_name("speed_gemma-2-2b.json")
                        if args.output == parser.get_default("output") else Path(args.output), device=args.device)
        return
    if args.single:
        single(args.single, args.quick, args.repeats, args.device)
        return
    if args.plot_only:
        output = Path(args.output)
        plot(json.loads(output.read_text()), output.with_suffix(".png"))
        return
    torch.set_grad_enabled(True)
    quick = args.quick
    seq_lens = [16, 32] if quick else [128, 512, 2048]
    multiples = [8, 32]
    base_seq = 32 if quick else 512
    k = 8 if quick else 64
    batch = 2 if quick else 4
    methods = ["base", "lora", "bias", "scale", "scale_bias", "scale-dense"]
    folder = Path(tempfile.mkdtemp())
    reference = build_model(quick)
    d_model = reference.config.hidden_size
    rows: list[dict[str, Any]] = []
    grid = [(multiple, base_seq) for multiple in multiples] + [(32, s) for s in seq_lens if s != base_seq]
    for multiple, seq in grid:
        d_sae = multiple * d_model
        ids = torch.randint(0, reference.config.vocab_size, (batch, seq), device=args.device)
        for layers in ([4], [1, 3, 5, 7]):
            saes = [build_sae(folder, d_model, d_sae, layer, k) for layer in layers]
            for method in methods:
                if method in ("base", "lora") and len(layers) > 1:
                    continue
                model = attach(build_model(quick).to(args.device), method, saes, sparse=not method.endswith("-dense"))
                seconds, memory = time_steps(model, ids, args.repeats, method)
                rows.append({"method": method, "saes": 0 if method in ("base", "lora") else len(layers),
                             "d_sae": d_sae, "seq": seq, "batch": batch, "step_s": seconds, "memory_mb": memory})
                print(f"d_sae={d_sae:6d} seq={seq:5d} {method:11s} saes={rows[-1]['saes']} "
                      f"step {seconds:.3f}s memory {memory:.1f} MB", flush=True)
            if len(layers) == 1:
                rows.append({"method": "encoder", "saes": 1, "d_sae": d_sae, "seq": seq, "batch": batch,
                             "step_s": encoder_seconds(saes[0], reference, ids, max(3, args.repeats)),
                             "memory_mb": 0.0})
    # ratios against LoRA and the base in the same (d_sae, seq) cell
    for row in rows:
        cell = [r for r in rows if r["d_sae"] == row["d_sae"] and r["seq"] == row["seq"]]
        lora = next(r for r in cell if r["method"] == "lora")
        base = next(r for r in cell if r["method"] == "base")
        row["step_vs_lora"] = row["step_s"] / lora["step_s"]
        row["step_vs_base"] = row["step_s"] / base["step_s"]
        row["memory_vs_lora"] = row["memory_mb"] / lora["memory_mb"] if lora["memory_mb"] else None
    generation = {}
    new_tokens = 8 if quick else 64
    gen_sae = [build_sae(folder, d_model, 32 * d_model, 4, k)]
    for name in ("base", "scale", "bias-merged"):
        model = build_model(quick).to(args.device).eval()
        if name == "scale":
            model = attach(model, "scale", gen_sae)
        elif name == "bias-merged":
            model = attach(model, "bias", gen_sae).merge_and_unload()
        generation[name] = generation_tokens_per_second(model, args.device, new_tokens)
    generation_ratios = {name: value / generation["base"] for name, value in generation.items()}
    dtype_error = sae_dtype_error(gen_sae[0], reference, args.device)
    result = {"device": args.device, "torch": torch.__version__, "quick": quick, "k": k, "rows": rows,
              "generation_tokens_per_s": generation, "generation_vs_base": generation_ratios,
              "sae_dtype_relative_error": dtype_error}
    output = Path(args.output)
    write_json(output, result)
    print_table(result)
    plot(result, output.with_suffix(".png"))
    if not quick:  # the documentation shows the latest full grid
        plot(result, Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "speed.png")
    print(f"\nwrote {output} and {output.with_suffix('.png')}")


def single(method: str, quick: bool, repeats: int, device: str) -> None:
    """Time one method of the headline cell (d_sae = 32 x d_model, seq 512, 1 SAE) and print one line."""
    torch.set_grad_enabled(True)
    folder = Path(tempfile.mkdtemp())
    model = build_model(quick).to(device)
    d_model = model.config.hidden_size
    seq, batch, k = (32, 2, 8) if quick else (512, 4, 64)
    saes = [build_sae(folder, d_model, 32 * d_model, 4, k)]
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
    if method == "encoder":
        seconds, memory = encoder_seconds(saes[0], model, ids, max(3, repeats)), 0.0
    else:
        model = attach(model, method, saes, sparse=not method.endswith("-dense"))
        seconds, memory = time_steps(model, ids, repeats, method)
    print(json.dumps({"method": method, "step_s": seconds, "saved_mb": memory}))


@torch.no_grad()
def sae_dtype_error(sae_path: str, model: LlamaForCausalLM, device: str) -> dict[str, float]:
    """Relative error of the scale splice's residual change when the SAE runs in bf16 / fp16 instead of fp32, on
    the model's real residual stream at the attach layer."""
    from sae_lens import SAE

    from peft_isaerft.components import residual_delta

    ids = torch.randint(0, model.config.vocab_size, (2, 128), device=device)
    hidden = model.to(device)(ids, output_hidden_states=True).hidden_states[5].reshape(-1, model.config.hidden_size)
    scale = torch.randn(SAE.load_from_disk(sae_path).cfg.d_sae, device=device) * 0.5
    errors = {}
    reference = None
    for dtype in ("float32", "bfloat16", "float16"):
        sae = SAE.load_from_disk(sae_path, device=device, dtype=dtype)
        delta = residual_delta(sae.encode, sae.W_dec, hidden, scale, None).float()
        if reference is None:
            reference = delta
        else:
            errors[dtype] = float((delta - reference).norm() / reference.norm())
    return errors


def print_table(result: dict[str, Any]) -> None:
    print("\n| d_sae | seq | method | SAEs | step (s) | vs LoRA | vs base | memory (MB) | memory vs LoRA |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        memory_ratio = f"{r['memory_vs_lora']:.2f}" if r["memory_vs_lora"] is not None else "-"
        print(f"| {r['d_sae']} | {r['seq']} | {r['method']} | {r['saes']} | {r['step_s']:.3f} | "
              f"{r['step_vs_lora']:.2f} | {r['step_vs_base']:.2f} | {r['memory_mb']:.1f} | {memory_ratio} |")
    print("\ngeneration tokens/s:", {k: round(v, 1) for k, v in result["generation_tokens_per_s"].items()},
          "vs base:", {k: round(v, 2) for k, v in result["generation_vs_base"].items()})
    print("SAE in half precision, relative error of the scale splice vs float32:",
          {k: f"{v:.2e}" for k, v in result["sae_dtype_relative_error"].items()})


def plot(result: dict[str, Any], path: Path) -> None:
    """Step time and memory against sequence length (d_sae = 32 x d_model) and against d_sae (seq 512)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["method"] != "encoder" and r["saes"] <= 1]
    widest = max(r["d_sae"] for r in rows)
    middle_seq = sorted({r["seq"] for r in rows})[len({r["seq"] for r in rows}) // 2]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        by_seq = sorted((r["seq"], r["step_s"], r["memory_mb"]) for r in rows
                        if r["method"] == method and r["d_sae"] == widest)
        by_width = sorted((r["d_sae"], r["step_s"], r["memory_mb"]) for r in rows
                          if r["method"] == method and r["seq"] == middle_seq)
        for column, points in ((0, by_seq), (1, by_width)):
            axes[0][column].plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
            axes[1][column].plot([p[0] for p in points], [p[2] for p in points], marker="o", label=method)
    for row, label in ((0, "train step (s)"), (1, "memory (MB)")):
        axes[row][0].set(xscale="log", yscale="log", xlabel="sequence length", ylabel=label,
                         title=f"{label}, d_sae = {widest}")
        axes[row][1].set(xscale="log", yscale="log", xlabel="d_sae", ylabel=label,
                         title=f"{label}, sequence length {middle_seq}")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
