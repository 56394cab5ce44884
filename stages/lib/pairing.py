"""Base and tuned answers side by side, and the rates that compare them: what the LLM judge
(stages/lib/judge.py) and human preferences (stages/lib/prefs.py) share."""
from __future__ import annotations

from typing import Iterable, Mapping

from stages.lib.uncertainty import wilson


def pair_rows(base_rows: Iterable[Mapping], tuned_rows: Iterable[Mapping]) -> list[dict]:
    """Base and tuned predictions joined by row id, in the tuned file's order."""
    base = {r["id"]: r for r in base_rows}
    tuned = list(tuned_rows)
    missing = [r["id"] for r in tuned if r["id"] not in base]
    if missing or len(base) != len(tuned):
        raise ValueError(f"base and tuned predictions cover different test rows ({len(base)} vs "
                         f"{len(tuned)}, e.g. {(missing or sorted(set(base) - {r['id'] for r in tuned}))[:1]}): "
                         "re-run evaluate_base and evaluate with the same evaluate.max_samples")
    return [{"id": r["id"], "prompt": r["prompt"], "reference": r.get("reference"),
             "base": base[r["id"]]["prediction"], "tuned": r["prediction"]} for r in tuned]


def share(count: int, n: int, ndigits: int = 4) -> dict:
    """{"count", "n", "rate", "lower", "upper"}: a count out of n with its 95 % Wilson interval
    (which stays inside 0..1 and keeps its coverage at the tens of rows and the rates of 0 or 1
    that judging produces); rate and bounds are None when n is 0."""
    if n <= 0:
        return {"count": count, "n": n, "rate": None, "lower": None, "upper": None}
    lower, upper = wilson(count, n)
    return {"count": count, "n": n, "rate": round(count / n, ndigits), "lower": round(lower, ndigits),
            "upper": round(upper, ndigits)}
