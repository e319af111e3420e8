"""Reading a fine-tune: reports, labels, tracking, diffs, renderings, model cards and the CLI."""

from __future__ import annotations

import gzip
import html
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch
from conftest import make_model
from peft import get_peft_model
from transformers import Trainer, TrainerCallback

from peft_isaerft import ISaeRFTConfig, LatentTrackingCallback, SAEReference, diff_adapters, feature_report, render
from peft_isaerft.cli import main
from peft_isaerft.interpret.activations import latent_statistics
from peft_isaerft.interpret.labels import fetch_neuronpedia_labels, load_neuronpedia_export
from peft_isaerft.saes import decoder_directions


class CharTokenizer:
    """A real-enough tokenizer for tiny models: one token per character."""

    pad_token = "\0"
    eos_token = "\0"

    def __call__(self, texts, return_tensors="pt", padding=True, truncation=True, max_length=64):
        ids = [[3 + (ord(c) % 60) for c in text[:max_length]] for text in texts]
        width = max(map(len, ids))
        mask = [[1] * len(row) + [0] * (width - len(row)) for row in ids]
        ids = [row + [0] * (width - len(row)) for row in ids]
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}

    def decode(self, ids):
        return "".join(chr(ord("a") + (i - 3) % 26) for i in ids)


@pytest.fixture
def adapter(sae_factory, tmp_path):
    saes = [
        {"path": str(sae_factory(hook="blocks.1.hook_resid_post", seed=0))},
        {"path": str(sae_factory(hook="blocks.2.hook_mlp_out", seed=1))},
    ]
    model = get_peft_model(make_model("llama"), ISaeRFTConfig(saes=saes, component="scale_bias"))
    with torch.no_grad():
        layer = model.base_model.model.model.layers[1]
        layer.isaerft_bias["default"][[3, 7]] = torch.tensor([2.0, -0.5])
        layer.isaerft_scale["default"][[10]] = 1.5
        model.base_model.model.model.layers[2].mlp.isaerft_bias["default"][5] = 0.25
    model.save_pretrained(tmp_path / "adapter")
    return model, tmp_path / "adapter"


def test_report_from_model_and_from_folder_agree_and_are_sorted(adapter) -> None:
    model, folder = adapter
    from_model = feature_report(model, top_k=10)
    from_folder = feature_report(folder, top_k=10)
    assert [(r.hook, r.latent, r.param) for r in from_model] == [(r.hook, r.latent, r.param) for r in from_folder]
    assert len(from_model) == 4
    assert [r.effect for r in from_model] == sorted((r.effect for r in from_model), reverse=True)
    top = from_model[0]
    sae = model.base_model.model.model.layers[1].isaerft_splices["default"].sae
    norm = float(decoder_directions(sae)[top.latent].norm())
    assert top.param in {"bias", "scale"} and top.value != 0
    expected_effect = abs(top.value) * norm
    assert top.effect == pytest.approx(expected_effect, rel=1e-5)
    assert {r.hook for r in from_model} == {"blocks.1.hook_resid_post", "blocks.2.hook_mlp_out"}


def test_data_weights_scales_and_gives_contexts(adapter) -> None:
    model, _ = adapter
    texts = ["the quick brown fox jumps", "over the lazy dog", "pack my box with five dozen jugs"]
    records = feature_report(model, top_k=10, texts=texts, tokenizer=CharTokenizer())
    scale = next(r for r in records if r.param == "scale")
    assert scale.context is not None and "[[" in scale.context
    assert scale.label.startswith("fires on:")
    # several contexts, strongest first, each a different firing token, the first being `context`
    assert 2 <= len(scale.contexts) <= 3 and scale.contexts[0] == scale.context
    assert all(c.count("[[") == 1 for c in scale.contexts) and len(set(scale.contexts)) == len(scale.contexts)
    # the shorter texts' padding reads as nothing in contexts (positions kept)
    statistics = next(iter(latent_statistics(model, CharTokenizer(), texts, progress=False).values()))
    assert statistics.tokens[1][-1] == "" and not any("\0" in t for row in statistics.tokens for t in row)
    page = render(records, "html")
    assert "more top contexts" in page and html.escape(scale.contexts[1]) in page
    plain = next(r for r in feature_report(model, top_k=10) if r.param == "scale")
    assert scale.effect != pytest.approx(plain.effect)


def test_latent_statistics_read_the_base_model_and_stop_after_the_last_splice(adapter) -> None:
    model, _ = adapter
    texts = ["the quick brown fox jumps", "over the lazy dog", "pack my box with five dozen jugs"]
    later = []  # the layers after the last splice and the head cannot change what is read, so they do not run
    hooks = [module.register_forward_hook(lambda *_: later.append(1))
             for module in (model.base_model.model.model.norm, model.get_output_embeddings())]
    try:
        statistics = latent_statistics(model, CharTokenizer(), texts, progress=False, batch_size=2)
    finally:
        for hook in hooks:
            hook.remove()
    assert not later
    # the splice after block 1, recomputed from the base model's hidden states, padding left out
    encoded = CharTokenizer()(texts)
    with torch.no_grad(), model.disable_adapter():
        hidden = model(**encoded, output_hidden_states=True).hidden_states[2]
    sae = model.base_model.model.model.layers[1].isaerft_splices["default"].sae
    latents = sae.encode(hidden[encoded["attention_mask"].bool()])
    read = statistics["model.layers.1"]
    assert torch.allclose(read.mean_activation, latents.mean(0), atol=1e-5)
    assert torch.allclose(read.firing_rate, (latents > 0).float().mean(0))
    assert torch.allclose(read.top_values[:, 0], latents.max(0).values.clamp_min(0), atol=1e-5)
    assert set(statistics) == {"model.layers.1", "model.layers.2.mlp"}


def test_labels_from_neuronpedia_export(tmp_path) -> None:
    export = tmp_path / "explanations.jsonl.gz"
    with gzip.open(export, "wt") as handle:
        handle.write(
            json.dumps(
                {
                    "modelId": "gemma-2-2b",
                    "layer": "20-gemmascope-res-16k",
                    "index": "12",
                    "description": "references to the sea",
                }
            )
            + "\n"
        )
    labels = load_neuronpedia_export(export)
    assert labels == {("gemma-2-2b/20-gemmascope-res-16k", 12): "references to the sea"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"foo": 1}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        load_neuronpedia_export(bad)


def test_neuronpedia_fetch_against_local_server_with_disk_cache(tmp_path) -> None:
    requests = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            index = int(self.path.rsplit("/", 1)[1])
            if index == 99:
                self.send_response(500)
                self.end_headers()
                return
            body = json.dumps(
                {"modelId": "gemma-2-2b", "index": str(index), "explanations": [{"description": f" feature {index} "}]}
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        reference = SAEReference.from_dict(
            {"release": "gemma-scope-2b-pt-res-canonical", "sae_id": "layer_20/width_16k/canonical"}
        )
        url = f"http://127.0.0.1:{server.server_address[1]}"
        labels = fetch_neuronpedia_labels(reference, [1, 2, 99], base_url=url, cache_dir=tmp_path, timeout=5)
        assert labels == {
            ("gemma-2-2b/20-gemmascope-res-16k", 1): "feature 1",
            ("gemma-2-2b/20-gemmascope-res-16k", 2): "feature 2",
        }
        assert requests == [
            "/api/feature/gemma-2-2b/20-gemmascope-res-16k/1",
            "/api/feature/gemma-2-2b/20-gemmascope-res-16k/2",
            "/api/feature/gemma-2-2b/20-gemmascope-res-16k/99",
        ]
        again = fetch_neuronpedia_labels(reference, [1, 2], base_url=url, cache_dir=tmp_path, timeout=5)
        assert again == labels and len(requests) == 3  # served from the disk cache
    finally:
        server.shutdown()


def test_tracking_callback_logs_compactly_and_writes_history(sae_factory, tmp_path) -> None:
    from test_training import _args, _dataset

    saes = [{"path": str(sae_factory(hook="blocks.1.hook_resid_post"))}]
    model = get_peft_model(make_model("llama"), ISaeRFTConfig(saes=saes, component="bias"))
    callback = LatentTrackingCallback(top_k=5)
    args = _args(tmp_path / "run", max_steps=3)
    trainer = Trainer(model=model, args=args, train_dataset=_dataset())
    callback.attach(trainer)
    seen_by_later_callbacks = []
    trainer.add_callback(
        type(
            "Spy",
            (TrainerCallback,),
            {"on_log": lambda self, args, state, control, logs=None, **kw: seen_by_later_callbacks.append(dict(logs))},
        )()
    )
    trainer.train()
    assert all("isaerft/top_0" in logs for logs in seen_by_later_callbacks if "loss" in logs)
    logged = [entry for entry in trainer.state.log_history if "isaerft/nonzero" in entry]
    assert len(logged) >= 3
    assert all(len([k for k in entry if k.startswith("isaerft/top_")]) == 5 for entry in logged)
    history = json.loads((tmp_path / "run" / "isaerft_history.json").read_text())
    assert history["steps"] == [1, 2, 3] and 5 <= len(history["latents"])
    from peft_isaerft.interpret import plot_trajectories

    assert plot_trajectories(history)[:4] == b"\x89PNG"


def test_diff_of_two_adapters(adapter, sae_factory, tmp_path) -> None:
    model, folder = adapter
    with torch.no_grad():
        layer = model.base_model.model.model.layers[1]
        layer.isaerft_bias["default"][3] = 0.0
        layer.isaerft_bias["default"][20] = 1.0
    model.save_pretrained(tmp_path / "other")
    result = diff_adapters(folder, tmp_path / "other", top_k=2)
    key = "blocks.1.hook_resid_post|bias"
    assert result.shared[key] == [7] and result.only_a[key] == [3] and result.only_b[key] == [20]
    assert result.overlap[key] == 0.5
    assert {d["latent"] for d in result.largest_differences[:2]} == {3, 20}


@pytest.mark.parametrize("fmt", ["table", "json", "csv", "md", "html"])
def test_render_formats(adapter, fmt) -> None:
    records = feature_report(adapter[0], top_k=5)
    text = render(records, fmt)
    if fmt == "json":
        assert [r["latent"] for r in json.loads(text)] == [r.latent for r in records]
    elif fmt == "html":
        assert text.startswith("<!doctype html>") and "data:image/png;base64," in text
        assert 'src="http' not in text  # self-contained
    else:
        assert str(records[0].latent) in text
    with pytest.raises(ValueError, match="Unknown report format"):
        render(records, "pdf")


def test_model_card_names_saes_and_top_features(adapter) -> None:
    card = (adapter[1] / "README.md").read_text()
    assert "library_name: peft" in card and "## ISaeRFT adapter" in card
    assert "| blocks.1.hook_resid_post | 3 | bias |" in card


def test_cli_report_and_diff(adapter, tmp_path, capsys) -> None:
    _, folder = adapter
    assert main(["report", str(folder), "--top-k", "3", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3 and rows[0]["effect"] >= rows[-1]["effect"]
    assert main(["report", str(folder), "--format", "html", "--output", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").read_text().startswith("<!doctype html>")
    assert main(["diff", str(folder), str(folder), "--top-k", "3"]) == 0
    assert "overlap 1.00" in capsys.readouterr().out
