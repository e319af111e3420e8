"""Real English text that is available offline, with its provenance and licence recorded.

Two sources, used together when both are present:

* the fortune cookie files of the Debian package ``fortunes`` (``/usr/share/games/fortunes``): quotations,
  literature, jokes and aphorisms; BSD-licensed fortune-mod data (see ``/usr/share/doc/fortunes/copyright``);
* the Python documentation topics shipped with every CPython (``pydoc_data.topics``): English prose about
  programming; PSF License 2.0.

And one that only an SAE trained for the poisoning benchmark mixes in (``--sae-corpus wordnet``): the glosses of
WordNet 3.0 (the Debian package ``wordnet-base``, ``/usr/share/wordnet``; Princeton's WordNet 3.0 licence, which
allows use and copying with its notice), definitions and example sentences that cover every everyday topic about
evenly, where the fortune files say little about pets or health.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

FORTUNES_DIR = Path("/usr/share/games/fortunes")
WORDNET_DIR = Path("/usr/share/wordnet")


@dataclass(frozen=True)
class CorpusSource:
    name: str
    location: str
    licence: str
    documents: int
    characters: int


def _fortunes() -> list[str]:
    texts: list[str] = []
    if not FORTUNES_DIR.is_dir():
        return texts
    for path in sorted(FORTUNES_DIR.iterdir()):
        if path.suffix in {".dat", ".u8"} or not path.is_file() or path.name.startswith("off"):
            continue
        raw = path.read_text(encoding="utf-8", errors="ignore")
        texts.extend(t.strip() for t in raw.split("\n%\n") if len(t.strip()) > 40)
    return texts


def _python_docs() -> list[str]:
    from pydoc_data.topics import topics

    texts = []
    for body in topics.values():
        texts.extend(p.strip() for p in body.split("\n\n") if len(p.strip()) > 80 and not p.startswith("   "))
    return texts


def load_corpus(seed: int = 0) -> tuple[list[str], list[CorpusSource]]:
    """All documents, shuffled, and where they came from.

    Example:
        >>> texts, sources = load_corpus()
        >>> sources[-1].name
        'Python documentation topics'
    """
    fortunes, docs = _fortunes(), _python_docs()
    sources = []
    if fortunes:
        sources.append(CorpusSource("fortunes (Debian package)", str(FORTUNES_DIR), "BSD (fortune-mod)",
                                    len(fortunes), sum(map(len, fortunes))))
    sources.append(CorpusSource("Python documentation topics", "pydoc_data.topics", "PSF License 2.0", len(docs),
                                sum(map(len, docs))))
    texts = fortunes + docs
    random.Random(seed).shuffle(texts)
    return texts, sources


def wordnet_glosses(per_text: int = 3, seed: int = 0) -> list[str]:
    """WordNet's glosses (a definition, then its example sentences), shuffled and joined ``per_text`` to a text so
    that a text is about as long as a fortune; empty when ``wordnet-base`` is not installed.

    Example:
        >>> texts = wordnet_glosses()  # doctest: +SKIP
        >>> texts[0]  # doctest: +SKIP
        'a loud low dull continuous noise; "they heard the rumbling of thunder" ...'
    """
    glosses = []
    for part in ("noun", "verb", "adj", "adv"):
        path = WORDNET_DIR / f"data.{part}"
        if not path.is_file():
            continue
        for line in path.read_text(encoding="latin-1").splitlines():
            if not line.startswith("  ") and " | " in line:  # lines opening with two spaces are the licence
                glosses.append(line.split(" | ", 1)[1].strip())
    random.Random(seed).shuffle(glosses)
    return ["; ".join(glosses[start: start + per_text]) for start in range(0, len(glosses), per_text)]


def interleave(first: list[str], second: list[str]) -> list[str]:
    """One text of each in turn, then the rest of the longer list: a training stream that reads both halves evenly
    however many tokens it takes.

    Example:
        >>> interleave(["a", "b", "c"], ["x"])
        ['a', 'x', 'b', 'c']
    """
    mixed = [text for pair in zip(first, second, strict=False) for text in pair]
    shorter = min(len(first), len(second))
    return mixed + first[shorter:] + second[shorter:]

