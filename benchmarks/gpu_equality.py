"""On a GPU, every splice path equals plain autograd over dense latents: the CUDA counterpart of the CPU test
``tests/test_active_latents.py::test_compact_splice_equals_dense_autograd_on_a_model``.

    python benchmarks/gpu_equality.py --output benchmarks/results/gpu/equality.json   # about a minute on one GPU
    python benchmarks/gpu_equality.py --quick                                         # tiny shapes, any device

For each component (scale, scale_bias, clamp, latent_map), SAE architecture (ReLU, TopK, TopK with its latents
rescaled by decoder norm, JumpReLU, gated) and model
dtype (float32, bfloat16), one Llama-style model with random weights and one real sae-lens SAE at layer 1 run a
forward and a backward pass twice: through the compact path (each token's active latents, the Triton kernels on
CUDA, the split bfloat16 encoder product for bfloat16 models) and through plain autograd over dense latents
(``splice.sparse_backward = False``). Compared: the logits, the gradient of the input embeddings and of every
adapter parameter, as relative errors of whole tensors (:data:`TOLERANCE`). Gated SAEs have no compact path (their
latents' derivative is not an encoder row): their two runs take the same path, a check of the harness itself.
Exits non-zero when any case is outside its tolerance; the JSON has each case's largest relative error.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model
from records import write_json
from transformers import AutoModelForCausalLM, LlamaConfig

import peft_isaerft  # noqa: F401
from peft_isaerft import ISaeRFTConfig
from peft_isaerft.testing import TEST_SAE_ARCHITECTURES, make_test_sae

COMPONENTS = ("scale", "scale_bias", "clamp", "latent_map")
ARCHITECTURES = tuple(TEST_SAE_ARCHITECTURES)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
"""Largest relative error ``|got - expected| / |expected|`` (Frobenius norms) per tensor. At these sizes the CPU
test's element-wise tolerances would flag summation-order noise on large logits; bfloat16 models round each
layer's output and gradient to 8 bits, which two orders of summation already tell apart by about 1e-2."""
FULL = {"d_model": 256, "d_sae": 4096, "batch": 4, "seq": 128, "vocab": 1024}
TINY = {"d_model": 32, "d_sae": 128, "batch": 2, "seq": 12, "vocab": 64}


def build_model(shapes: dict[str, int], dtype: torch.dtype, device: str) -> Any:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=shapes["d_model"], intermediate_size=2 * shapes["d_model"], num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=shapes["vocab"],
                         max_position_embeddings=2 * shapes["seq"], initializer_range=0.2)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()


def build_sae(folder: Path, architecture: str, shapes: dict[str, int]) -> Path:
    """A real SAE with non-zero biases and thresholds, built as the CPU tests build theirs (TopK: k 32)."""
    return make_test_sae(folder / architecture, shapes["d_model"], shapes["d_sae"], architecture,
                         hook="blocks.1.hook_resid_post", k=32)


def splice_outputs(sae_path: Path, component: str, dtype: torch.dtype, sparse: bool, shapes: dict[str, int],
                   device: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], bool]:
    """Logits, input-embedding gradient, adapter-parameter gradients, and whether the compact path ran."""
    model = build_model(shapes, dtype, device)
    peft_model = get_peft_model(model, ISaeRFTConfig(saes=[{"path": str(sae_path)}], component=component,
                                                     init_weights=False))
    layer = peft_model.base_model.model.model.layers[1]
    splice = layer.isaerft_splices["default"]
    splice.sparse_backward = sparse
    generator = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(3, shapes["vocab"], (shapes["batch"], shapes["seq"]), generator=generator).to(device)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = peft_model(inputs_embeds=embeds).logits
    weights = torch.linspace(-1, 1, logits.shape[-1], device=device)
    (logits.float() * weights).pow(2).mean().backward()
    grads = {name: param.grad.float().clone() for name, param in layer.named_parameters() if param.requires_grad}
    compact = sparse and getattr(splice, "selector", None) is not None
    return logits.detach().float(), embeds.grad.float(), grads, compact


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm().clamp_min(1e-30))


def compare(case: dict[str, Any], dense: tuple, sparse: tuple, dtype: torch.dtype) -> None:
    """Fill ``case`` with the largest relative errors and whether every tensor is within :data:`TOLERANCE`."""
    pairs = {"logits": (sparse[0], dense[0]), "input_grad": (sparse[1], dense[1])}
    pairs.update({f"grad {name.split('.')[-2]}": (sparse[2][name], dense[2][name]) for name in dense[2]})
    case["relative_error"] = {label: relative_error(got, expected) for label, (got, expected) in pairs.items()}
    failures = [f"{label}: relative error {error:.2e} above {TOLERANCE[dtype]:.0e}"
                for label, error in case["relative_error"].items() if not error <= TOLERANCE[dtype]]
    if sparse[2].keys() != dense[2].keys() or not dense[2]:
        failures.append("the two paths trained different parameters")
    case["within_tolerance"] = not failures
    case["failures"] = failures


def main(quick: bool, output: Path | None, device: str) -> int:
    shapes = TINY if quick else FULL
    started = time.perf_counter()
    folder = Path(tempfile.mkdtemp())
    cases = []
    for architecture in ARCHITECTURES:
        sae_path = build_sae(folder, architecture, shapes)
        for component in COMPONENTS:
            for dtype_name, dtype in DTYPES.items():
                dense = splice_outputs(sae_path, component, dtype, False, shapes, device)
                sparse = splice_outputs(sae_path, component, dtype, True, shapes, device)
                case = {"architecture": architecture, "component": component, "dtype": dtype_name,
                        "compact_path": sparse[3]}
                compare(case, dense, sparse, dtype)
                worst = max(case["relative_error"].values())
                print(f"{architecture:8s} {component:10s} {dtype_name:8s} compact={sparse[3]!s:5s} "
                      f"worst relative error {worst:.2e}  {'ok' if case['within_tolerance'] else 'FAILED'}",
                      flush=True)
                cases.append(case)
    failed = [c for c in cases if not c["within_tolerance"]]
    result = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else device,
              "torch": torch.__version__, "shapes": shapes, "cases": cases, "failed": len(failed),
              "seconds": time.perf_counter() - started}
    if output is not None:
        write_json(output, result)
        print(f"wrote {output}")
    print(f"{len(cases) - len(failed)} of {len(cases)} cases within tolerance on {result['device']}")
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (checks the machinery on any device)")
    parser.add_argument("--output", type=Path, default=None, help="write the cases as JSON here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    raise SystemExit(main(args.quick, args.output, args.device))
