"""The plots a reviewer looks at, rendered to PNG for the PR report (no browser, no network).

`dvc plots diff` writes HTML that loads Vega from a CDN: nothing a pull-request comment can show.
Here the same data become Vega-Lite specs rendered to PNG files with vl-convert (Vega's own
renderer, embedded), which a Markdown summary can show as images:

- loss curves: training and validation loss by step, this workspace and the base revision;
- metric bars: base model vs tuned for every 0..1 metric, with the 95 % interval as a whisker;
- one confusion matrix per classification-like JSON field (tuned model).
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

SCHEMA = "https://vega.github.io/schema/vega-lite/v5.json"
LOSS_FILES = {"train": "reports/train/plots/metrics/train/loss.tsv",
              "validation": "reports/train/plots/metrics/eval/loss.tsv"}


def read_tsv_curve(text: str, column: str = "loss") -> list[dict[str, float]]:
    """[{"step", column}] from a DVCLive TSV (a header line with `step` and the metric)."""
    rows = []
    for row in csv.DictReader(io.StringIO(text), delimiter="\t"):
        try:
            rows.append({"step": float(row["step"]), column: float(row[column])})
        except (KeyError, TypeError, ValueError):
            continue
    return rows


def loss_spec(curves: Mapping[str, Mapping[str, Sequence[Mapping[str, float]]]]) -> dict[str, Any] | None:
    """`curves`: {revision label: {"train"|"validation": rows}} -> a line chart, or None if empty."""
    values = [{"step": r["step"], "loss": r["loss"], "split": split, "revision": rev}
              for rev, by_split in curves.items() for split, rows in by_split.items() for r in rows]
    if not values:
        return None
    return {"$schema": SCHEMA, "title": "Loss by step", "width": 420, "height": 220,
            "data": {"values": values},
            "mark": {"type": "line", "point": True},
            "encoding": {"x": {"field": "step", "type": "quantitative"},
                         "y": {"field": "loss", "type": "quantitative", "scale": {"zero": False}},
                         "color": {"field": "split", "type": "nominal"},
                         "strokeDash": {"field": "revision", "type": "nominal"}}}


def metric_bars_spec(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """eval_plot_rows(report) (metric "name (model)", model, value, lower, upper) -> grouped bars
    per metric with the interval drawn as a whisker; None if there is nothing to draw."""
    values = [{"metric": r["metric"].rsplit(" (", 1)[0], "model": r["model"], "value": r["value"],
               "lower": r.get("lower", r["value"]), "upper": r.get("upper", r["value"])} for r in rows]
    if not values:
        return None
    y = {"field": "metric", "type": "nominal", "title": None}
    offset = {"field": "model", "type": "nominal"}
    return {"$schema": SCHEMA, "title": "Base model vs tuned (bars: value; whiskers: 95 % interval)",
            "width": 420, "data": {"values": values},
            "layer": [
                {"mark": "bar", "encoding": {"y": y, "yOffset": offset,
                                             "x": {"field": "value", "type": "quantitative", "title": "value",
                                                   "scale": {"domain": [0, 1]}},
                                             "color": {"field": "model", "type": "nominal"}}},
                {"mark": {"type": "rule", "color": "black"},
                 "encoding": {"y": y, "yOffset": offset, "x": {"field": "lower", "type": "quantitative"},
                              "x2": {"field": "upper"}}}]}


def confusion_spec(field: str, labels: Sequence[str], matrix: Sequence[Sequence[int]]) -> dict[str, Any]:
    """A heatmap with counts: rows the reference label, columns the predicted label."""
    values = [{"actual": a, "predicted": p, "count": int(matrix[i][j])}
              for i, a in enumerate(labels) for j, p in enumerate(labels)]
    order = list(labels)
    return {"$schema": SCHEMA, "title": f"{field}: confusion matrix (tuned model)",
            "data": {"values": values},
            "encoding": {"x": {"field": "predicted", "type": "nominal", "sort": order},
                         "y": {"field": "actual", "type": "nominal", "sort": order}},
            "layer": [{"mark": "rect", "encoding": {"color": {"field": "count", "type": "quantitative",
                                                              "scale": {"scheme": "blues"}}}},
                      {"mark": "text", "encoding": {"text": {"field": "count", "type": "quantitative"},
                                                    "color": {"condition": {"test": "datum.count == 0",
                                                                            "value": "#bbb"},
                                                              "value": "black"}}}]}


def render_png(spec: Mapping[str, Any], path: Path, scale: float = 1.5) -> Path:
    """Render a Vega-Lite spec to a PNG file (written atomically)."""
    import vl_convert

    from stages.lib.io import atomic_file

    png = vl_convert.vegalite_to_png(dict(spec), scale=scale)
    with atomic_file(path, "wb") as handle:
        handle.write(png)
    return path


def render_all(specs: Iterable[tuple[str, str, Mapping[str, Any] | None]], folder: Path) -> list[tuple[str, Path]]:
    """[(file stem, caption, spec)] -> [(caption, png path)] for the specs that are not None."""
    done = []
    for stem, caption, spec in specs:
        if spec is not None:
            done.append((caption, render_png(spec, folder / f"{stem}.png")))
    return done
