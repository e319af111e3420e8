"""The GPU preset of the speed benchmark: ISaeRFT at Gemma Scope size against LoRA, on one GPU.

    python benchmarks/speed.py --preset gemma-2-2b           # about 3 minutes on one H100 / H200
    python benchmarks/speed.py --preset gemma-2-2b --quick   # tiny shapes, runs on a CPU, to check the machinery

Model: the Gemma-2-2B architecture with random weights in bfloat16 (26 layers, d_model 2304, vocabulary 256000),
batch 8 x 1024 tokens, labels = inputs, AdamW. SAEs: JumpReLU, shaped like Gemma Scope (d_in 2304; 16k or 65k
latents), decoder rows of unit norm, encoder = decoder transposed, and per-latent thresholds set from the model's own
residual stream at the attach layer so that 64 latents fire per token on average. One SAE at layer 13, or four at
layers 6, 13, 19, 25. Each figure is the median of 5 steps after 2 warm-up steps; memory is the peak of
``torch.cuda.max_memory_allocated`` over that method's steps. Methods run one after another on one base model in
one process: between methods the adapter is unloaded, its optimizer and gradients freed, and the peak counter reset.

Also measured: the bare encoder pass of the 8192 tokens (fp32, TF32, bf16; the floor of a scale adapter's extra cost
over a bias adapter), the cost of finding the active latents (also through the split bfloat16 encoder product that
bfloat16 models get by default on CUDA, ``peft_isaerft.active_latents.split_bf16``), host-device synchronisations
inside one scale step,
a profile of one scale step, and what the faster precisions change (``precision``): the relative change of the
splice's residual delta, and of a scale adapter trained for 20 steps (cosine to the float32 adapter and overlap of its
top-20 latents), each beside a second float32 run, which is the floor set by GPU atomics' summation order. The
reference is the plain float32 encoder product; the rows "float32 encoder product" time it too.
"""

from __future__ import annotations

import gc
import json
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from records import write_json
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
from transformers import AutoModelForCausalLM, Gemma2Config

import peft_isaerft  # noqa: F401
from peft_isaerft import ISaeRFTConfig, active_latents, components, kernels
from peft_isaerft.active_latents import selector_for
from peft_isaerft.saes import SAEReference, clear_sae_cache, load_sae


@dataclass(frozen=True)
class Shapes:
    d_model: int
    d_ff: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    batch: int
    seq: int
    d_sae: int
    d_sae_wide: int
    l0: int
    one_layer: int
    four_layers: tuple[int, ...]


GEMMA_2_2B = Shapes(2304, 9216, 26, 8, 4, 256, 256000, 8, 1024, 16384, 65536, 64, 13, (6, 13, 19, 25))
QUICK = Shapes(64, 128, 4, 4, 2, 16, 512, 2, 64, 512, 2048, 8, 1, (0, 1, 2, 3))


@dataclass(frozen=True)
class Method:
    name: str
    component: str  # "lora" or an ISaeRFT component
    four: bool = False
    wide: bool = False
    options: dict[str, Any] = field(default_factory=dict)


METHODS = [
    Method("lora", "lora"),
    Method("bias", "bias"),
    Method("scale", "scale"),
    Method("scale, dense autograd", "scale", options={"sparse": False}),
    Method("scale, float32 encoder product", "scale", options={"sae_split_encoder": False}),
    Method("scale, PyTorch ops (no Triton)", "scale", options={"triton": False}),
    Method("scale, dense active dots", "scale", options={"active_dots": "dense", "triton": False}),
    Method("scale, sae_tf32", "scale", options={"sae_tf32": True}),
    Method("scale, sae_dtype bf16", "scale", options={"sae_dtype": "bfloat16"}),
    Method("scale_bias", "scale_bias"),
    Method("clamp", "clamp"),
    Method("latent_map", "latent_map"),
    Method("scale 65k", "scale", wide=True),
    Method("scale 65k, dense autograd", "scale", wide=True, options={"sparse": False}),
    Method("scale 65k, float32 encoder product", "scale", wide=True, options={"sae_split_encoder": False}),
    Method("scale 65k, sae_tf32", "scale", wide=True, options={"sae_tf32": True}),
    Method("scale 65k, sae_dtype bf16", "scale", wide=True, options={"sae_dtype": "bfloat16"}),
    Method("bias x4", "bias", four=True),
    Method("scale x4", "scale", four=True),
    Method("scale x4, dense autograd", "scale", four=True, options={"sparse": False}),
    Method("scale x4, float32 encoder product", "scale", four=True, options={"sae_split_encoder": False}),
    Method("scale x4, sae_tf32", "scale", four=True, options={"sae_tf32": True}),
    Method("scale x4, sae_dtype bf16", "scale", four=True, options={"sae_dtype": "bfloat16"}),
]


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build_model(shapes: Shapes, device: str) -> Any:
    config = Gemma2Config(
        hidden_size=shapes.d_model, intermediate_size=shapes.d_ff, num_hidden_layers=shapes.layers,
        num_attention_heads=shapes.heads, num_key_value_heads=shapes.kv_heads, head_dim=shapes.head_dim,
        vocab_size=shapes.vocab, max_position_embeddings=max(shapes.seq, 8192),
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model


@torch.no_grad()
def residual(model: Any, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """The residual stream after decoder layer ``layer`` (``blocks.{layer}.hook_resid_post``), tokens x d_model."""
    seen: list[torch.Tensor] = []
    handle = model.model.layers[layer].register_forward_hook(lambda _m, _a, out: seen.append(
        (out[0] if isinstance(out, tuple) else out).detach()))
    try:
        model(input_ids=ids)
    finally:
        handle.remove()
    return seen[0].reshape(-1, seen[0].shape[-1]).float()


@torch.no_grad()
def build_sae(folder: Path, hidden: torch.Tensor, layer: int, d_sae: int, l0: int, seed: int) -> str:
    """A JumpReLU SAE on ``hidden``'s residual stream whose thresholds make ``l0`` latents fire per token on average."""
    device = hidden.device
    generator = torch.Generator(device=device).manual_seed(seed)
    d_in = hidden.shape[-1]
    cfg = JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, device=str(device))
    cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
    sae = JumpReLUSAE(cfg)
    decoder = torch.nn.functional.normalize(torch.randn(d_sae, d_in, device=device, generator=generator), dim=-1)
    sae.W_dec.copy_(decoder)
    sae.W_enc.copy_(decoder.T)
    sae.b_dec.copy_(hidden.mean(0))
    sae.b_enc.zero_()
    pre = (hidden - sae.b_dec) @ sae.W_enc
    # each latent fires on a fraction l0 / d_sae of the calibration tokens
    rank = min(hidden.shape[0] - 1, max(1, round(hidden.shape[0] * (1 - l0 / d_sae))))
    sae.threshold.copy_(pre.kthvalue(rank, dim=0).values.clamp_min(1e-6))
    path = folder / f"jumprelu_{d_sae}_{layer}"
    sae.save_model(str(path))
    return str(path)


def attach(model: Any, method: Method, saes: list[str]) -> Any:
    if method.component == "lora":
        return get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    options = dict(method.options)
    sparse = options.pop("sparse", True)
    components.ACTIVE_DOT_METHOD = options.pop("active_dots", "gather")
    kernels.ENABLED = options.pop("triton", True)
    peft_model = get_peft_model(model, ISaeRFTConfig(saes=[{"path": p} for p in saes], component=method.component,
                                                     init_weights=False, **options))
    for module in peft_model.modules():
        for splice in getattr(module, "isaerft_splices", {}).values():
            splice.sparse_backward = splice.sparse_backward and sparse
    return peft_model


def release(peft_model: Any) -> Any:
    """Unload the adapter and free everything it held; the base model comes back."""
    base = peft_model.unload()
    del peft_model
    clear_sae_cache()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return base


def train_steps(model: Any, batches: list[torch.Tensor], device: str, lr: float = 1e-4) -> list[float]:
    """Seconds of each step (forward, backward, AdamW step) over ``batches``."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    times = []
    for ids in batches:
        synchronize(device)
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        times.append(time.perf_counter() - start)
    del optimizer
    return times


def time_method(model: Any, method: Method, saes: list[str], batches: list[torch.Tensor], device: str) -> tuple[
        dict[str, Any], Any]:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    peft_model = attach(model, method, saes)
    try:
        times = train_steps(peft_model, batches, device)
        memory = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else 0.0
    finally:
        model = release(peft_model)
    row = {"method": method.name, "step_s": statistics.median(times[2:]), "peak_gib": memory,
           "saes": len(saes) if method.component != "lora" else 0}
    return row, model


@torch.no_grad()
def encoder_timings(sae_paths: dict[str, str], hidden: torch.Tensor, device: str) -> dict[str, float]:
    """Median seconds of one bare ``sae.encode`` of ``hidden`` (and of finding its active latents)."""
    from peft_isaerft.active_latents import tf32_matmuls

    out: dict[str, float] = {}
    for width, path in sae_paths.items():
        for precision in ("fp32", "tf32", "bf16"):
            sae = load_sae(SAEReference(path=path), device=device, dtype="bfloat16" if precision == "bf16" else None)
            selector = selector_for(sae, tf32=precision == "tf32")
            with tf32_matmuls(precision == "tf32"):
                out[f"encode {width} {precision}"] = median_seconds(lambda sae=sae: sae.encode(hidden), device)
            out[f"encode+select {width} {precision}"] = median_seconds(lambda sel=selector: sel(hidden), device)
            values, _ = selector(hidden)
            out[f"mean L0 {width} {precision}"] = float((values != 0).sum(-1).float().mean())
            out[f"width {width} {precision}"] = float(values.shape[-1])
            if precision == "fp32":  # a bfloat16 model's hidden states: the split encoder product
                exact = hidden.bfloat16()
                out[f"encode+select {width} split"] = median_seconds(lambda sel=selector, h=exact: sel(h), device)
            clear_sae_cache()
    return out


def median_seconds(fn: Any, device: str, repeats: int = 10) -> float:
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def synchronisations(model: Any, saes: list[str], batch: torch.Tensor, device: str) -> dict[str, Any]:
    """Host-device synchronisations in one scale training step after warm-up, and where in this package they are."""
    if not device.startswith("cuda"):
        return {"skipped": "not a CUDA device"}
    peft_model = attach(model, Method("scale", "scale"), saes)
    train_steps(peft_model, [batch, batch], device)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            peft_model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncing = [w for w in caught if "synchroniz" in str(w.message)]
    places = [f"{Path(w.filename).name}:{w.lineno}" for w in syncing]
    ours = [place for place, w in zip(places, syncing, strict=True) if "peft_isaerft" in w.filename]
    del optimizer
    release(peft_model)
    return {"total": len(places), "in_peft_isaerft": ours, "places": sorted(set(places))}


def profile_step(model: Any, saes: list[str], batch: torch.Tensor, device: str, path: Path) -> None:
    """The top kernels of one scale training step, as torch.profiler's table."""
    from torch.profiler import ProfilerActivity, profile

    peft_model = attach(model, Method("scale", "scale"), saes)
    train_steps(peft_model, [batch, batch], device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        train_steps(peft_model, [batch], device)
    key = "cuda_time_total" if device.startswith("cuda") else "cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=key, row_limit=30))
    release(peft_model)


def equality(hidden: torch.Tensor, sae_path: str, device: str) -> dict[str, float]:
    """On this device: the compact splice against plain autograd over dense latents (delta and the gradients of the
    scale and the input), for the preset's JumpReLU SAE and a TopK SAE of the same shape; largest relative errors."""
    from sae_lens import TopKSAE, TopKSAEConfig

    from peft_isaerft.components import residual_delta

    jumprelu = load_sae(SAEReference(path=sae_path), device=device)
    topk = TopKSAE(TopKSAEConfig(d_in=jumprelu.cfg.d_in, d_sae=jumprelu.cfg.d_sae, k=64, device=str(device)))
    topk.load_state_dict({k: v for k, v in jumprelu.state_dict().items() if k != "threshold"})
    topk.requires_grad_(False)
    out = {}
    hidden = hidden[:2048]
    weights = torch.randn_like(hidden)
    for name, sae in (("jumprelu", jumprelu), ("topk", topk)):
        results = []
        for select in (None, selector_for(sae)):
            h = hidden.clone().requires_grad_(True)
            s = (torch.randn(sae.cfg.d_sae, device=device, generator=torch.Generator(device=device).manual_seed(1))
                 * 0.5).requires_grad_(True)
            delta = residual_delta(sae.encode, sae.W_dec, h, s, None, select=select,
                                   encoder_rows=sae.W_enc.detach().T.contiguous())
            (delta * weights).sum().backward()
            results.append((delta.detach(), s.grad, h.grad))
        for label, dense, sparse in zip(("delta", "grad_scale", "grad_input"), *results, strict=True):
            out[f"{name} {label}"] = float((sparse - dense).norm() / dense.norm())
    clear_sae_cache()
    return out


def _pre_activations_in_halves(self: Any, hidden: torch.Tensor) -> torch.Tensor:
    """The float32 encoder product summed in another order (two halves of d_in): the floor of rounding changes."""
    sae = self.sae
    x = sae.process_sae_in(hidden)
    half = x.shape[-1] // 2
    pre = torch.addmm(sae.b_enc, x[:, :half], sae.W_enc[:half]).addmm_(x[:, half:], sae.W_enc[half:])
    return sae.hook_sae_acts_pre(pre)


def precision(model: Any, sae_path: str, layer: int, batches: list[torch.Tensor], device: str) -> dict[str, Any]:
    """What the split encoder product, TF32 and a bf16 SAE change: the splice's delta, and a scale adapter trained for
    20 steps. ``batches`` must not include the batch the JumpReLU thresholds were set on (each threshold is one of its
    pre-activations exactly, so any rounding would flip it there). "fp32, other summation order" (the float32 product
    summed over two halves of d_in) is the floor any change of summation order sets."""
    from peft_isaerft.components import residual_delta

    hidden = residual(model, batches[0], layer)
    d_sae = load_sae(SAEReference(path=sae_path), device=device).cfg.d_sae
    scale = torch.randn(d_sae, device=device, generator=torch.Generator(device=device).manual_seed(0)) * 0.5
    # the reference is the plain float32 encoder product; "split" is the default for bfloat16 models on CUDA
    variants = {"fp32": {"sae_split_encoder": False}, "fp32 again": {"sae_split_encoder": False},
                "fp32, other summation order": {"sae_split_encoder": False, "halves": True},
                "split bf16 encoder (default)": {},
                "sae_tf32": {"sae_tf32": True}, "sae_dtype bf16": {"sae_dtype": "bfloat16"}}
    deltas, adapters = {}, {}
    plain_pre_activations = active_latents.LatentSelector.pre_activations
    for name, options in variants.items():
        options = dict(options)
        active_latents.LatentSelector.pre_activations = (_pre_activations_in_halves if options.pop("halves", False)
                                                         else plain_pre_activations)
        sae = load_sae(SAEReference(path=sae_path), device=device, dtype=options.get("sae_dtype"))
        selector = selector_for(sae, tf32=options.get("sae_tf32", False), split=options.get("sae_split_encoder", True))
        # the hidden states are a bfloat16 model's (exact in bfloat16): the selector sees them as the model hands them
        with torch.no_grad():
            deltas[name] = residual_delta(sae.encode, sae.W_dec, hidden, scale, None,
                                          select=lambda h, sel=selector: sel(h.bfloat16()),
                                          encoder_rows=sae.W_enc.T.contiguous()).float()
        clear_sae_cache()
        torch.manual_seed(0)
        peft_model = get_peft_model(model, ISaeRFTConfig(saes=[{"path": sae_path}], component="scale", **options))
        train_steps(peft_model, batches, device, lr=1e-2)
        adapters[name] = next(p for n, p in peft_model.named_parameters() if "isaerft_scale" in n).detach().float()
        model = release(peft_model)
    active_latents.LatentSelector.pre_activations = plain_pre_activations
    reference_delta, reference_adapter = deltas["fp32"], adapters["fp32"]
    top = set(reference_adapter.abs().topk(20).indices.tolist())
    result = {}
    for name in variants:
        if name == "fp32":
            continue
        adapter = adapters[name]
        result[name] = {
            "splice_relative_change": float((deltas[name] - reference_delta).norm() / reference_delta.norm()),
            "adapter_relative_change": float((adapter - reference_adapter).norm() / reference_adapter.norm()),
            "adapter_cosine": float(torch.nn.functional.cosine_similarity(adapter, reference_adapter, dim=0)),
            "top20_overlap": len(top & set(adapter.abs().topk(20).indices.tolist())) / 20,
        }
    return result


def main(quick: bool, output: Path, device: str) -> None:
    torch.set_grad_enabled(True)
    shapes = QUICK if quick else GEMMA_2_2B
    started = time.perf_counter()
    model = build_model(shapes, device)
    generator = torch.Generator(device=device).manual_seed(0)
    batches = [torch.randint(0, shapes.vocab, (shapes.batch, shapes.seq), device=device, generator=generator)
               for _ in range(7)]
    folder = Path(tempfile.mkdtemp())
    hidden = {layer: residual(model, batches[0], layer) for layer in shapes.four_layers}
    one = [build_sae(folder, hidden[shapes.one_layer], shapes.one_layer, shapes.d_sae, shapes.l0, 0)]
    wide = [build_sae(folder, hidden[shapes.one_layer], shapes.one_layer, shapes.d_sae_wide, shapes.l0, 1)]
    four = [build_sae(folder, hidden[layer], layer, shapes.d_sae, shapes.l0, 2 + i)
            for i, layer in enumerate(shapes.four_layers)]
    print(f"built the model and {len(one) + len(wide) + len(four)} SAEs in {time.perf_counter() - started:.0f} s",
          flush=True)
    rows: list[dict[str, Any]] = []
    raise_later: list[str] = []
    for method in METHODS:
        saes = four if method.four else wide if method.wide else one
        try:
            row, model = time_method(model, method, saes, batches, device)
        except Exception as error:  # keep the other rows of a lease-limited run; the JSON says what failed
            print(f"{method.name}: {type(error).__name__}: {error}", flush=True)
            raise_later.append(f"{method.name}: {error!r}")
            continue
        rows.append(row)
        print(f"{row['method']:28s} step {row['step_s']:.3f} s  peak {row['peak_gib']:.1f} GiB", flush=True)
    probe = hidden[shapes.one_layer]
    encoder = encoder_timings({"16k": one[0], "65k": wide[0]} if not quick else {"small": one[0], "wide": wide[0]},
                              probe, device)
    equal = equality(probe, one[0], device)
    syncs = synchronisations(model, one, batches[0], device)
    profile_step(model, one, batches[0], device, output.with_name(output.stem + "_profile.txt"))
    precise = precision(model, one[0], shapes.one_layer, batches[1:6] * 4, device)  # thresholds came from batches[0]
    result = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else device,
              "torch": torch.__version__, "shapes": asdict(shapes), "rows": rows, "encoder_s": encoder,
              "synchronisations": syncs, "precision": precise,
              "compact_vs_dense_relative_error": equal, "errors": raise_later,
              "minutes": (time.perf_counter() - started) / 60}
    add_ratios(result)
    write_json(output, result)
    print_table(result)
    print(f"\nwrote {output}")
    if raise_later:
        raise SystemExit("some methods failed: " + "; ".join(raise_later))


def add_ratios(result: dict[str, Any]) -> None:
    rows = {r["method"]: r for r in result["rows"]}
    encode = result["encoder_s"]
    first = next(k for k in encode if k.startswith("encode ") and k.endswith(" fp32"))
    for row in result["rows"]:
        row["vs_lora"] = row["step_s"] / rows["lora"]["step_s"]
        bias = rows["bias x4" if "x4" in row["method"] else "bias"]
        row["memory_vs_bias"] = row["peak_gib"] / bias["peak_gib"] if bias["peak_gib"] else None
        if row["method"].startswith("scale"):
            width = first if "65k" not in row["method"] else first.replace("16k", "65k")
            passes = (4 if "x4" in row["method"] else 1) * encode.get(width, encode[first])
            row["extra_over_bias_in_encoder_passes"] = (row["step_s"] - bias["step_s"]) / passes


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{result['device']}, torch {result['torch']}")
    print("| method | step (s) | x LoRA | extra over bias (encoder passes) | peak GPU memory (GiB) | x bias |")
    print("|---|---|---|---|---|---|")
    for r in result["rows"]:
        extra = r.get("extra_over_bias_in_encoder_passes")
        memory = r["memory_vs_bias"]
        print(f"| {r['method']} | {r['step_s']:.3f} | {r['vs_lora']:.2f} | "
              f"{'' if extra is None else f'{extra:.2f}'} | {r['peak_gib']:.1f} | "
              f"{'' if memory is None else f'{memory:.3f}'} |")
    print("\nencoder pass of the batch (ms; L0 and width in latents):",
          {k: round(v * (1e3 if k.startswith("encode") else 1), 2) for k, v in result["encoder_s"].items()})
    print("synchronisations in one scale step:", result["synchronisations"])
    print("compact splice vs dense autograd, relative error:",
          {k: f"{v:.1e}" for k, v in result["compact_vs_dense_relative_error"].items()})
    print("precision against float32:", json.dumps(result["precision"], indent=1))
