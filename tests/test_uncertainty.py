"""Intervals and verdicts: the point values are the metrics', and the intervals cover the truth.

The coverage tests draw many synthetic evaluations from a population whose true values are known
and count how often the 95 % intervals contain them: about 95 % of seeded trials must.
"""
import math
import random

import numpy as np
import pytest

from stages.lib.gates import check_gates
from stages.lib.metrics import probe_row_scores, row_scores, task_metrics
from stages.lib.uncertainty import (BETTER, NO_CHANGE, WORSE, compare_scores, leaves, summarise,
                                    verdict, wilson)

SCHEMA = {"type": "object", "required": ["category"], "properties": {"category": {"type": "string"}}}
SETTINGS = {"json_schema": SCHEMA, "json_fields": ["category", "priority"]}
REFS = ['{"category": "billing", "priority": "low"}', '{"category": "bug", "priority": "high"}',
        '{"category": "bug"}', "plain answer", '{"category": "account", "priority": "urgent"}']
PREDS = ['{"category": "billing", "priority": "high"}', 'oops {"category": "bug"}',
         '{"category": "bug", "priority": "low"}', "plain   answer", ""]
PROBES = [{"id": "p1", "accept": ["paris"]}, {"id": "p2", "accept": ["4"]}, {"id": "p3", "accept": ["blue"]}]


def _scores(preds, probe_outputs=("Paris.", "40", "blue sky")):
    rows = row_scores(preds, REFS, SETTINGS, ids=[f"r{i}" for i in range(len(preds))])
    for i, row in enumerate(rows):
        row["loss_sum"], row["loss_tokens"] = 2.0 + i, 4 + i
    text = [{"id": "block-0000", "nll_sum": 64.0, "tokens": 32}, {"id": "block-0001", "nll_sum": 40.0, "tokens": 20}]
    return {"test": rows, "probes": probe_row_scores(list(probe_outputs), PROBES), "text": text}


def test_point_values_are_the_metrics_values():
    summary = summarise(_scores(PREDS))
    expected = task_metrics(PREDS, REFS, SETTINGS, probe_outputs=["Paris.", "40", "blue sky"], probes=PROBES)
    flat = leaves(summary)
    for name, value in expected.items():
        if name == "field_accuracy":
            for field, field_value in value.items():
                assert flat[f"field_accuracy.{field}"]["value"] == pytest.approx(field_value, abs=1e-4)
        elif value is not None:
            assert flat[name]["value"] == pytest.approx(value, abs=1e-4), name
    assert flat["loss"]["value"] == pytest.approx(sum(2.0 + i for i in range(5)) / sum(4 + i for i in range(5)), abs=1e-4)
    assert flat["general_perplexity"]["value"] == pytest.approx(np.exp(104 / 52), abs=1e-3)
    for entry in flat.values():
        assert entry["lower"] <= entry["value"] <= entry["upper"]


def test_wilson_interval_known_values():
    # Wilson (1927) / Newcombe (1998) worked values: 0 of 32 -> [0, 0.1072]; 81 of 263 -> [0.2553, 0.3662].
    low, high = wilson(0, 32)
    assert low == 0.0 and high == pytest.approx(0.1072, abs=1e-4)
    low, high = wilson(81, 263)
    assert (low, high) == (pytest.approx(0.2553, abs=1e-4), pytest.approx(0.3662, abs=1e-4))


def test_wilson_interval_more_known_values():
    low, high = wilson(5, 10)
    assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)
    low, high = wilson(0, 10)
    assert low == 0.0 and round(high, 4) == 0.2775
    assert all(math.isnan(bound) for bound in wilson(0, 0))


@pytest.mark.parametrize("k, n", [(1, 31), (7, 8), (20, 32), (0, 5), (64, 64)])
def test_wilson_interval_agrees_with_scipy(k, n):
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(method="wilson")
    assert wilson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_deterministic_and_independent_of_row_order():
    old, new = _scores(PREDS), _scores(REFS, ("no", "4", "red"))
    first = compare_scores(old, new)
    shuffled = {unit: random.Random(3).sample(rows, len(rows)) for unit, rows in new.items()}
    assert compare_scores(old, shuffled) == first == compare_scores(old, new)


def test_only_common_rows_are_compared():
    old, new = _scores(PREDS), _scores(REFS)
    new["test"] = new["test"][:3]
    compared = compare_scores(old, new)
    assert compared["n"]["test"] == 3
    assert compared["old"]["exact_match"]["value"] == pytest.approx(task_metrics(PREDS[:3], REFS[:3], {})["exact_match"])


# --- coverage on synthetic data with a known effect -----------------------------------------------

# Paired outcomes of one binary metric: (base, tuned) = (1,1), (1,0), (0,1), (0,0) with these
# probabilities. True base share 0.40, tuned 0.55, delta +0.15.
EFFECT = (0.30, 0.10, 0.25, 0.35)
# No effect: as many rows flip up as down. True base = tuned = 0.40, delta 0.
NO_EFFECT = (0.30, 0.10, 0.10, 0.50)
PAIRS = ((1, 1), (1, 0), (0, 1), (0, 0))
TRIALS = 200


def _synthetic(rng, probabilities, n, rouge_shift):
    kinds = rng.choice(4, size=n, p=probabilities)
    # A continuous per-row metric as well: base ~ U(0.2, 0.6) (mean 0.4), tuned = base + shift + noise.
    base_rouge = rng.uniform(0.2, 0.6, size=n)
    tuned_rouge = base_rouge + rouge_shift + rng.normal(0, 0.1, size=n)
    old = [{"id": f"r{i:04d}", "exact_match": PAIRS[k][0], "rouge_l": float(b)}
           for i, (k, b) in enumerate(zip(kinds, base_rouge))]
    new = [{"id": f"r{i:04d}", "exact_match": PAIRS[k][1], "rouge_l": float(t)}
           for i, (k, t) in enumerate(zip(kinds, tuned_rouge))]
    return {"test": old}, {"test": new}


def _covers(entry, truth):
    return entry["lower"] <= truth <= entry["upper"]


def test_intervals_cover_the_truth_about_95_percent_of_the_time():
    rng = np.random.default_rng(12345)
    hits = {"old.exact_match": 0, "new.exact_match": 0, "delta.exact_match": 0,
            "old.rouge_l": 0, "delta.rouge_l": 0}
    truth = {"old.exact_match": 0.40, "new.exact_match": 0.55, "delta.exact_match": 0.15,
             "old.rouge_l": 0.40, "delta.rouge_l": 0.10}
    for trial in range(TRIALS):
        old, new = _synthetic(rng, EFFECT, n=120, rouge_shift=0.10)
        compared = compare_scores(old, new, resamples=1000, seed=trial)
        for key in hits:
            side, metric = key.split(".")
            hits[key] += _covers(compared[side][metric], truth[key])
    coverage = {key: count / TRIALS for key, count in hits.items()}
    # 200 trials: the standard error of a 95 % coverage is 1.5 points.
    for key, value in coverage.items():
        assert 0.91 <= value <= 0.985, f"{key}: coverage {value:.3f}"


def test_zero_effect_is_no_detectable_change():
    rng = np.random.default_rng(777)
    verdicts = []
    for trial in range(TRIALS):
        old, new = _synthetic(rng, NO_EFFECT, n=120, rouge_shift=0.0)
        compared = compare_scores(old, new, resamples=1000, seed=trial)
        verdicts += [verdict("exact_match", compared["delta"]["exact_match"]),
                     verdict("rouge_l", compared["delta"]["rouge_l"])]
    share = verdicts.count(NO_CHANGE) / len(verdicts)
    assert share >= 0.91, f"only {share:.3f} of zero-effect comparisons said {NO_CHANGE!r}"
    # Identical outputs: the difference is exactly zero, with no spread.
    old, _ = _synthetic(np.random.default_rng(1), NO_EFFECT, n=32, rouge_shift=0.0)
    same = compare_scores(old, old)
    assert same["delta"]["exact_match"] == {"value": 0.0, "lower": 0.0, "upper": 0.0}
    assert all(verdict(name, entry) == NO_CHANGE for name, entry in leaves(same["delta"]).items())


def test_a_clear_effect_is_better_or_worse_by_direction():
    old, new = _synthetic(np.random.default_rng(5), (0.1, 0.0, 0.6, 0.3), n=64, rouge_shift=0.2)
    compared = compare_scores(old, new)
    assert verdict("exact_match", compared["delta"]["exact_match"]) == BETTER
    assert verdict("rouge_l", compared["delta"]["rouge_l"]) == BETTER
    reverse = compare_scores(new, old)
    assert verdict("exact_match", reverse["delta"]["exact_match"]) == WORSE
    # Lower is better for loss: a falling loss is "better".
    assert verdict("loss", {"value": -0.5, "lower": -0.7, "upper": -0.2}) == BETTER
    assert verdict("empty_output_rate", {"value": 0.2, "lower": 0.1, "upper": 0.3}) == WORSE


def test_gates_read_interval_bounds():
    old, new = _scores(PREDS), _scores(REFS)
    compared = compare_scores(old, new)
    report = {"base": compared["old"], "tuned": compared["new"], "delta": compared["delta"]}
    lower = report["delta"]["general_accuracy"]["lower"]
    assert check_gates([f"delta.general_accuracy.lower >= {lower}", "tuned.json_valid >= 0.5",
                        "delta.json_valid.upper > 0"], report) == []
    [message] = check_gates([f"delta.general_accuracy.lower >= {lower + 0.01}"], report)
    assert "delta.general_accuracy.lower" in message and "[" in message  # the interval is shown
