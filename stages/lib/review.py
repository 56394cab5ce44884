"""The reviewer's tables: metrics as rows, with their 95 % intervals and a plain verdict.

Built with pandas from reports/eval.json (base model vs tuned) or from two sets of per-row
results (a pull request's tuned model vs the base revision's, on the same rows). Markdown comes
out of DataFrame.to_markdown; every number is formatted here so the tables are stable text.
"""
from __future__ import annotations

from typing import Any, Mapping

from stages.lib.metrics import LOWER_IS_BETTER
from stages.lib.uncertainty import METHOD, NO_CHANGE, leaves, verdict

# Rows in this order; anything else the report has (field accuracies) follows in name order.
ORDER = ("json_valid", "schema_valid", "field_accuracy_mean", "exact_match", "rouge_l", "chrf",
         "loss", "perplexity", "general_accuracy", "general_perplexity", "empty_output_rate")
MARK = {"better": "🟢 better", "worse": "🔴 worse", NO_CHANGE: "⚪ no detectable change"}


def _entries(block: Mapping[str, Any] | None) -> dict[str, dict[str, float]]:
    """Leaves of one side of eval.json as {value, lower?, upper?}; old reports hold bare numbers."""
    flat: dict[str, dict[str, float]] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, Mapping) and "value" in value:
                flat[prefix + key] = dict(value)
            elif isinstance(value, Mapping):
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[prefix + key] = {"value": float(value)}

    walk(block or {}, "")
    return flat


def _order(names) -> list[str]:
    names = set(names)
    first = [n for n in ORDER if n in names]
    return first + sorted(names - set(first))


def _num(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _with_interval(entry: Mapping[str, float] | None) -> str:
    if not entry:
        return "—"
    if "lower" in entry and "upper" in entry:
        return f"{_num(entry['value'])} [{_num(entry['lower'])}, {_num(entry['upper'])}]"
    return _num(entry["value"])


def _interval(entry: Mapping[str, float] | None) -> str:
    if not entry or "lower" not in entry:
        return "—"
    return f"[{_num(entry['lower'], True)}, {_num(entry['upper'], True)}]"


def _verdict(name: str, entry: Mapping[str, float] | None) -> str:
    if not entry or "lower" not in entry:
        return "—"
    return MARK[verdict(name, entry)]


def eval_table(report: Mapping[str, Any]):
    """reports/eval.json as a DataFrame: one row per metric; base, tuned, delta, interval, verdict."""
    import pandas as pd

    base, tuned, delta = (_entries(report.get(side)) for side in ("base", "tuned", "delta"))
    rows = []
    for name in _order(set(base) | set(tuned)):
        change = delta.get(name)
        rows.append({"metric": name, "better": "lower" if name.split(".")[0] in LOWER_IS_BETTER else "higher",
                     "base": _with_interval(base.get(name)), "tuned": _with_interval(tuned.get(name)),
                     "delta": _num(change["value"], True) if change else "—",
                     "95 % interval of delta": _interval(change), "verdict": _verdict(name, change)})
    return pd.DataFrame(rows, columns=["metric", "better", "base", "tuned", "delta", "95 % interval of delta",
                                       "verdict"])


def comparison_table(compared: Mapping[str, Any], old_label: str, new_label: str):
    """uncertainty.compare_scores output as a DataFrame: old, new, change, interval, verdict."""
    import pandas as pd

    old, new, delta = (leaves(compared.get(side) or {}) for side in ("old", "new", "delta"))
    rows = []
    for name in _order(delta):
        rows.append({"metric": name, old_label: _with_interval(old.get(name)),
                     new_label: _with_interval(new.get(name)), "change": _num(delta[name]["value"], True),
                     "95 % interval of change": _interval(delta[name]), "verdict": _verdict(name, delta[name])})
    return pd.DataFrame(rows, columns=["metric", old_label, new_label, "change", "95 % interval of change",
                                       "verdict"])


def point_comparison_table(old_block: Mapping[str, Any] | None, new_block: Mapping[str, Any] | None,
                           old_label: str, new_label: str):
    """Two sides of eval.json (e.g. the tuned model now and at the base revision) compared on point
    values only: for when the per-row results an interval needs are not available."""
    import pandas as pd

    old, new = _entries(old_block), _entries(new_block)
    rows = [{"metric": name, old_label: _num(old[name]["value"]) if name in old else "—",
             new_label: _num(new[name]["value"]) if name in new else "—",
             "change": _num(new[name]["value"] - old[name]["value"], True) if name in old and name in new else "—"}
            for name in _order(set(new) | set(old))]
    return pd.DataFrame(rows, columns=["metric", old_label, new_label, "change"])


def to_markdown(frame) -> str:
    """A GitHub table; cells are plain text (metric names and numbers), left as they are."""
    if frame.empty:
        return "*(no metrics)*"
    aligns = ["left" if c in ("metric", "better", "verdict", "field", "label", "reason", "split") else "right"
              for c in frame.columns]
    # disable_numparse: "+0.400" stays as written (tabulate would reformat it as 0.4).
    return frame.to_markdown(index=False, colalign=aligns, disable_numparse=True)


def verdict_counts(frame) -> dict[str, int]:
    """How many metrics got each verdict (for the one-line summary above a table)."""
    if frame.empty or "verdict" not in frame:
        return {}
    counts = frame["verdict"].value_counts()
    return {label: int(counts.get(mark, 0)) for label, mark in MARK.items() if counts.get(mark, 0)}


def method_note(report: Mapping[str, Any] | None = None) -> str:
    settings = (report or {}).get("interval") or {}
    seed = f", seed {settings['seed']}" if "seed" in settings else ""
    return f"{METHOD}{seed}. A verdict is *better* or *worse* only when the interval of the change excludes 0."
