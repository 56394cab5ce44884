"""Ordered parallel map (stages/lib/parallel.py)."""
from __future__ import annotations

import functools
import os

import pytest

from stages.lib import parallel


def _square_after(value: int, fail_at: int | None = None) -> tuple[int, int]:
    if value == fail_at:
        raise ValueError(f"bad item {value}")
    return value * value, os.getpid()


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_results_come_back_in_input_order(workers):
    results = list(parallel.ordered_map(_square_after, range(50), workers))
    assert [square for square, _ in results] == [v * v for v in range(50)]
    pids = {pid for _, pid in results}
    assert (pids == {os.getpid()}) if workers == 1 else (os.getpid() not in pids)


def test_an_error_is_raised_at_its_place_in_the_order():
    seen = []
    with pytest.raises(ValueError, match="bad item 7"):
        for square, _ in parallel.ordered_map(functools.partial(_square_after, fail_at=7), range(40), 2):
            seen.append(square)
    assert seen == [v * v for v in range(7)]


def test_a_small_input_runs_in_this_process():
    results = list(parallel.ordered_map(_square_after, [3], 4))
    assert results == [(9, os.getpid())]
    assert list(parallel.ordered_map(_square_after, [], 4)) == []


def test_worker_count_from_the_environment(monkeypatch):
    monkeypatch.setenv("QLORA_DVC_WORKERS", "3")
    assert parallel.default_workers() == 3
    monkeypatch.setenv("QLORA_DVC_WORKERS", "0")
    assert parallel.default_workers() == 1
    monkeypatch.setenv("QLORA_DVC_WORKERS", "many")
    with pytest.raises(ValueError, match="QLORA_DVC_WORKERS must be a whole number"):
        parallel.default_workers()
    monkeypatch.delenv("QLORA_DVC_WORKERS")
    assert 1 <= parallel.default_workers() <= 8
