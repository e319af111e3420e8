"""The benchmarks' machinery at tiny sizes (the real runs are minutes long and are not tests): the GPU preset of the
speed benchmark, the GPU equality check of every splice path, the audit's GPU check, the CPU bfloat16 screen's
check, one-method-per-process timing, and the FSDP check's train/save/reload comparison (here without FSDP, which
needs a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_gpu_preset_runs_at_tiny_size_and_reports_every_figure(tmp_path) -> None:
    output = tmp_path / "preset.json"
    _run("benchmarks/speed.py", "--preset", "gemma-2-2b", "--quick", "--output", str(output))
    result = json.loads(output.read_text())
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_preset import METHODS

    assert [row["method"] for row in result["rows"]] == [method.name for method in METHODS]
    assert not result["errors"]
    for row in result["rows"]:
        assert row["step_s"] > 0 and row["vs_lora"] > 0
        if row["method"].startswith("scale"):
            assert "extra_over_bias_in_encoder_passes" in row
    assert max(result["compact_vs_dense_relative_error"].values()) < 1e-5
    assert set(result["precision"]) == {"fp32 again", "fp32, other summation order", "split bf16 encoder (default)",
                                        "sae_tf32", "sae_dtype bf16"}
    assert result["precision"]["fp32 again"]["top20_overlap"] == 1.0  # on a CPU two float32 runs are identical
    assert (tmp_path / "preset_profile.txt").read_text().strip()


def test_gpu_equality_check_covers_every_case_and_flags_a_wrong_path(tmp_path) -> None:
    output = tmp_path / "equality.json"
    _run("benchmarks/gpu_equality.py", "--quick", "--output", str(output))
    result = json.loads(output.read_text())
    assert result["failed"] == 0 and len(result["cases"]) == 4 * 5 * 2
    assert {c["architecture"] for c in result["cases"] if c["compact_path"]} == {"standard", "topk", "topk_rescaled",
                                                                                "jumprelu"}
    for case in result["cases"]:
        assert "grad isaerft_" + {"scale": "scale", "scale_bias": "bias", "clamp": "clamp_gate",
                                  "latent_map": "map_source"}[case["component"]] in case["relative_error"]

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from gpu_equality import compare

    dense = (torch.ones(3), torch.ones(3), {"layer.isaerft_scale.default": torch.ones(3)})
    wrong = (torch.ones(3), torch.ones(3) * 1.001, {"layer.isaerft_scale.default": torch.ones(3)})
    case: dict = {}
    compare(case, dense, wrong, torch.float32)
    assert not case["within_tolerance"] and case["failures"][0].startswith("input_grad: relative error 1.00e-03")
    compare(case, dense, wrong, torch.bfloat16)  # 0.1 % is within bfloat16's rounding
    assert case["within_tolerance"]


def test_gpu_audit_check_runs_every_recipe_both_ways_and_flags_a_disagreement(tmp_path) -> None:
    output = tmp_path / "audit.json"
    _run("benchmarks/gpu_audit.py", "--quick", "--output", str(output))
    result = json.loads(output.read_text())
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_audit import RECIPES, compare

    assert set(result["recipes"]) == set(RECIPES) and not result["failures"]
    for recipe in result["recipes"].values():  # on a CPU both runs take the same path: the same latents, values
        assert recipe["default"]["latents"] and recipe["default"]["latents"] == recipe["use_cpu"]["latents"]
    disagreement = compare({"h:1": 1.0, "h:2": 2.0}, {"h:1": 1.1, "h:3": 2.0})
    assert disagreement["overlap"] == 0.5 and disagreement["largest_relative_difference"] == pytest.approx(0.1 / 1.1)
    assert compare({}, {})["overlap"] == 0  # two empty reports compared nothing: no agreement


def test_screen_check_compares_the_bf16_screen_with_the_float32_search(tmp_path) -> None:
    from peft_isaerft.active_latents import bf16_screen_available

    output = tmp_path / "screen.json"
    if not bf16_screen_available():  # nothing to compare on this CPU: the check says so and writes nothing
        refused = subprocess.run([sys.executable, "benchmarks/screen_check.py", "--quick", "--output", str(output)],
                                 cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
        assert refused.returncode != 0 and "no bfloat16 matrix instructions" in refused.stderr
        assert not output.exists()
        return
    _run("benchmarks/screen_check.py", "--quick", "--output", str(output))
    result = json.loads(output.read_text())
    (case,) = result["cases"]
    assert case["tokens"] == 64 and case["tokens_with_another_set"] == 0
    (timing,) = result["selector_timings"]
    assert timing["screen_s"] > 0 and timing["float32_search_s"] > 0 and timing["screened_by_default"] is False
    assert 0 < case["latents_relative_change"] < 1e-5  # float32 values summed in another order, not bit-equal
    assert case["adapter_cosine"] > 0.9999 and case["top20_overlap"] == 1.0


def test_speed_single_prints_one_methods_step(tmp_path) -> None:
    result = _run("benchmarks/speed.py", "--single", "scale", "--quick")
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["method"] == "scale" and row["step_s"] > 0


def test_fsdp_check_compares_a_saved_adapter_with_the_trained_model(tmp_path) -> None:
    _run("benchmarks/fsdp_check.py", "train", str(tmp_path))
    result = subprocess.run([sys.executable, "benchmarks/fsdp_check.py", "check", str(tmp_path)], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=600)
    verdict = json.loads(result.stdout.strip().splitlines()[-1])
    assert result.returncode == 0 and verdict["equal"] and not verdict["fsdp"]
    assert "adapter_model.safetensors" in verdict["adapter_files"]
    # a different adapter must fail the comparison: the check can say no
    import torch

    torch.save(torch.zeros(2, 32, 512), tmp_path / "trained_logits.pt")
    failed = subprocess.run([sys.executable, "benchmarks/fsdp_check.py", "check", str(tmp_path)], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=600)
    assert failed.returncode == 1 and not json.loads(failed.stdout.strip().splitlines()[-1])["equal"]



def test_results_file_is_replaced_whole_and_a_write_cut_midway_leaves_the_previous_one(tmp_path, monkeypatch) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from records import write_json

    output = tmp_path / "results" / "run.json"
    write_json(output, {"cells": [1, 2]})
    write_json(output, {"cells": [3]})
    assert json.loads(output.read_text()) == {"cells": [3]}
    assert sorted(path.name for path in output.parent.iterdir()) == ["run.json"]

    write_text = Path.write_text

    def disk_full_midway(path: Path, text: str, *args, **kwargs) -> int:
        write_text(path, text[:5], *args, **kwargs)
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full_midway)
    with pytest.raises(OSError, match="No space"):
        write_json(output, {"cells": [4]})
    monkeypatch.undo()
    assert json.loads(output.read_text()) == {"cells": [3]}
