"""``report.html``: one self-contained page about a run (curves, previews, recipe), no network, no JavaScript."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

WIDTH, HEIGHT, MARGIN = 640, 220, 40
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]


def line_chart(title: str, series: dict[str, list[tuple[float, float]]], log_y: bool = False) -> str:
    """An inline SVG line chart of ``{name: [(x, y), ...]}`` with its axis ranges written out."""
    points = [(x, y) for line in series.values() for x, y in line if math.isfinite(y) and (y > 0 or not log_y)]
    if not points:
        return f"<h3>{html.escape(title)}</h3><p>no data</p>"
    ty = (lambda y: math.log10(y)) if log_y else (lambda y: y)
    xs, ys = [x for x, _ in points], [ty(y) for _, y in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-12)

    def at(x: float, y: float) -> str:
        px = MARGIN + (x - x0) / (x1 - x0) * (WIDTH - 2 * MARGIN)
        py = HEIGHT - MARGIN - (ty(y) - y0) / (y1 - y0) * (HEIGHT - 2 * MARGIN)
        return f"{px:.1f},{py:.1f}"

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" role="img">',
             f'<rect x="{MARGIN}" y="{MARGIN}" width="{WIDTH - 2 * MARGIN}" height="{HEIGHT - 2 * MARGIN}" fill="none" stroke="#ccc"/>']
    legend = []
    for i, (name, line) in enumerate(series.items()):
        kept = [(x, y) for x, y in line if math.isfinite(y) and (y > 0 or not log_y)]
        colour = COLOURS[i % len(COLOURS)]
        parts.append(f'<polyline class="series" data-name="{html.escape(name)}" fill="none" stroke="{colour}" '
                     f'stroke-width="1.5" points="{" ".join(at(x, y) for x, y in kept)}"/>')
        legend.append(f'<span style="color:{colour}">&#9632; {html.escape(name)}</span>')
    label = (lambda v: f"{10 ** v:.3g}") if log_y else (lambda v: f"{v:.4g}")
    parts += [f'<text x="{MARGIN}" y="{HEIGHT - 8}" font-size="11">step {x0:g}</text>',
              f'<text x="{WIDTH - MARGIN}" y="{HEIGHT - 8}" font-size="11" text-anchor="end">step {x1:g}</text>',
              f'<text x="4" y="{MARGIN + 4}" font-size="11">{label(y1)}</text>',
              f'<text x="4" y="{HEIGHT - MARGIN}" font-size="11">{label(y0)}</text>', "</svg>"]
    return f"<h3>{html.escape(title)}</h3>{''.join(parts)}<div>{' '.join(legend)}</div>"


def render_report(
    title: str,
    summary: dict[str, str],
    history: dict[str, list[tuple[float, float]]],
    validation: list[tuple[int, dict[int, float]]],
    previews: list[tuple[int, Path]],
    recipe_yaml: str,
) -> str:
    """``history`` holds ``loss`` and ``lr`` points; ``validation`` (step, {timestep: loss});
    ``previews`` (step, PNG path), embedded as data URIs so the page stands alone."""
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary.items())
    body = [f"<h1>{html.escape(title)}</h1><table>{rows}</table>",
            line_chart("Training loss", {"loss": history.get("loss", [])}, log_y=True),
            line_chart("Learning rate", {"lr": history.get("lr", [])})]
    if validation:
        timesteps = sorted({t for _, losses in validation for t in losses})
        series = {"mean": [(s, sum(v.values()) / len(v)) for s, v in validation]}
        series |= {f"t={t}": [(s, v[t]) for s, v in validation if t in v] for t in timesteps}
        body.append(line_chart("Validation loss (fixed timesteps and noise)", series, log_y=True))
    if previews:
        body.append("<h2>Previews</h2>")
        for step, path in previews:
            data = base64.b64encode(Path(path).read_bytes()).decode()
            body.append(f'<figure><img alt="step {step}" src="data:image/png;base64,{data}"><figcaption>step {step}</figcaption></figure>')
    body.append(f"<h2>Recipe</h2><pre>{html.escape(recipe_yaml)}</pre>")
    style = "body{font-family:sans-serif;max-width:980px;margin:auto}th{text-align:left;padding-right:1em}img{max-width:100%}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n"
