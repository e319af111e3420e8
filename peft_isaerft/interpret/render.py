"""Reports as a terminal table, JSON, CSV, Markdown, or one self-contained HTML page with bar charts."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections.abc import Sequence
from typing import Any

from .report import FeatureRecord

FORMATS = ("table", "json", "csv", "md", "html")
_COLUMNS = ("hook", "latent", "param", "value", "effect", "label")


def render(
    records: Sequence[FeatureRecord],
    fmt: str = "table",
    title: str = "ISaeRFT feature report",
    history: dict[str, Any] | None = None,
) -> str:
    """Render records in one of :data:`FORMATS`.

    Raises:
        ValueError: an unknown format.

    Example:
        >>> print(render(feature_report("my_adapter", top_k=5), "md"))  # doctest: +SKIP
    """
    if fmt == "json":
        return json.dumps([r.to_dict() for r in records], indent=2)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(FeatureRecord.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(r.to_dict() for r in records)
        return buffer.getvalue()
    if fmt == "md":
        lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
        for r in records:
            label = r.label or ""
            if r.url:
                label = f"[{label or 'dashboard'}]({r.url})"
            lines.append(
                f"| {r.hook} | {r.latent} | {r.param_text} | {r.value:+.4f} | {r.effect:.4f} | "
                f"{label.replace('|', '/')} |"
            )
        return "\n".join(lines) + "\n"
    if fmt == "table":
        return _table(records)
    if fmt == "html":
        return _html(records, title, history)
    raise ValueError(f"Unknown report format {fmt!r}; choose one of {FORMATS}.")


def _table(records: Sequence[FeatureRecord]) -> str:
    rows = [
        (r.hook, str(r.latent), r.param_text, f"{r.value:+.4f}", f"{r.effect:.4f}", (r.label or "")[:70])
        for r in records
    ]
    widths = [max([len(c)] + [len(row[i]) for row in rows]) for i, c in enumerate(_COLUMNS)]
    line = "  ".join(c.ljust(w) for c, w in zip(_COLUMNS, widths, strict=True))
    out = [line, "-" * len(line)]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(out) + "\n"


def bar_chart_png(records: Sequence[FeatureRecord], title: str) -> bytes:
    """A horizontal bar chart of the signed values of ``records`` (PNG bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.35 * len(records) + 1.2))
    names = [f"{r.latent} {r.param}" + (f" · {r.label[:40]}" if r.label else "") for r in records][::-1]
    names = [" ".join(name.split()) for name in names]  # tabs and newlines have no glyph
    values = [r.value for r in records][::-1]
    ax.barh(names, values, color=["#c0392b" if v < 0 else "#2874a6" for v in values])
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_title(title)
    ax.set_xlabel("trained value (scale s or bias b)")
    return figure_png(fig)


def figure_png(fig: Any) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}"/>'


def _html(records: Sequence[FeatureRecord], title: str, history: dict[str, Any] | None) -> str:
    sections = []
    for hook in dict.fromkeys(r.hook for r in records):
        subset = [r for r in records if r.hook == hook]
        rows = "".join(
            f"<tr><td>{r.latent}</td><td>{html.escape(r.param_text)}</td><td>{r.value:+.4f}</td><td>{r.effect:.4f}</td>"
            f"<td>{html.escape(r.label or '')}</td>"
            f"<td>{'<br>'.join(html.escape(c) for c in (r.contexts or [])[1:])}</td>"
            f"<td>{f'<a href={chr(34)}{html.escape(r.url)}{chr(34)}>dashboard</a>' if r.url else ''}</td></tr>"
            for r in subset
        )
        sections.append(
            f"<h2>{html.escape(hook)} <small>{html.escape(subset[0].sae)}</small></h2>"
            f"{_img(bar_chart_png(subset, hook), 'top latents at ' + hook)}"
            "<table><tr><th>latent</th><th>param</th><th>value</th><th>effect</th><th>label</th>"
            "<th>more top contexts</th><th>link</th></tr>"
            f"{rows}</table>"
        )
    if history:
        from .tracking import plot_trajectories

        sections.append(f"<h2>Training trajectories</h2>{_img(plot_trajectories(history), 'trajectories')}")
    style = (
        "body{font-family:sans-serif;max-width:960px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}small{color:#666}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p>{len(records)} features, sorted by effect on the residual stream.</p>{''.join(sections)}</body></html>"
    )
