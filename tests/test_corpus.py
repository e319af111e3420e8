"""The demo's offline text: WordNet's glosses as a second SAE corpus, and how the demo's SAE is routed to it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from peft_isaerft.demo import DemoSettings, corpus, demo_sae, sae_training

LICENCE = "  1 This software and database is being provided to you, the LICENSEE, by Princeton University | x\n"


def _wordnet(folder: Path) -> Path:
    """Two of WordNet's data files in its own format: licence lines open with two spaces, a gloss follows ' | '."""
    folder.mkdir()
    (folder / "data.noun").write_text(
        LICENCE + '02084071 05 n 03 dog 0 domestic_dog 0 | a member of the genus Canis; "the dog barked all night"\n'
        "02121620 05 n 02 cat 0 true_cat 0 | feline mammal usually having thick soft fur  \n")
    (folder / "data.verb").write_text(LICENCE + "01170052 34 v 01 eat 0 | take in solid food\n")
    return folder


def test_wordnet_glosses_skip_the_licence_and_join_shuffled_glosses(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(corpus, "WORDNET_DIR", _wordnet(tmp_path / "wordnet"))
    texts = corpus.wordnet_glosses(per_text=2)
    glosses = ['a member of the genus Canis; "the dog barked all night"',
               "feline mammal usually having thick soft fur", "take in solid food"]
    assert len(texts) == 2 and sum(map(len, texts)) == sum(map(len, glosses)) + len("; ")  # two joined, one alone
    assert all(sum(text.count(gloss) for text in texts) == 1 for gloss in glosses)
    assert not any("LICENSEE" in text for text in texts)
    assert corpus.wordnet_glosses(per_text=2) == texts  # seeded: the same texts every time
    monkeypatch.setattr(corpus, "WORDNET_DIR", tmp_path / "missing")
    assert corpus.wordnet_glosses() == []


def test_interleave_alternates_then_keeps_the_rest() -> None:
    assert corpus.interleave(["a", "b", "c"], ["x"]) == ["a", "x", "b", "c"]
    assert corpus.interleave(["a"], ["x", "y"]) == ["a", "x", "y"]
    assert corpus.interleave([], ["x"]) == ["x"]


def test_sae_corpus_is_checked_and_changed_only_on_a_copy() -> None:
    with pytest.raises(ValueError, match="sae_corpus must be one of corpus, wordnet, got 'wiki'"):
        DemoSettings(sae_corpus="wiki")
    settings = DemoSettings()
    wordnet = settings.with_sae(corpus="wordnet")
    assert wordnet.sae_corpus == "wordnet" and settings.sae_corpus == "corpus"
    assert wordnet.sae_tokens == settings.sae_tokens and settings.with_sae() == settings


def test_a_wordnet_sae_trains_on_the_interleaved_texts_in_a_folder_of_its_own(tmp_path, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(sae_training, "train_or_load_demo_sae",
                        lambda base, tokenizer, texts, hook, folder, **kwargs: calls.append((texts, folder)))
    monkeypatch.setattr(corpus, "WORDNET_DIR", _wordnet(tmp_path / "wordnet"))
    base = SimpleNamespace(config=SimpleNamespace(hidden_size=8))
    texts = [f"text {i}" for i in range(5)]
    settings = DemoSettings(label_texts=2)
    demo_sae(base, None, "model", settings, texts)
    demo_sae(base, None, "model", settings.with_sae(corpus="wordnet"), texts)
    (plain, plain_folder), (mixed, mixed_folder) = calls
    assert plain == texts[2:] and mixed == corpus.interleave(texts[2:], corpus.wordnet_glosses())
    assert mixed_folder.name == plain_folder.name + "-wordnet"
    monkeypatch.setattr(corpus, "WORDNET_DIR", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="apt-get install wordnet-base"):
        demo_sae(base, None, "model", settings.with_sae(corpus="wordnet"), texts)
