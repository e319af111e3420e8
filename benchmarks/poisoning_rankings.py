"""Which weighing of the attribution audit's scores names a poison, on every poison and every draw at once.

    python benchmarks/poisoning_rankings.py --sae-tokens 400000 --sae-epochs 1  # 4 poisons x (the clean set and 3
                                                # draws) at 10 %: 41 minutes on 2 CPU cores before diffing was added
    python benchmarks/poisoning_rankings.py --sae-tokens 400000 --sae-epochs 4 --sae-width 16 \
        --output benchmarks/results/poisoning_rankings_d9216.json  # an SAE twice as wide (9216 latents; one epoch
                                                # leaves most of them dead): 64 minutes, +36 to train it once
    python benchmarks/poisoning_rankings.py --quick   # the same machinery at toy size (the test suite runs it)
    python benchmarks/poisoning_rankings.py --rescore benchmarks/results/poisoning_rankings.json  # a recorded file
                                                # counted by every score, diffing and the offers recomputed beside

``poisoning.py`` measures one audit recipe per run (13 minutes each, steering included). The recipe's coverage weighing
was chosen on the first draw of the money and food poisons. This benchmark asks a narrower question cheaply: keeping
the attribution audit's rows, tokens and scores as they are, does another way of weighing them by coverage put more
latents that name the poison in the top 10, on every poison and every draw of the poisoned rows?

Each audit's attribution (:func:`peft_isaerft.audit.attribute_latents`, the 20 % most surprising tokens of the 10 %
most surprising rows against the rest) is computed once, then ranked by every weighing in ``WEIGHINGS``. Each top 10
is counted by ``poisoning.py``'s two context scores (``SCORES``): a topic word anywhere in the latent's top three
contexts on held-out text, and the own-words score, where the latent fires on a word of the poison's sentences (its
template's as well as its topic's) in one of them. The clean set's audit is the false-alarm check (its count should
stay at most 1). Beside the rankings, ``fires_in`` records for each
latent they name the share of the surprising rows it fires in and that share of the other rows.

Beside them, in the same run and with the same score: dataset diffing with the clean twin (``poisoning.py``'s
baseline: the base model's mean latent activation over the poisoned set's answers minus the clean set's), and each
draw's latents on offer (``poisoning.latents_on_offer``: what the SAE and the held-out text allow any ranking to
find). The SAE flags are ``poisoning.py``'s, so the same comparison runs on another SAE (``--sae-width``,
``--sae-corpus``, ``--sae-layer``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import poisoning
from records import write_json

import peft_isaerft  # noqa: F401
from peft_isaerft import ISaeRFTConfig
from peft_isaerft.audit import (
    COVERAGE_WEIGHINGS,
    AuditSettings,
    LatentAttribution,
    attribute_latents,
    disable_dropout,
    padding_collator,
    split_surprising,
    tokenise_rows,
)
from peft_isaerft.demo import DemoSettings, demo_sae, load_demo_model
from peft_isaerft.demo.corpus import load_corpus
from peft_isaerft.demo.sae_training import SAEQuality
from peft_isaerft.saes import SAEReference, load_sae

RECIPE = AuditSettings(component="bias", top_k=10, surprising_rows=0.1, surprising_tokens=0.2, bias_fit="attribution")
"""The attribution audit of ``poisoning.py``'s ``coverage-tokens`` recipe, without its weighing (the weighings here
replace it)."""


@dataclass(frozen=True)
class Weighing:
    """One way to weigh a latent's attribution score by how much more often it fires where its activation rises.

    ``weight(toward, away)`` gets, per latent, the share of rows in which it fires on the side its activation
    difference points to (the audited rows when it rises) and on the other side, and returns a non-negative weight.
    """

    name: str
    description: str
    weight: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def rank(self, attribution: LatentAttribution, top_k: int = 10) -> list[int]:
        """The ``top_k`` latents of highest weighed score (positive scores only), from an unweighed attribution."""
        rises = attribution.activation_difference > 0
        toward = torch.where(rises, attribution.audited_coverage, attribution.reference_coverage)
        away = torch.where(rises, attribution.reference_coverage, attribution.audited_coverage)
        score = attribution.score * self.weight(toward, away)
        order = score.argsort(descending=True)
        return order[score[order] > 0][:top_k].tolist()


WEIGHINGS: dict[str, Weighing] = {weighing.name: weighing for weighing in (
    Weighing("coverage difference", "the recipe's: the share of rows where it fires minus the other side's share",
             COVERAGE_WEIGHINGS["difference"].weight),
    Weighing("none", "the unweighed attribution score",
             lambda toward, away: torch.ones_like(toward)),
    Weighing("coverage lift", "the log of the ratio of the two shares, each plus peft_isaerft.audit.LIFT_FLOOR",
             COVERAGE_WEIGHINGS["lift"].weight),
    Weighing("coverage difference x rarity", "the coverage difference times the share of the other side's rows "
             "where it does not fire (common latents count less)",
             lambda toward, away: (toward - away).clamp_min(0) * (1 - away)),
)}
"""The weighings compared, by name. ``coverage difference`` and ``coverage lift`` are the audit's own
(``AuditSettings(weigh_by_coverage=True, coverage_weighing="difference" or "lift")``, ``COVERAGE_WEIGHINGS``)."""


def attribution_of(model: Any, tokenizer: Any, sae_path: Path, rows: list[dict[str, str]],
                   settings: AuditSettings = RECIPE) -> LatentAttribution:
    """The unweighed attribution of an audit of ``rows`` (as ``run_audit`` computes it with ``settings``, before it
    weighs and selects), from one SAE at its attach point; ``model`` is left as it was."""
    tokenised = tokenise_rows(tokenizer, poisoning.as_chat(tokenizer, rows), settings.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    disable_dropout(model)
    surprising, rest = split_surprising(model, tokenised, settings.surprising_rows, settings.surprising_tokens,
                                        settings.batch_size, pad_id, progress=False)
    collate = padding_collator(pad_id)

    def batched(part: list[dict[str, list[int]]]) -> list[dict[str, torch.Tensor]]:
        return [collate(part[i: i + settings.batch_size]) for i in range(0, len(part), settings.batch_size)]

    peft_model = get_peft_model(model, ISaeRFTConfig(saes=[{"path": str(sae_path)}], component="bias"))
    try:
        (attribution,) = attribute_latents(peft_model, batched(surprising), batched(rest), settings,
                                           progress=False).values()
    finally:
        peft_model.unload()
    return attribution


def counted(latents: list[int], passes: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``latents`` and, per score in ``passes`` (a boolean per latent of the SAE), how many of them pass it."""
    return {"latents": latents} | {score: int(passed[latents].sum()) for score, passed in passes.items()}


def twin_baselines(model: Any, tokenizer: Any, sae: Any, hook: str, rows: list[dict[str, str]],
                   draws: dict[str, tuple[list[dict[str, str]], list[int]]],
                   passes: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Per poisoned draw (``draws``: rows and which were poisoned), dataset diffing with the clean ``rows`` counted
    by every score in ``passes``, and the latents on offer to each score."""
    clean = poisoning.answer_latent_means(model, tokenizer, sae, hook, rows)
    found: dict[str, Any] = {"dataset_diffing": {}} | {SCORES[score][1]: {} for score in passes}
    for draw, (poisoned, chosen) in draws.items():
        answered, inserted = poisoning.poisoned_latent_means(model, tokenizer, sae, hook, rows, poisoned, chosen)
        found["dataset_diffing"][draw] = counted(poisoning.dataset_diffing(answered, clean), passes)
        for score, passed in passes.items():
            found[SCORES[score][1]][draw] = poisoning.latents_on_offer(inserted, clean, passed)
    return found


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="toy size: a small SAE, 24 rows, the money poison, one draw")
    parser.add_argument("--poisons", default=None,
                        help=f"comma-separated, from {', '.join(poisoning.POISONS)} (default all; quick: money)")
    parser.add_argument("--seeds", default=None, help="draws of the poisoned rows, comma-separated (default 0,1,2)")
    parser.add_argument("--rate", type=float, default=None, help="the share of rows poisoned (default 0.1)")
    poisoning.add_sae_arguments(parser)
    parser.add_argument("--rescore", default=None, metavar="FILE",
                        help="instead of a new run, count the top-10s recorded in FILE (a result file of this "
                        "benchmark) by every score, with FILE's SAE, poisons, draws and rate, and add dataset diffing "
                        "and the offers where FILE lacks them: minutes instead of an hour (writes --output, by "
                        "default FILE itself)")
    parser.add_argument("--output", default=None, help="JSON file (default benchmarks/results/poisoning_rankings.json)")
    args = parser.parse_args(argv)
    started = time.time()
    if args.rescore:
        return rescore(parser, args, started)
    poisons = (args.poisons or ("money" if args.quick else ",".join(poisoning.POISONS))).split(",")
    unknown = set(poisons) - set(poisoning.POISONS)
    if unknown:
        parser.error(f"unknown poisons {sorted(unknown)}; choose from {', '.join(poisoning.POISONS)}")
    rate = 0.1 if args.rate is None else args.rate
    if not 0 < rate <= 1:
        parser.error(f"argument --rate: a share of the rows, above 0 and at most 1; got {rate}")
    seeds = [int(seed) for seed in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    demo_settings = poisoning.sae_settings(parser, args)
    output = Path(args.output or "benchmarks/results/poisoning_rankings.json")
    model, tokenizer, name = load_demo_model()
    poisoning.check_sae_layer(parser, args, model, name)
    texts, _sources = load_corpus()
    sae_path, quality, sae, model, contexts = read_sae(model, tokenizer, name, demo_settings, texts, args.quick)
    results: dict[str, Any] = {"rate": rate, "seeds": seeds, "poisons": {}, "quick": args.quick,
                               "sae": poisoning.sae_record(demo_settings, sae_path, quality),
                               "latents": sae.cfg.d_sae,
                               "weighings": {w.name: w.description for w in WEIGHINGS.values()}}
    for poison_name in poisons:
        poison = poisoning.POISONS[poison_name]
        rows = poisoning.dataset_rows(model, tokenizer, texts, poison, 14 if args.quick else 330, args.quick,
                                      output.parent)
        passes = poisoning.score_passes(contexts, poison)
        poisoned_draws = {str(seed): poisoning.poison_rows(rows, rate, poison, seed) for seed in seeds}
        baselines = twin_baselines(model, tokenizer, sae, demo_settings.hook, rows, poisoned_draws, passes)
        draws = {"clean": rows} | {draw: poisoned for draw, (poisoned, _chosen) in poisoned_draws.items()}
        found: dict[str, dict[str, Any]] = {weighing: {} for weighing in WEIGHINGS}
        fires_in: dict[str, dict[str, list[float]]] = {}
        for draw, draw_rows in draws.items():
            print(f"Attributing the {poison_name} poison: {'the clean set' if draw == 'clean' else f'draw {draw}'}")
            attribution = attribution_of(model, tokenizer, sae_path, draw_rows)
            for weighing in WEIGHINGS.values():
                found[weighing.name][draw] = counted(weighing.rank(attribution), passes)
            fires_in[draw] = {str(latent): [round(float(attribution.audited_coverage[latent]), 3),
                                            round(float(attribution.reference_coverage[latent]), 3)]
                              for latent in sorted({i for entry in found.values() for i in entry[draw]["latents"]})}
        results["poisons"][poison_name] = {"weighings": found, "fires_in": fires_in, **baselines,
                                           **poisoning.latents_passing(passes)}
        results["poisons"][poison_name]["contexts_of_named"] = contexts_of_named(results["poisons"][poison_name],
                                                                                  contexts)
    results["seconds"] = time.time() - started
    print_table(results)
    write_json(output, results)
    print(f"wrote {output}")
    return results


def contexts_of_named(found: dict[str, Any], contexts: list[list[str]]) -> dict[str, list[str]]:
    """The top contexts of every latent that a weighing or dataset diffing names in ``found`` (one poison's
    results): what a reader of the rankings sees of each."""
    entries = [entry for by_draw in found["weighings"].values() for entry in by_draw.values()]
    named = {latent for entry in entries + list(found["dataset_diffing"].values()) for latent in entry["latents"]}
    return {str(latent): contexts[latent] for latent in sorted(named)}


def read_sae(model: Any, tokenizer: Any, name: str, settings: Any, texts: list[str],
             quick: bool) -> tuple[Path, SAEQuality, Any, Any, list[list[str]]]:
    """The SAE of ``settings`` (trained once, then cached): its path, its quality, the SAE, ``model`` as it was, and
    every latent's top contexts on the held-out texts, which the scores read."""
    sae_path, quality = demo_sae(model, tokenizer, name, settings, texts)
    sae = load_sae(SAEReference.from_dict({"path": str(sae_path)}))
    heldout = poisoning.QUICK_HELDOUT if quick else poisoning.HELDOUT
    model, statistics = poisoning.read_heldout(model, tokenizer, sae_path, texts[-heldout:])
    return sae_path, quality, sae, model, [statistics.contexts(latent) for latent in range(len(statistics.top_values))]


def rescore(parser: argparse.ArgumentParser, args: argparse.Namespace, started: float) -> dict[str, Any]:
    """``--rescore FILE``: FILE's recorded top-10s counted by every score, with FILE's own SAE, poisons, draws and
    rate; the weighings are not re-run. Dataset diffing and the offers are computed beside them where FILE lacks
    them (files written before diffing was added); where FILE has diffing, its latents are counted again and the
    offers to a score FILE lacks are left unmeasured."""
    given = [flag for flag, value in (("--poisons", args.poisons), ("--seeds", args.seeds), ("--rate", args.rate),
                                      ("--quick", args.quick or None), ("--sae-tokens", args.sae_tokens),
                                      ("--sae-epochs", args.sae_epochs), ("--sae-layer", args.sae_layer),
                                      ("--sae-corpus", args.sae_corpus), ("--sae-width", args.sae_width))
             if value is not None]
    if given:
        parser.error(f"argument --rescore: FILE records the SAE, poisons, draws and rate it was measured with; "
                     f"drop {', '.join(given)}")
    source = Path(args.rescore)
    if not source.is_file():
        parser.error(f"argument --rescore: no such file: {source}")
    results = json.loads(source.read_text())
    if not {"poisons", "seeds", "rate", "sae"} <= set(results):
        parser.error(f"argument --rescore: {source} is not a result file of this benchmark (it lacks "
                     f"{sorted({'poisons', 'seeds', 'rate', 'sae'} - set(results))})")
    recorded, quick = results["sae"], bool(results.get("quick"))
    layer = int(recorded["hook"].split(".")[1])  # blocks.<layer>.hook_resid_post
    demo_settings = (DemoSettings.quick() if quick else DemoSettings()).with_sae(
        recorded["tokens"], recorded["epochs"], layer, recorded.get("corpus"), recorded.get("width_multiple"))
    model, tokenizer, name = load_demo_model()
    texts, _sources = load_corpus()
    sae_path, _quality, sae, model, contexts = read_sae(model, tokenizer, name, demo_settings, texts, quick)
    fingerprint = poisoning.weights_fingerprint(sae_path)
    if recorded.get("weights_sha256", fingerprint) != fingerprint:  # files before fingerprints: the counts tell
        parser.error(f"argument --rescore: {source} was measured with the SAE whose weights' fingerprint is "
                     f"{recorded['weights_sha256']}; the cached SAE of its settings ({sae_path}) is {fingerprint}, "
                     "trained apart from it (on another machine the same settings train other weights): run the "
                     "benchmark again instead, or re-score on the machine that holds that SAE")
    if sae.cfg.d_sae != results.get("latents", sae.cfg.d_sae):
        parser.error(f"argument --rescore: {source} was measured with {results['latents']} latents; the cached SAE "
                     f"of its settings has {sae.cfg.d_sae}")
    output = Path(args.output) if args.output else source
    for poison_name, found in results["poisons"].items():
        poison = poisoning.POISONS[poison_name]
        rows = poisoning.dataset_rows(model, tokenizer, texts, poison, 14 if quick else 330, quick, source.parent)
        passes = poisoning.score_passes(contexts, poison)
        for weighing, by_draw in found["weighings"].items():
            for draw, entry in by_draw.items():
                by_draw[draw] = counted(entry["latents"], passes)
                if by_draw[draw]["contexts"] != entry["contexts"]:  # the held-out contexts are not the recorded ones
                    parser.error(f"argument --rescore: {source} counts {entry['contexts']} of the {weighing} "
                                 f"weighing's latents ({poison_name}, {draw}) by contexts; the cached SAE of its "
                                 f"settings counts {by_draw[draw]['contexts']}: it is not the SAE it was measured "
                                 "with")
        if "dataset_diffing" in found:  # recorded: counted again; the offers to a new score are left unmeasured
            found["dataset_diffing"] = {draw: counted(entry["latents"], passes)
                                        for draw, entry in found["dataset_diffing"].items()}
        else:
            draws = {str(seed): poisoning.poison_rows(rows, results["rate"], poison, seed)
                     for seed in results["seeds"]}
            found.update(twin_baselines(model, tokenizer, sae, demo_settings.hook, rows, draws, passes))
        found.update(poisoning.latents_passing(passes))
        found["contexts_of_named"] = contexts_of_named(found, contexts)
    results["latents"] = sae.cfg.d_sae
    results["rescored"] = {"scores": list(SCORES), "seconds": time.time() - started}
    print_table(results)
    write_json(output, results)
    print(f"wrote {output}")
    return results


SCORES = {"contexts": ("whose contexts name the poison", "on_offer"),
          "own_words": ("that fire on the poison's own words (template or topic)", "on_offer_own_words")}
"""The two context scores each table counts, by result key: what the table's title says, and where its offer is."""


def print_table(results: dict[str, Any]) -> None:
    """Per score (:data:`SCORES`), weighing and poison: the clean audit's count, then each draw's, of top-10 latents
    that name the poison; the same counts for dataset diffing (which has no clean audit), and each draw's latents on
    offer. Result files written before the own-words score was measured print the first table only."""
    poisons = list(results["poisons"])
    seeds = [str(seed) for seed in results["seeds"]]
    for key, (title, offer_key) in SCORES.items():
        if any(key not in results["poisons"][poison]["dataset_diffing"][seeds[0]] for poison in poisons):
            continue
        print(f"\nTop-10 latents {title}, at {results['rate']:.0%} poison: the clean audit, then the draws "
              f"{', '.join(seeds)}")
        print("| weighing | " + " | ".join(poisons) + " | total over the draws |")
        print("|---|" + "---|" * (len(poisons) + 1))
        for weighing in WEIGHINGS:
            cells, total = [], 0
            for poison in poisons:
                entry = results["poisons"][poison]["weighings"][weighing]
                total += sum(entry[seed][key] for seed in seeds)
                cells.append(f"clean {entry['clean'][key]}; {', '.join(str(entry[seed][key]) for seed in seeds)}")
            print(f"| {weighing} | " + " | ".join(cells) + f" | {total} |")
        diffing = [[results["poisons"][poison]["dataset_diffing"][seed][key] for seed in seeds] for poison in poisons]
        print("| dataset diffing (clean twin) | " + " | ".join(f"clean -; {', '.join(map(str, counts))}"
                                                             for counts in diffing)
              + f" | {sum(map(sum, diffing))} |")
        offer = [", ".join(str(len(results["poisons"][poison][offer_key][seed])) for seed in seeds)
                 if offer_key in results["poisons"][poison] else "not measured" for poison in poisons]
        print("| latents on offer | " + " | ".join(offer) + " | |")


if __name__ == "__main__":
    main()
