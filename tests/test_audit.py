"""`isaerft audit` end to end, and a small version of the planted-feature recovery benchmark."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_model, make_tokenizer

from peft_isaerft.audit import audit_device, parse_sae_argument, read_rows
from peft_isaerft.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_audit_cli_writes_adapter_and_reports(sae_factory, tmp_path, capsys) -> None:
    model_dir = tmp_path / "model"
    make_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "data.jsonl"
    rows = [{"text": "the sea is calm tonight."}, {"prompt": "where is the boat? ", "completion": "on the sea."}] * 8
    data.write_text("\n".join(json.dumps(r) for r in rows))
    sae = sae_factory(hook="blocks.1.hook_resid_post")
    code = main(
        [
            "audit",
            "--model",
            str(model_dir),
            "--sae",
            str(sae),
            "--data",
            str(data),
            "--output",
            str(tmp_path / "out"),
            "--steps",
            "5",
            "--top-k",
            "4",
            "--l1",
            "0.05",
            "--allow-negative-bias",
            "--surprising-tokens",
            "0.5",
        ]
    )
    assert code == 0
    out = tmp_path / "out"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    report = json.loads((out / "report.json").read_text())
    assert 0 < len(report) <= 4 and report[0]["effect"] >= report[-1]["effect"]
    assert (out / "report.html").read_text().startswith("<!doctype html>")
    assert "blocks.1.hook_resid_post" in capsys.readouterr().out
    recorded = json.loads((out / "audit.json").read_text())
    assert recorded["settings"]["l1"] == 0.05 and recorded["settings"]["nonnegative_bias"] is False
    assert recorded["settings"]["steps"] == 5 and recorded["rows"] == len(rows)
    assert recorded["settings"]["surprising_tokens"] == 0.5 and 0 < recorded["calibration"]["rows_fitted"] <= len(rows)
    (lambda_max,) = recorded["calibration"]["lambda_max"].values()
    (l1_coeff,) = recorded["calibration"]["l1_coeff"].values()
    assert l1_coeff == pytest.approx(0.05 * lambda_max) and lambda_max > 0


def _saved_model_and_sea_rows(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny model folder with its tokenizer, and 16 prompt/completion rows that differ in how long the answer is."""
    model_dir = tmp_path / "model"
    make_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"question {i}: ", "completion": f"the sea {'is ' * (i % 4)}calm."})
                              for i in range(16)))
    return model_dir, data


def test_audit_cli_runs_a_coverage_weighed_attribution_audit(sae_factory, tmp_path) -> None:
    model_dir, data = _saved_model_and_sea_rows(tmp_path)
    sae = sae_factory(hook="blocks.1.hook_resid_post")
    assert main(["audit", "--model", str(model_dir), "--sae", str(sae), "--data", str(data), "--output",
                 str(tmp_path / "out"), "--bias-fit", "attribution", "--surprising-rows", "0.25",
                 "--weigh-by-coverage", "--top-k", "5", "--use-cpu"]) == 0
    recorded = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert recorded["settings"]["weigh_by_coverage"] is True and recorded["calibration"]["rows_fitted"] == 4
    assert recorded["settings"]["coverage_weighing"] == "difference"
    assert main(["audit", "--model", str(model_dir), "--sae", str(sae), "--data", str(data), "--output",
                 str(tmp_path / "lift"), "--bias-fit", "attribution", "--surprising-rows", "0.25",
                 "--weigh-by-coverage", "lift", "--top-k", "5", "--use-cpu"]) == 0
    assert json.loads((tmp_path / "lift" / "audit.json").read_text())["settings"]["coverage_weighing"] == "lift"
    assert recorded["settings"]["use_cpu"] is True
    (scores,) = recorded["calibration"]["attributed"].values()
    assert 0 < len(scores) <= 5 and all(score > 0 for score in scores.values())


def test_audit_labels_its_features_by_their_contexts_in_other_text_keeping_its_own_ranking(sae_factory,
                                                                                           tmp_path) -> None:
    model_dir, data = _saved_model_and_sea_rows(tmp_path)
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("\n".join(json.dumps({"text": f"a boat {'and a net ' * (i % 3)}on the {'dark ' * (i % 4)}sea"})
                                  for i in range(12)))
    sae = sae_factory(hook="blocks.1.hook_resid_post")
    flags = ["audit", "--model", str(model_dir), "--sae", str(sae), "--data", str(data), "--bias-fit", "attribution",
             "--surprising-rows", "0.25", "--top-k", "5", "--use-cpu"]
    assert main([*flags, "--output", str(tmp_path / "plain")]) == 0
    assert main([*flags, "--output", str(tmp_path / "labelled"), "--contexts", str(held_out)]) == 0
    plain = json.loads((tmp_path / "plain" / "report.json").read_text())
    labelled = json.loads((tmp_path / "labelled" / "report.json").read_text())
    assert [(r["latent"], r["effect"]) for r in labelled] == [(r["latent"], r["effect"]) for r in plain]
    assert all(r["contexts"] is None and r["label"] is None for r in plain)
    held_out_text = held_out.read_text()
    fired = [r for r in labelled if r["contexts"]]
    assert fired, "no reported latent fires anywhere in the held-out text"
    for record in fired:
        assert record["label"] == f"fires on: {record['contexts'][0]}" and len(record["contexts"]) <= 3
        marked = record["contexts"][0]
        assert "[[" in marked and marked.replace("[[", "").replace("]]", "") in held_out_text.replace("\n", " ")


def test_audit_refuses_a_missing_contexts_file_before_loading_the_model(tmp_path, capsys) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": "the sea"}))
    assert main(["audit", "--model", str(tmp_path / "no-model"), "--sae", "some-release/some-id", "--data", str(data),
                 "--output", str(tmp_path / "out"), "--contexts", str(tmp_path / "missing.jsonl")]) != 0
    error = capsys.readouterr().err
    assert "missing.jsonl" in error and "no-model" not in error


def test_cli_names_the_audits_coverage_weighings(capsys) -> None:
    from peft_isaerft.audit import COVERAGE_WEIGHINGS
    from peft_isaerft.cli import COVERAGE_WEIGHING_NAMES

    assert COVERAGE_WEIGHING_NAMES == tuple(COVERAGE_WEIGHINGS)
    with pytest.raises(SystemExit):
        main(["audit", "--model", "m", "--sae", "s", "--data", "d", "--output", "o", "--weigh-by-coverage", "ratio"])
    error = capsys.readouterr().err
    assert "argument --weigh-by-coverage: invalid choice: 'ratio'" in error
    assert "difference" in error and "lift" in error


def test_the_audit_runs_where_the_trainer_would(monkeypatch) -> None:
    model = make_model("llama")
    assert audit_device(model, use_cpu=True) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert audit_device(model) is None  # no GPU: the model stays where the user put it
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert audit_device(model) == torch.device("cuda")  # the passes before the fit run where the Trainer trains
    assert audit_device(model, use_cpu=True) == torch.device("cpu")
    model.hf_device_map = {"model.layers.0": 0, "model.layers.1": 1}
    assert audit_device(model) is None  # dispatched over two devices: left as it is


def test_audit_inputs_are_validated(tmp_path) -> None:
    assert parse_sae_argument("gemma-scope-2b-pt-res-canonical/layer_20/width_16k/canonical") == {
        "release": "gemma-scope-2b-pt-res-canonical",
        "sae_id": "layer_20/width_16k/canonical",
    }
    assert parse_sae_argument(str(tmp_path)) == {"path": str(tmp_path)}
    with pytest.raises(ValueError, match="RELEASE/SAE_ID"):
        parse_sae_argument("not-a-folder")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "only a prompt"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1 needs a 'text' field"):
        read_rows(bad)


def test_small_recovery_benchmark_finds_planted_features_and_resumes_a_cut_run(tmp_path, monkeypatch,
                                                                                capsys) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import recovery

    result = recovery.main(["--quick", "--output", str(tmp_path / "recovery.json")])
    assert {(row["component"], row["k"]) for row in result["table"]} == {("scale", 3), ("bias", 10)}
    for row in result["table"]:
        # the audit names at least 8 in 10 planted latents (measured 0.9 on the bias cell, where fine-tuning the
        # latent biases proximally names 4 in 10) and is ahead of every data-only baseline
        assert row["audit"] >= 0.8, row
        for baseline in ("dataset_diffing", "lora_projection", "lora_sparse_code"):
            assert row["audit"] > row[baseline], row
    assert result["complete"] and all("grid_entry" in cell for cell in result["cells"])

    # a run cut after its first cell: --resume keeps that cell and runs only the other one
    output = tmp_path / "cut.json"
    first = result["cells"][0]["grid_entry"]
    kept = [cell for cell in result["cells"] if cell["grid_entry"] == first]
    output.write_text(json.dumps({**result, "complete": False, "cells": kept}))
    ran = []
    real_run_cell = recovery.run_cell

    def recording_run_cell(subject, component, k, seed, *args, **kwargs):
        ran.append((component, k, seed))
        return real_run_cell(subject, component, k, seed, *args, **kwargs)

    monkeypatch.setattr(recovery, "run_cell", recording_run_cell)
    resumed = recovery.main(["--quick", "--output", str(output), "--resume"])
    assert ran == [tuple(cell["grid_entry"][2:]) for cell in result["cells"] if cell["grid_entry"] != first]
    assert resumed["complete"] and [c["grid_entry"] for c in resumed["cells"]] == [
        c["grid_entry"] for c in result["cells"]]
    assert resumed["cells"][0] == kept[0]
    assert json.loads(output.read_text())["table"] == resumed["table"]

    # everything done: nothing runs; other settings: a clear refusal instead of mixing two runs' cells
    ran.clear()
    assert recovery.main(["--quick", "--output", str(output), "--resume"])["table"] == resumed["table"] and not ran
    with pytest.raises(SystemExit):
        recovery.main(["--quick", "--output", str(output), "--resume", "--steps", "7"])
    assert "was written by a run with other settings" in capsys.readouterr().err


def _token_rows(n: int = 24, length: int = 12) -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 60, (n, length), generator=generator).tolist()
    return [{"input_ids": row, "labels": row} for row in ids]


def test_audit_calibrates_threshold_and_step_to_the_model(sae_factory, tmp_path) -> None:
    from peft_isaerft.audit import AuditSettings, fit_adapter_on_tokens
    from peft_isaerft.sparsity import l1_coefficient

    rows = _token_rows()
    settings = AuditSettings(steps=3, batch_size=8, calibration_batches=2, l1=0.2, bias_lr=0.02, bias_fit="proximal")
    sae = sae_factory(hook="blocks.1.hook_resid_post")
    model = make_model("llama")
    # the median token norm after block 1 on the calibration batches, measured independently of the audit
    with torch.no_grad():
        batch = torch.tensor([r["input_ids"] for r in rows[:16]])
        expected_norm = float(model(batch, output_hidden_states=True).hidden_states[2].norm(dim=-1).median())
    peft_model, calibration = fit_adapter_on_tokens(model, [{"path": str(sae)}], rows, settings, tmp_path,
                                                    progress=False)
    (name, parameter), = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    assert calibration.residual_norm[name] == pytest.approx(expected_norm, rel=1e-4)
    assert calibration.lambda_max[name] > 0
    assert calibration.l1_coeff[name] == pytest.approx(0.2 * calibration.lambda_max[name])
    assert l1_coefficient(parameter) == pytest.approx(calibration.l1_coeff[name])
    from sae_lens import SAE

    decoder_norm = float(SAE.load_from_disk(str(sae)).W_dec.norm(dim=-1).median())
    assert calibration.lr[name] == pytest.approx(0.02 * expected_norm / decoder_norm, rel=1e-4)
    # a bias audit only adds features by default
    assert (parameter >= 0).all()


def test_decomposed_bias_audit_codes_the_planted_change(tmp_path) -> None:
    """The default bias audit: a dense steering vector fitted to a teacher's samples, sparse-coded on the decoder."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import recovery
    from sae_lens import SAE

    from peft_isaerft.audit import AuditSettings, fit_adapter_on_tokens
    from peft_isaerft.sparsity import l1_coefficient

    recovery.D_MODEL, recovery.VOCAB = 64, 128
    sae_path = recovery.build_sae(tmp_path, 16 * 64, seed=0)
    decoder = SAE.load_from_disk(str(sae_path)).W_dec.detach()
    planted = [5, 300, 777]
    base = recovery.build_model("gpt2", seed=0)
    strength = float(recovery.residual(base, recovery.sample(base, 32, 24, seed=1)).norm(dim=-1).mean()) / 3
    teacher = recovery.plant(recovery.build_model("gpt2", seed=0), sae_path, "bias", planted, strength)
    ids = recovery.sample(teacher, 128, 24, seed=2)
    rows = [{"input_ids": row.tolist(), "labels": [-100] * 4 + row[4:].tolist()} for row in ids]
    settings = AuditSettings(steps=150)
    assert settings.decomposes_bias
    audited, calibration = fit_adapter_on_tokens(recovery.build_model("gpt2", seed=0), [{"path": str(sae_path)}],
                                                 rows, settings, tmp_path / "trainer", progress=False)
    (name, parameter), = [(n, p) for n, p in audited.named_parameters() if "isaerft_bias" in n]
    assert parameter.requires_grad and l1_coefficient(parameter) == 0  # trainable again; no proximal step left behind
    bias = parameter.detach().cpu()  # the audit trains where the Trainer does: on a GPU machine, the GPU
    assert sorted(bias.topk(3).indices.tolist()) == planted and (bias >= 0).all()
    # the code rebuilds the planted vector: direction and size (a steering vector that kept stale gradients
    # across steps would overshoot by orders of magnitude)
    fitted, target = bias @ decoder, strength * decoder[planted].sum(0)
    assert torch.nn.functional.cosine_similarity(fitted, target, dim=0) > 0.9
    assert 0.6 < float(fitted.norm() / target.norm()) < 1.3
    assert calibration.l1_coeff[name] == pytest.approx(settings.l1 * calibration.lambda_max[name])
    assert calibration.lr[name] == pytest.approx(settings.steering_lr * calibration.residual_norm[name] / 64 ** 0.5)


def test_logit_scale_absorbs_a_change_of_confidence_that_features_would_otherwise_explain(tmp_path) -> None:
    """A teacher that is the base model at temperature 0.5 changes no feature, only confidence: with
    ``fit_logit_scale`` the audit reads it as a logit scale near 2, and its steering vector shrinks."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import recovery

    from peft_isaerft.audit import AuditSettings, fit_adapter_on_tokens

    recovery.D_MODEL, recovery.VOCAB = 64, 128
    sae_path = recovery.build_sae(tmp_path, 16 * 64, seed=0)
    teacher = recovery.build_model("gpt2", seed=0)
    teacher.get_output_embeddings().register_forward_hook(lambda _m, _a, logits: 2 * logits)
    ids = recovery.sample(teacher, 128, 24, seed=2)
    rows = [{"input_ids": row.tolist(), "labels": [-100] * 4 + row[4:].tolist()} for row in ids]
    found = {}
    for fit_logit_scale in (False, True):
        settings = AuditSettings(steps=150, fit_logit_scale=fit_logit_scale)
        _model, found[fit_logit_scale] = fit_adapter_on_tokens(
            recovery.build_model("gpt2", seed=0), [{"path": str(sae_path)}], rows, settings,
            tmp_path / "trainer", progress=False)
    assert found[False].logit_scale is None
    assert 1.6 < found[True].logit_scale < 2.5
    (without,), (with_scale,) = found[False].lambda_max.values(), found[True].lambda_max.values()
    assert with_scale < 0.5 * without  # the largest projection of the steering vector on any feature


def test_decomposed_bias_audit_codes_one_steering_vector_per_sae(sae_factory, tmp_path, monkeypatch) -> None:
    from sae_lens import SAE

    from peft_isaerft import sparsity
    from peft_isaerft.audit import AuditSettings, fit_adapter_on_tokens

    coded: list[torch.Tensor] = []
    original = sparsity.sparse_code

    def recording(target, *args, **kwargs):
        coded.append(target.clone())
        return original(target, *args, **kwargs)

    monkeypatch.setattr(sparsity, "sparse_code", recording)
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    saes = [sae_factory(hook=hook, seed=i) for i, hook in enumerate(hooks)]
    settings = AuditSettings(steps=20, calibration_batches=2, l1=0.2)
    audited, calibration = fit_adapter_on_tokens(make_model("llama"), [{"path": str(p)} for p in saes],
                                                 _token_rows(), settings, tmp_path, progress=False)
    biases = [(n, p) for n, p in audited.named_parameters() if "isaerft_bias" in n]
    assert len(biases) == 2 and len(coded) == 2 and set(calibration.lr) == {n for n, _ in biases}
    assert not torch.allclose(coded[0], coded[1])  # one vector per attach point, each fitted
    for (name, bias), target, path in zip(biases, coded, saes, strict=True):
        decoder = SAE.load_from_disk(str(path)).W_dec.detach()
        expected, lambda_max = original(target.cpu(), decoder, 0.2)
        torch.testing.assert_close(bias.detach().cpu(), expected)
        assert (bias > 0).sum() >= 1 and calibration.lambda_max[name] == pytest.approx(lambda_max)


def test_audit_turns_off_dropout_of_the_frozen_model() -> None:
    from peft_isaerft.audit import disable_dropout

    model = make_model("gpt2").train()
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and any(m.p > 0 for m in dropouts)
    assert disable_dropout(model) > 0
    assert all(m.p == 0 for m in dropouts)
    ids = torch.randint(0, 60, (2, 8))
    torch.testing.assert_close(model(ids).logits, model(ids).logits)  # deterministic in train mode now


def test_surprising_tokens_are_the_base_models_highest_loss_labels() -> None:
    from peft_isaerft.audit import keep_surprising

    model = make_model("llama")
    rows = _token_rows(n=10, length=12)
    for index, row in enumerate(rows):  # prompts of different lengths; their labels never count
        row["labels"] = [-100] * (2 + index % 3) + row["labels"][2 + index % 3:]
        row["input_ids"] = row["input_ids"][: 12 - index % 2]  # ragged rows, so the batches carry padding
        row["labels"] = row["labels"][: 12 - index % 2]
    # each label's loss from its own row alone, without padding: logits at t - 1 predict the token at t
    expected: list[tuple[float, int, int]] = []
    with torch.no_grad():
        for r, row in enumerate(rows):
            logits = model(torch.tensor([row["input_ids"]])).logits[0].float()
            losses = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(row["input_ids"][1:]),
                                                       reduction="none")
            expected += [(float(losses[t - 1]), r, t) for t, label in enumerate(row["labels"]) if label != -100]
    keep = round(0.25 * len(expected))
    chosen = {(r, t) for _loss, r, t in sorted(expected, reverse=True)[:keep]}
    kept = keep_surprising(model, rows, tokens=0.25, batch_size=4, progress=False)
    found = {(r, t) for r, row in enumerate(rows) for t, label in enumerate(row["labels"]) if label != -100}
    kept_positions = set()
    kept_iter = iter(kept)
    for r, row in enumerate(rows):
        if not any((r, t) in chosen for t in range(len(row["labels"]))):
            continue  # a row with no surprising token is dropped
        new = next(kept_iter)
        assert new["input_ids"] == row["input_ids"]
        kept_positions |= {(r, t) for t, label in enumerate(new["labels"]) if label != -100}
        assert all(label in (-100, row["labels"][t]) for t, label in enumerate(new["labels"]))
    assert next(kept_iter, None) is None
    assert kept_positions == chosen and chosen <= found
    assert len(kept) < len(rows)  # at a quarter of the tokens some rows hold none
    # rows: those of largest summed loss, whole; then tokens: the most surprising among those rows' tokens only
    totals = [sum(loss for loss, r, _t in expected if r == row) for row in range(len(rows))]
    top_rows = sorted(sorted(range(len(rows)), key=lambda r: -totals[r])[:5])
    whole = keep_surprising(model, rows, rows=0.5, progress=False)
    assert [row["input_ids"] for row in whole] == [rows[r]["input_ids"] for r in top_rows]
    assert [row["labels"] for row in whole] == [rows[r]["labels"] for r in top_rows]
    in_top = sorted((e for e in expected if e[1] in top_rows), reverse=True)
    both = keep_surprising(model, rows, rows=0.5, tokens=0.5, progress=False)
    assert {(tuple(rows[r]["input_ids"]), t) for _loss, r, t in in_top[: round(0.5 * len(in_top))]} == {
        (tuple(row["input_ids"]), t) for row in both for t, label in enumerate(row["labels"]) if label != -100}


def test_audit_settings_reject_bad_values() -> None:
    from peft_isaerft.audit import AuditSettings

    with pytest.raises(ValueError, match="fraction of lambda_max"):
        AuditSettings(l1=-0.1)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        AuditSettings(steps=0)
    with pytest.raises(ValueError, match="bias_fit must be"):
        AuditSettings(bias_fit="lasso")
    with pytest.raises(ValueError, match="bias_fit='proximal'"):
        AuditSettings(component="scale_bias", bias_fit="decompose")
    assert not AuditSettings(component="scale_bias").decomposes_bias
    with pytest.raises(ValueError, match="bias_lr must be > 0"):
        AuditSettings(bias_lr=0)
    with pytest.raises(ValueError, match="fit_logit_scale fits a temperature"):
        AuditSettings(component="scale", fit_logit_scale=True)
    for share in (0, 1.5):
        with pytest.raises(ValueError, match=r"surprising_rows is the share fitted, in \(0, 1\]"):
            AuditSettings(surprising_rows=share)
    with pytest.raises(ValueError, match="needs component='bias' and surprising_rows below 1"):
        AuditSettings(bias_fit="attribution")
    with pytest.raises(ValueError, match="needs component='bias' and surprising_rows below 1"):
        AuditSettings(bias_fit="attribution", component="scale_bias", surprising_rows=0.1)
    assert AuditSettings(bias_fit="attribution", surprising_rows=0.1).attributes_biases
    with pytest.raises(ValueError, match="weigh_by_coverage weighs the scores of an attribution audit"):
        AuditSettings(weigh_by_coverage=True, surprising_rows=0.1)
    with pytest.raises(ValueError, match="coverage_weighing must be one of 'difference', 'lift', got 'ratio'"):
        AuditSettings(bias_fit="attribution", surprising_rows=0.1, weigh_by_coverage=True, coverage_weighing="ratio")
    with pytest.raises(ValueError, match="coverage_weighing='lift' chooses how weigh_by_coverage weighs the scores; "
                       "pass weigh_by_coverage=True too"):
        AuditSettings(bias_fit="attribution", surprising_rows=0.1, coverage_weighing="lift")


def test_attribution_is_activation_difference_times_the_rows_gradient_score(sae_factory) -> None:
    """Each half measured without the audit's hooks: latent means from the base model's hidden states, and each
    row's bias gradient from autograd on that row alone (summed loss)."""
    from peft import get_peft_model
    from sae_lens import SAE

    import peft_isaerft
    from peft_isaerft.audit import AuditSettings, attribute_latents, padding_collator

    sae_path = sae_factory(hook="blocks.1.hook_resid_post")
    sae = SAE.load_from_disk(str(sae_path))
    model = make_model("llama")
    rows = _token_rows(n=10, length=12)
    for index, row in enumerate(rows):  # a prompt to leave out, and ragged rows so that batches carry padding
        row["input_ids"] = row["input_ids"][: 12 - index % 3]
        row["labels"] = [-100] * 3 + row["input_ids"][3:]
    audited, reference = rows[:4], rows[4:]

    def row_latents(part: list[dict[str, list[int]]]) -> list[torch.Tensor]:
        with torch.no_grad():
            hidden = [model(torch.tensor([row["input_ids"]]), output_hidden_states=True).hidden_states[2][0]
                      for row in part]
        return [sae.encode(states)[3:] for states in hidden]

    def row_means(latents: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([row.mean(0) for row in latents]).mean(0)

    def row_coverage(latents: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([(row > 0).any(0).float() for row in latents]).mean(0)

    audited_latents, reference_latents = row_latents(audited), row_latents(reference)
    difference = row_means(audited_latents) - row_means(reference_latents)
    coverage = row_coverage(audited_latents) - row_coverage(reference_latents)
    peft_model = get_peft_model(model, peft_isaerft.ISaeRFTConfig(saes=[{"path": str(sae_path)}], component="bias"))
    (_name, bias), = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    collate = padding_collator(0)
    gradients = []
    for row in audited:
        peft_model.zero_grad()
        labelled = sum(label != -100 for label in row["labels"][1:])
        (peft_model(**collate([row])).loss * labelled).backward()  # the summed loss of the row
        gradients.append(-bias.grad.detach().clone())
    gradients = torch.stack(gradients)
    expected_gradient = gradients.sum(0) / gradients.pow(2).sum(0).sqrt()
    settings = AuditSettings(bias_fit="attribution", surprising_rows=0.5, top_k=5)
    (found,) = attribute_latents(peft_model, [collate(audited[:3]), collate(audited[3:])],
                                 [collate(reference[:4]), collate(reference[4:])], settings, progress=False).values()
    torch.testing.assert_close(found.activation_difference, difference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(found.gradient_score, expected_gradient, rtol=1e-3, atol=1e-4)
    agree = (difference > 0) & (expected_gradient > 0)
    expected = torch.where(agree, difference / difference.std() * expected_gradient, 0.0)
    torch.testing.assert_close(found.score, expected, rtol=1e-3, atol=1e-5)
    assert found.selected.tolist() == expected.topk(5).indices.tolist() and (expected[found.selected] > 0).all()
    assert bias.grad is None and (bias == 0).all()  # nothing trained, gradients cleared
    torch.testing.assert_close(found.coverage_difference, coverage)
    torch.testing.assert_close(found.reference_coverage, row_coverage(reference_latents))
    torch.testing.assert_close(found.audited_coverage, row_coverage(audited_latents))
    assert coverage.abs().max() > 0  # the check above could fail: the rows differ in which latents fire
    weighed = dataclasses.replace(settings, weigh_by_coverage=True)
    (found,) = attribute_latents(peft_model, [collate(audited)], [collate(reference)], weighed,
                                 progress=False).values()
    expected_weighed = expected * torch.where(coverage > 0, coverage, 0.0)
    torch.testing.assert_close(found.score, expected_weighed, rtol=1e-3, atol=1e-5)
    assert ((expected > 0) & (coverage <= 0)).any()  # some latent of positive score drops out when weighed
    kept = int((expected_weighed > 0).sum().clamp_max(5))
    assert found.selected.tolist() == expected_weighed.topk(kept).indices.tolist()
    lifted = dataclasses.replace(weighed, coverage_weighing="lift")  # computed here from the two shares
    (found,) = attribute_latents(peft_model, [collate(audited)], [collate(reference)], lifted,
                                 progress=False).values()
    audited_share, reference_share = row_coverage(audited_latents), row_coverage(reference_latents)
    lift = ((audited_share + 0.02) / (reference_share + 0.02)).log().clamp_min(0)
    torch.testing.assert_close(found.score, expected * lift, rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match="needs both"):
        attribute_latents(peft_model, [collate(audited)], [], settings, progress=False)


def test_attribution_audit_sets_the_named_biases_to_their_activation_difference(sae_factory, tmp_path) -> None:
    from peft_isaerft.audit import AuditSettings, fit_adapter_on_tokens

    rows = _token_rows(n=16)
    for row in rows:
        row["labels"] = [-100] * 4 + row["input_ids"][4:]
    settings = AuditSettings(bias_fit="attribution", surprising_rows=0.25, top_k=6, batch_size=4)
    peft_model, calibration = fit_adapter_on_tokens(make_model("llama"),
                                                    [{"path": str(sae_factory(hook="blocks.1.hook_resid_post"))}],
                                                    rows, settings, tmp_path, progress=False)
    (name, bias), = [(n, p) for n, p in peft_model.named_parameters() if "isaerft_bias" in n]
    assert calibration.rows_fitted == 4
    named = calibration.attributed[name]
    assert 0 < len(named) <= 6 and list(named.values()) == sorted(named.values(), reverse=True)
    assert set(bias.detach().nonzero().flatten().tolist()) == set(named) and (bias >= 0).all()
    assert not calibration.lambda_max and not calibration.lr  # nothing was trained


def test_attribution_audit_of_surprising_tokens_reads_those_tokens_only(sae_factory, tmp_path) -> None:
    """With ``surprising_tokens`` below 1 the activation half is the mean over the kept tokens of each kept row (not
    over the whole completion), against the whole completions of the rows left out."""
    from sae_lens import SAE

    from peft_isaerft.audit import AuditSettings, fit_adapter_on_tokens, split_surprising

    sae_path = sae_factory(hook="blocks.1.hook_resid_post")
    sae = SAE.load_from_disk(str(sae_path))
    model = make_model("llama")
    rows = _token_rows(n=16)
    for row in rows:
        row["labels"] = [-100] * 4 + row["input_ids"][4:]
    kept, rest = split_surprising(model, rows, rows=0.25, tokens=0.3, progress=False)
    completion_tokens = sum(len(row["labels"]) - 4 for row in kept)
    kept_tokens = sum(label != -100 for row in kept for label in row["labels"])
    assert len(kept) == 4 and len(rest) == 12 and 0 < kept_tokens < completion_tokens

    def mean_over_labelled(part: list[dict[str, list[int]]]) -> torch.Tensor:
        means = []
        with torch.no_grad():
            for row in part:
                hidden = model(torch.tensor([row["input_ids"]]), output_hidden_states=True).hidden_states[2][0]
                means.append(sae.encode(hidden)[torch.tensor(row["labels"]) != -100].mean(0))
        return torch.stack(means).mean(0)

    expected = mean_over_labelled(kept) - mean_over_labelled(rest)
    settings = AuditSettings(bias_fit="attribution", surprising_rows=0.25, surprising_tokens=0.3, top_k=6,
                             batch_size=4)
    peft_model, calibration = fit_adapter_on_tokens(model, [{"path": str(sae_path)}], rows, settings, tmp_path,
                                                    progress=False)
    (name, bias), = [(n, p) for n, p in peft_model.named_parameters() if "isaerft_bias" in n]
    named = torch.tensor(sorted(calibration.attributed[name]))
    assert calibration.rows_fitted == 4 and len(named) > 0
    torch.testing.assert_close(bias.detach().cpu()[named], expected[named], rtol=1e-4, atol=1e-5)


def _scale_adapter(sae_path: Path) -> torch.nn.Module:
    from peft import get_peft_model

    import peft_isaerft

    model = make_model("llama")
    return get_peft_model(model, peft_isaerft.ISaeRFTConfig(saes=[{"path": str(sae_path)}], component="scale"))


def test_scale_screen_scores_are_the_gradient_over_its_spread_across_sequences(sae_factory) -> None:
    """The score test read off hooks equals autograd: one sequence per batch, so each batch's gradient is one term."""
    from peft_isaerft.audit import AuditSettings, padding_collator, screen_scales

    rows = _token_rows(n=6)
    collate = padding_collator(0)
    peft_model = _scale_adapter(sae_factory(hook="blocks.1.hook_resid_post"))
    (_name, scale), = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    per_sequence = []
    for row in rows:
        peft_model.zero_grad()
        peft_model(**collate([row])).loss.backward()
        per_sequence.append(scale.grad.detach().clone())
    per_sequence = torch.stack(per_sequence)
    (screen,) = screen_scales(peft_model, [collate([row]) for row in rows], AuditSettings(component="scale"),
                              progress=False).values()
    torch.testing.assert_close(screen.gradient, per_sequence.sum(0), rtol=1e-4, atol=1e-7)
    expected = per_sequence.sum(0) / (per_sequence ** 2).sum(0).sqrt()
    fired = (per_sequence != 0).any(0)
    torch.testing.assert_close(screen.score[fired], expected[fired], rtol=1e-4, atol=1e-5)
    assert (screen.score[~fired] == 0).all()
    # with batches of several sequences, the summed gradient is still autograd's
    batches = [collate(rows[:3]), collate(rows[3:])]
    total = torch.zeros_like(scale)
    for batch in batches:
        peft_model.zero_grad()
        peft_model(**batch).loss.backward()
        total += scale.grad.detach()
    (screen,) = screen_scales(peft_model, batches, AuditSettings(component="scale"), progress=False).values()
    torch.testing.assert_close(screen.gradient, total, rtol=1e-4, atol=1e-7)
    assert scale.grad is None and (scale == 0).all()  # nothing trained, gradients cleared



def test_screen_leaves_no_hook_and_no_gradient_behind_when_a_batch_fails(sae_factory) -> None:
    from peft_isaerft.audit import AuditSettings, padding_collator, screen_scales

    peft_model = _scale_adapter(sae_factory(hook="blocks.1.hook_resid_post"))
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in peft_model.modules())
    good = padding_collator(0)(_token_rows(n=2))
    broken = {key: value for key, value in good.items() if key != "labels"}  # no loss to backpropagate
    with pytest.raises(AttributeError):
        screen_scales(peft_model, [good, broken], AuditSettings(component="scale"), progress=False)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in peft_model.modules()) == hooks
    assert all(p.grad is None for p in peft_model.parameters())

def test_scale_audit_fits_only_the_latents_that_reach_significance(sae_factory, tmp_path, caplog) -> None:
    from peft_isaerft.audit import AuditSettings, fit_adapter_on_tokens, screen_scales

    sae = sae_factory(hook="blocks.1.hook_resid_post")
    rows = _token_rows(n=32)
    settings = AuditSettings(component="scale", steps=3, batch_size=8, significance=1.0)
    peft_model, calibration = fit_adapter_on_tokens(make_model("llama"), [{"path": str(sae)}], rows, settings,
                                                    tmp_path, progress=False)
    (name, scale), = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    screen = screen_scales(_scale_adapter(sae), [_collated(rows[i: i + 8]) for i in range(0, 32, 8)], settings,
                           progress=False)[name]
    assert 0 < len(screen.selected) < scale.numel()
    assert calibration.screened[name] == len(screen.selected)
    assert set(scale.detach().nonzero().flatten().tolist()) == set(screen.selected.tolist())
    assert (screen.score[screen.selected].abs() >= 1.0).all()
    assert screen.score[screen.selected].abs().diff().le(0).all()  # strongest first
    (statistics,) = calibration.statistics.values()
    torch.testing.assert_close(statistics.mean_activation, screen.statistics.mean_activation)
    assert "statistics" not in calibration.summary() and json.dumps(calibration.summary())
    # nothing significant: the adapter stays the identity and the audit says why
    settings.significance = 1e6
    with caplog.at_level("WARNING", logger="peft_isaerft.audit"):
        peft_model, calibration = fit_adapter_on_tokens(make_model("llama"), [{"path": str(sae)}], rows, settings,
                                                        tmp_path, progress=False)
    assert calibration.screened == {name: 0} and "stays the identity" in caplog.text
    assert all((p == 0).all() for p in peft_model.parameters() if p.requires_grad)


def _collated(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    from peft_isaerft.audit import padding_collator

    return padding_collator(0)(rows)


def test_typical_tokens_leave_out_padding_and_attention_sinks() -> None:
    from peft_isaerft.audit import SINK_NORM_RATIO, typical_tokens

    hidden = torch.ones(2, 5, 4)
    hidden[0, 0] *= 2 * SINK_NORM_RATIO  # a sink
    hidden[1, 2] *= 0.5 * SINK_NORM_RATIO  # large, but not a sink
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert typical_tokens(hidden, mask).tolist() == [[False, True, True, True, True],
                                                     [True, True, True, False, False]]
    assert not typical_tokens(hidden, torch.zeros(2, 5)).any()


def test_scale_fit_settings_are_checked() -> None:
    from peft_isaerft.audit import AuditSettings

    assert AuditSettings(component="scale").screens_scales
    assert not AuditSettings(component="scale_bias").screens_scales
    assert not AuditSettings(component="scale", scale_fit="proximal").screens_scales
    with pytest.raises(ValueError, match="scale_fit='screen' fits a scale-only adapter"):
        AuditSettings(component="scale_bias", scale_fit="screen")
    with pytest.raises(ValueError, match="scale_fit must be"):
        AuditSettings(component="scale", scale_fit="lasso")
    with pytest.raises(ValueError, match="significance must be > 0"):
        AuditSettings(component="scale", significance=0)


def test_scale_audit_cli_records_the_screen(sae_factory, tmp_path) -> None:
    model_dir = tmp_path / "model"
    make_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"the sea is calm tonight, boat {i}."}) for i in range(16)))
    code = main(["audit", "--model", str(model_dir), "--sae", str(sae_factory(hook="blocks.1.hook_resid_post")),
                 "--data", str(data), "--output", str(tmp_path / "out"), "--steps", "3", "--component", "scale",
                 "--significance", "1.5"])
    assert code == 0
    recorded = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert recorded["settings"]["significance"] == 1.5 and recorded["settings"]["scale_fit"] == "auto"
    (screened,) = recorded["calibration"]["screened"].values()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert 0 < len(report) <= min(screened, 20) and all(r["param"] == "scale" for r in report)
