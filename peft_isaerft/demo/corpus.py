"""Real English text that is available offline, with its provenance and licence recorded.

Two sources, used together when both are present:

* the fortune cookie files of the Debian package ``fortunes`` (``/usr/share/games/fortunes``): quotations,
  literature, jokes and aphorisms; BSD-licensed fortune-mod data (see ``/usr/share/doc/fortunes/copyright``);
* the Python documentation topics shipped with every CPython (``pydoc_data.topics``): English prose about
  programming; PSF License 2.0.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

FORTUNES_DIR = Path("/usr/share/games/fortunes")


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
    """All documents, shuffled, and where they came from."""
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
