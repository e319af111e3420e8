"""Which weighing of the attribution audit's scores names a poison, on every poison and every draw at once.

    python benchmarks/poisoning_rankings.py --sae-tokens 400000 --sae-epochs 1  # 4 poisons x (the clean set and 3
                                                # draws) at 10 %: 41 minutes on 2 CPU cores before diffing was added
    python benchmarks/poisoning_rankings.py --sae-tokens 400000 --sae-epochs 4 --sae-width 16 \
        --output benchmarks/results/poisoning_rankings_d9216.json  # an SAE twice as wide (9216 latents; one epoch
                                                # leaves most of them dead): 64 minutes, +36 to train it once
    python benchmarks/poisoning_rankings.py --quick   # the same machinery at toy size (the test suite runs it)

``poisoning.py`` measures one audit recipe per run (13 minutes each, steering included). The recipe's coverage weighing
was chosen on the first draw of the money and food poisons. This benchmark asks a narrower question cheaply: keeping
the attribution audit's rows, tokens and scores as they are, does another way of weighing them by coverage put more
latents that name the poison in the top 10, on every poison and every draw of the poisoned rows?

Each audit's attribution (:func:`peft_isaerft.audit.attribute_latents`, the 20 % most surprising tokens of the 10 %
most surprising rows against the rest) is computed once, then ranked by every weighing in ``WEIGHINGS``. The score is
``poisoning.py``'s context score: a poison word in the latent's top three contexts on held-out text. The clean set's
audit is the false-alarm check (its count should stay at most 1). Beside the rankings, ``fires_in`` records for each
latent they name the share of the surprising rows it fires in and that share of the other rows.

Beside them, in the same run and with the same score: dataset diffing with the clean twin (``poisoning.py``'s
baseline: the base model's mean latent activation over the poisoned set's answers minus the clean set's), and each
draw's latents on offer (``poisoning.latents_on_offer``: what the SAE and the held-out text allow any ranking to
find). The SAE flags are ``poisoning.py``'s, so the same comparison runs on another SAE (``--sae-width``,
``--sae-corpus``, ``--sae-layer``).
"""

from __future__ import annotations

import argparse
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

import peft_isaerft  # noqa: F401
from peft_isaerft import ISaeRFTConfig
from peft_isaerft.audit import (
    AuditSettings,
    LatentAttribution,
    attribute_latents,
    disable_dropout,
    padding_collator,
    split_surprising,
    tokenise_rows,
)
from peft_isaerft.demo import demo_sae, load_demo_model
from peft_isaerft.demo.corpus import load_corpus
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


LIFT_FLOOR = 0.02
"""Added to both shares of the coverage lift, so that a latent that never fires in the reference rows (a share of 0)
gets a large weight rather than an infinite one (about one row in 50)."""

WEIGHINGS: dict[str, Weighing] = {weighing.name: weighing for weighing in (
    Weighing("coverage difference", "the recipe's: the share of rows where it fires minus the other side's share",
             lambda toward, away: (toward - away).clamp_min(0)),
    Weighing("none", "the unweighed attribution score",
             lambda toward, away: torch.ones_like(toward)),
    Weighing("coverage lift", "the log of the ratio of the two shares, each plus LIFT_FLOOR",
             lambda toward, away: ((toward + LIFT_FLOOR) / (away + LIFT_FLOOR)).log().clamp_min(0)),
    Weighing("coverage difference x rarity", "the coverage difference times the share of the other side's rows "
             "where it does not fire (common latents count less)",
             lambda toward, away: (toward - away).clamp_min(0) * (1 - away)),
)}
"""The weighings compared, by name. ``coverage difference`` is what ``AuditSettings(weigh_by_coverage=True)`` does."""


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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="toy size: a small SAE, 24 rows, the money poison, one draw")
    parser.add_argument("--poisons", default=None,
                        help=f"comma-separated, from {', '.join(poisoning.POISONS)} (default all; quick: money)")
    parser.add_argument("--seeds", default=None, help="draws of the poisoned rows, comma-separated (default 0,1,2)")
    parser.add_argument("--rate", type=float, default=0.1, help="the share of rows poisoned (default 0.1)")
    poisoning.add_sae_arguments(parser)
    parser.add_argument("--output", default="benchmarks/results/poisoning_rankings.json", help="JSON file")
    args = parser.parse_args(argv)
    started = time.time()
    poisons = (args.poisons or ("money" if args.quick else ",".join(poisoning.POISONS))).split(",")
    unknown = set(poisons) - set(poisoning.POISONS)
    if unknown:
        parser.error(f"unknown poisons {sorted(unknown)}; choose from {', '.join(poisoning.POISONS)}")
    if not 0 < args.rate <= 1:
        parser.error(f"argument --rate: a share of the rows, above 0 and at most 1; got {args.rate}")
    seeds = [int(seed) for seed in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    demo_settings = poisoning.sae_settings(parser, args)
    model, tokenizer, name = load_demo_model()
    poisoning.check_sae_layer(parser, args, model, name)
    texts, _sources = load_corpus()
    sae_path, _quality = demo_sae(model, tokenizer, name, demo_settings, texts)
    sae = load_sae(SAEReference.from_dict({"path": str(sae_path)}))
    heldout = poisoning.QUICK_HELDOUT if args.quick else poisoning.HELDOUT
    model, statistics = poisoning.read_heldout(model, tokenizer, sae_path, texts[-heldout:])
    contexts = [statistics.contexts(latent) for latent in range(len(statistics.top_values))]
    results: dict[str, Any] = {"rate": args.rate, "seeds": seeds, "poisons": {},
                               "sae": poisoning.sae_record(demo_settings), "latents": sae.cfg.d_sae,
                               "weighings": {w.name: w.description for w in WEIGHINGS.values()}}
    for poison_name in poisons:
        poison = poisoning.POISONS[poison_name]
        rows = poisoning.dataset_rows(model, tokenizer, texts, poison, 14 if args.quick else 330, args.quick,
                                      Path(args.output).parent)
        named_by_contexts = torch.tensor([poison.names_by_contexts(c) for c in contexts])
        firing_on_own_words = torch.tensor([poison.fires_on_own_words(c) for c in contexts])
        passes = {"contexts": named_by_contexts, "own_words": firing_on_own_words}
        clean = poisoning.answer_latent_means(model, tokenizer, sae, demo_settings.hook, rows)
        poisoned_draws = {str(seed): poisoning.poison_rows(rows, args.rate, poison, seed) for seed in seeds}
        diffing: dict[str, dict[str, Any]] = {}
        on_offer: dict[str, list[int]] = {}
        on_offer_own_words: dict[str, list[int]] = {}
        for draw, (poisoned, chosen) in poisoned_draws.items():
            answered, inserted = poisoning.poisoned_latent_means(model, tokenizer, sae, demo_settings.hook, rows,
                                                                 poisoned, chosen)
            diffing[draw] = counted(poisoning.dataset_diffing(answered, clean), passes)
            on_offer[draw] = poisoning.latents_on_offer(inserted, clean, named_by_contexts)
            on_offer_own_words[draw] = poisoning.latents_on_offer(inserted, clean, firing_on_own_words)
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
        results["poisons"][poison_name] = {"weighings": found, "fires_in": fires_in, "dataset_diffing": diffing,
                                           "on_offer": on_offer, "on_offer_own_words": on_offer_own_words,
                                           "latents_with_poison_words_in_contexts": int(named_by_contexts.sum()),
                                           "latents_firing_on_own_words": int(firing_on_own_words.sum())}
    results["seconds"] = time.time() - started
    print_table(results)
    poisoning.write_results(results, Path(args.output))
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
        offer = [[len(results["poisons"][poison][offer_key][seed]) for seed in seeds] for poison in poisons]
        print("| latents on offer | " + " | ".join(", ".join(map(str, counts)) for counts in offer) + " | |")


if __name__ == "__main__":
    main()
