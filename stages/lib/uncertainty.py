"""95 % intervals for every evaluation metric, and the verdict a reviewer reads off them.

On 32 test rows a share such as schema_valid = 0.34 is uncertain by about +-0.17, so a point
value alone cannot tell a real change from noise. Every metric therefore comes with an interval,
computed from the per-row results the evaluate stages keep (data/eval/<model>/scores.json):

- one model (`base.*`, `tuned.*`), metrics that are a share of rows that pass (exact_match,
  json_valid, schema_valid, empty_output_rate, field_accuracy.<field>, general_accuracy): the
  Wilson score interval for a binomial proportion (sound at 0 and 1, where a bootstrap collapses
  to a single point);
- every other metric (rouge_l, chrf, field_accuracy_mean, loss, perplexity, general_perplexity)
  and every difference (`delta.*`, and the PR report's new-vs-old comparison): a seeded, paired
  percentile bootstrap. Rows are resampled with replacement RESAMPLES times, the same resample for
  both models (the pairing: each row is scored by both, so row difficulty cancels out). Test rows,
  probe questions and blocks of the probe text are resampled each on their own. Corpus metrics
  (chrF, token-weighted loss) are recomputed from summed per-row statistics on each resample.

The seed is fixed, so the same per-row results give the same intervals on every machine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Callable, Mapping, Sequence

from stages.lib.metrics import LOWER_IS_BETTER, NDIGITS

CONFIDENCE = 0.95
RESAMPLES = 2000
SEED = 20261202
UNITS = ("test", "probes", "text")  # keys of a scores object; each a list of per-row dicts with "id"
METHOD = (f"{CONFIDENCE:.0%} intervals: Wilson score interval for a single model's shares of passing "
          f"rows; seeded paired percentile bootstrap ({RESAMPLES} resamples of the rows) for the "
          "other metrics and for every difference")

BETTER, WORSE, NO_CHANGE = "better", "worse", "no detectable change"


@dataclass(frozen=True)
class Metric:
    """How one metric is computed from per-row results.

    `values` maps a row to a vector; `combine` maps vectors summed over (re-sampled) rows, shape
    (..., k), to the metric, shape (...). A metric is a function of sums so that a bootstrap is a
    matrix product (resample counts @ per-row vectors) and corpus metrics stay exact.
    """
    name: str          # dotted, as in reports/eval.json: "field_accuracy.category"
    unit: str          # which rows it is computed over: "test", "probes" or "text"
    values: Callable[[Mapping[str, Any]], Sequence[float]]
    combine: Callable[[Any], Any]
    proportion: bool = False  # values are (passed, counted): one model gets a Wilson interval


def _ratio(sums):
    import numpy as np

    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sums[..., 1] > 0, sums[..., 0] / np.where(sums[..., 1] > 0, sums[..., 1], 1), np.nan)


def _exp_ratio(sums):
    import numpy as np

    return np.exp(np.minimum(_ratio(sums), 50.0))  # as perplexity is computed: exp(mean nll), capped


def _mean_of_ratios(sums):
    import numpy as np

    pairs = sums.reshape(*sums.shape[:-1], -1, 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(pairs[..., 1] > 0, pairs[..., 0] / np.where(pairs[..., 1] > 0, pairs[..., 1], 1), np.nan)
    present = ~np.isnan(ratios)
    counted = present.sum(axis=-1)
    total = np.where(present, ratios, 0.0).sum(axis=-1)
    return np.where(counted > 0, total / np.maximum(counted, 1), np.nan)


def _chrf(sums):
    import numpy as np

    from stages.lib.metrics import chrf_from_stats

    flat = sums.reshape(-1, sums.shape[-1])
    return np.array([chrf_from_stats(row) for row in flat]).reshape(sums.shape[:-1])


def _share(key: str) -> Metric:
    return Metric(key, "test", lambda r: (float(r.get(key) or 0), 1.0), _ratio, proportion=True)


def _field_pair(row: Mapping[str, Any], field: str) -> tuple[float, float]:
    value = (row.get("fields") or {}).get(field)
    return (0.0, 0.0) if value is None else (float(value), 1.0)


def metric_specs(scores: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[Metric]:
    """The metrics that the per-row results support (a metric not configured has no rows' data)."""
    test, probes, text = (list(scores.get(u) or []) for u in UNITS)
    specs: list[Metric] = []
    if test:
        first = test[0]
        if "exact_match" in first:
            specs.append(_share("exact_match"))
        if "rouge_l" in first:
            specs.append(Metric("rouge_l", "test", lambda r: (float(r["rouge_l"]), 1.0), _ratio))
        if "chrf_stats" in first:
            specs.append(Metric("chrf", "test", lambda r: [float(x) for x in r["chrf_stats"]], _chrf))
        if "empty_output" in first:
            specs.append(Metric("empty_output_rate", "test", lambda r: (float(r["empty_output"]), 1.0),
                                _ratio, proportion=True))
        for key in ("json_valid", "schema_valid"):
            if key in first:
                specs.append(_share(key))
        fields = list(first.get("fields") or {})
        for field in fields:
            specs.append(Metric(f"field_accuracy.{field}", "test",
                                lambda r, f=field: _field_pair(r, f), _ratio, proportion=True))
        if fields:
            specs.append(Metric("field_accuracy_mean", "test",
                                lambda r: [x for f in fields for x in _field_pair(r, f)], _mean_of_ratios))
        if any(r.get("loss_tokens") for r in test):
            def loss_pair(r):
                return (float(r.get("loss_sum") or 0.0), float(r.get("loss_tokens") or 0))
            specs += [Metric("loss", "test", loss_pair, _ratio),
                      Metric("perplexity", "test", loss_pair, _exp_ratio)]
    if probes:
        specs.append(Metric("general_accuracy", "probes", lambda r: (float(r["passed"]), 1.0), _ratio,
                            proportion=True))
    if text:
        specs.append(Metric("general_perplexity", "text",
                            lambda r: (float(r["nll_sum"]), float(r["tokens"])), _exp_ratio))
    return specs


def wilson(passed: float, counted: float, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval for the proportion passed / counted."""
    if counted <= 0:
        return math.nan, math.nan
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = passed / counted
    denominator = 1 + z * z / counted
    centre = (p + z * z / (2 * counted)) / denominator
    half = z * math.sqrt(p * (1 - p) / counted + z * z / (4 * counted * counted)) / denominator
    # Exact at the ends (none or all passed), where rounding would leave a residue such as 3e-17.
    low = 0.0 if passed <= 0 else max(0.0, centre - half)
    high = 1.0 if passed >= counted else min(1.0, centre + half)
    return low, high


def _matrix(rows: Sequence[Mapping[str, Any]], metric: Metric):
    import numpy as np

    return np.array([list(metric.values(r)) for r in rows], dtype=np.float64)


def _resample_counts(n: int, rng, resamples: int):
    """How often each of n rows is drawn in each resample: shape (resamples, n)."""
    import numpy as np

    if n == 0:
        return np.zeros((resamples, 0))
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def _aligned(old: Sequence[Mapping], new: Sequence[Mapping]) -> tuple[list[Mapping], list[Mapping]]:
    """The rows both sides have, matched by id, in id order (independent of file order)."""
    old_by_id = {r["id"]: r for r in old}
    new_by_id = {r["id"]: r for r in new}
    common = sorted(set(old_by_id) & set(new_by_id), key=str)
    return [old_by_id[i] for i in common], [new_by_id[i] for i in common]


def _interval(samples, confidence: float) -> tuple[float, float]:
    import numpy as np

    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return math.nan, math.nan
    tail = (1 - confidence) / 2
    low, high = np.quantile(finite, [tail, 1 - tail])
    return float(low), float(high)


def _entry(value: float, low: float, high: float) -> dict[str, float] | None:
    if not all(math.isfinite(x) for x in (value, low, high)):
        return None
    return {"value": round(value, NDIGITS), "lower": round(low, NDIGITS), "upper": round(high, NDIGITS)}


def _single(metric: Metric, matrix, counts, confidence: float) -> dict[str, float] | None:
    import numpy as np

    if matrix.shape[0] == 0:
        return None
    totals = matrix.sum(axis=0)
    value = float(metric.combine(totals))
    if metric.proportion:
        low, high = wilson(totals[0], totals[1], confidence)
    else:
        low, high = _interval(np.asarray(metric.combine(counts @ matrix)), confidence)
    return _entry(value, low, high)


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for name, value in flat.items():
        if value is None:
            continue
        *parents, last = name.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return nested


def summarise(scores: Mapping[str, Sequence[Mapping[str, Any]]], *, confidence: float = CONFIDENCE,
              resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, Any]:
    """One model's metrics, each {"value", "lower", "upper"}; nested like reports/eval.json."""
    import numpy as np

    rng = np.random.default_rng(seed)
    counts = {u: _resample_counts(len(scores.get(u) or []), rng, resamples) for u in UNITS}
    flat = {m.name: _single(m, _matrix(scores[m.unit], m), counts[m.unit], confidence)
            for m in metric_specs(scores)}
    return _nest(flat)


def compare_scores(old: Mapping[str, Sequence[Mapping[str, Any]]],
                   new: Mapping[str, Sequence[Mapping[str, Any]]], *, confidence: float = CONFIDENCE,
                   resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, Any]:
    """Two models scored on the same rows: {"old", "new", "delta" (new − old), "n"}.

    Only rows both have (by id) are used; "n" says how many per unit. Each metric is
    {"value", "lower", "upper"}; a delta interval comes from the paired bootstrap.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    aligned = {u: _aligned(old.get(u) or [], new.get(u) or []) for u in UNITS}
    counts = {u: _resample_counts(len(aligned[u][0]), rng, resamples) for u in UNITS}
    old_rows = {u: aligned[u][0] for u in UNITS}
    new_rows = {u: aligned[u][1] for u in UNITS}
    specs = {m.name: m for m in metric_specs(old_rows)}
    flat_old, flat_new, flat_delta = {}, {}, {}
    for spec in metric_specs(new_rows):
        if spec.name not in specs:
            continue
        unit_counts = counts[spec.unit]
        old_matrix, new_matrix = _matrix(old_rows[spec.unit], spec), _matrix(new_rows[spec.unit], spec)
        if old_matrix.shape != new_matrix.shape or old_matrix.shape[0] == 0:
            continue  # e.g. chrF statistics of another length: not comparable
        flat_old[spec.name] = _single(spec, old_matrix, unit_counts, confidence)
        flat_new[spec.name] = _single(spec, new_matrix, unit_counts, confidence)
        value = float(spec.combine(new_matrix.sum(axis=0)) - spec.combine(old_matrix.sum(axis=0)))
        samples = np.asarray(spec.combine(unit_counts @ new_matrix)) - np.asarray(spec.combine(unit_counts @ old_matrix))
        flat_delta[spec.name] = _entry(value, *_interval(samples, confidence))
    return {"old": _nest(flat_old), "new": _nest(flat_new), "delta": _nest(flat_delta),
            "n": {u: len(aligned[u][0]) for u in UNITS if aligned[u][0]}}


def verdict(metric: str, interval: Mapping[str, float]) -> str:
    """better / worse / no detectable change: whether the interval of a difference excludes 0.

    `metric` is the metric's name (a dotted name's last part decides nothing: field accuracies are
    higher-is-better); lower is better for loss, perplexities and empty_output_rate.
    """
    lower, upper = interval["lower"], interval["upper"]
    lower_is_better = metric.split(".")[0] in LOWER_IS_BETTER
    if lower > 0:
        return WORSE if lower_is_better else BETTER
    if upper < 0:
        return BETTER if lower_is_better else WORSE
    return NO_CHANGE


def leaves(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Mapping[str, float]]:
    """{"field_accuracy": {"category": {value, lower, upper}}} -> {"field_accuracy.category": {...}}."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping) and "value" in value:
            flat[f"{prefix}{key}"] = value
        elif isinstance(value, Mapping):
            flat.update(leaves(value, f"{prefix}{key}."))
    return flat
