"""Pairing base and tuned answers, and the rates the judge and human preferences report."""
from __future__ import annotations

import pytest

from stages.lib.pairing import pair_rows, share


def test_pair_rows_joins_by_id_in_the_tuned_order():
    base = [{"id": "a", "prediction": "x"}, {"id": "b", "prediction": "y"}]
    tuned = [{"id": "b", "prompt": "q", "reference": "r", "prediction": "w"},
             {"id": "a", "prompt": "p", "prediction": "z"}]
    assert pair_rows(base, tuned) == [
        {"id": "b", "prompt": "q", "reference": "r", "base": "y", "tuned": "w"},
        {"id": "a", "prompt": "p", "reference": None, "base": "x", "tuned": "z"}]


def test_pair_rows_refuses_mismatched_predictions():
    base = [{"id": "a", "prediction": "x"}, {"id": "b", "prediction": "y"}]
    tuned = [{"id": "a", "prompt": "p", "prediction": "z"}]
    with pytest.raises(ValueError, match="different test rows"):
        pair_rows(base, tuned)


def test_share_rounds_rate_and_wilson_bounds():
    assert share(5, 10) == {"count": 5, "n": 10, "rate": 0.5, "lower": 0.2366, "upper": 0.7634}
    assert share(0, 10) == {"count": 0, "n": 10, "rate": 0.0, "lower": 0.0, "upper": 0.2775}


def test_share_of_nothing_has_no_rate_nor_interval():
    # JSON null in the reports, never NaN (which strict JSON readers refuse).
    assert share(0, 0) == {"count": 0, "n": 0, "rate": None, "lower": None, "upper": None}
