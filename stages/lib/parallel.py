"""Ordered parallel map over batches, in worker processes.

The data stages split their work into batches of a few thousand records whose results are
independent (hashes, signatures, cleaned lines). Worker processes (forked, so nothing is
re-imported) do the batches; the parent reads the input, hands batches out and takes results
back in input order whatever the scheduling, so outputs stay byte-identical run to run and
identical to a single-process run (tests/test_parallel.py).
"""
from __future__ import annotations

import itertools
import multiprocessing
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Below this many batches the pool's start-up (a fork per worker) costs more than it saves.
MIN_BATCHES_FOR_WORKERS = 2


def default_workers() -> int:
    """Worker processes for batch work: the CPUs this process may use, at most 8 (QLORA_DVC_WORKERS
    in the environment overrides it; 1 means no worker processes)."""
    configured = os.environ.get("QLORA_DVC_WORKERS")
    if configured:
        try:
            return max(1, int(configured))
        except ValueError:
            raise ValueError(f"QLORA_DVC_WORKERS must be a whole number, not {configured!r}") from None
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        available = os.cpu_count() or 1
    return max(1, min(8, available))


def ordered_map(function: Callable[[T], R], items: Iterable[T], workers: Optional[int] = None) -> Iterator[R]:
    """`map(function, items)` run by `workers` processes, yielding results in input order.

    `function` and the items must pickle (a module-level function, or a functools.partial of one).
    At most 2 x workers items are in flight, so memory stays bounded on any input size; an
    exception in `function` is raised here, at that item's place in the order."""
    workers = default_workers() if workers is None else workers
    items = iter(items)
    head = []
    for item in items:   # look ahead: a small input is done here, without starting processes
        head.append(item)
        if len(head) >= MIN_BATCHES_FOR_WORKERS:
            break
    if workers <= 1 or len(head) < MIN_BATCHES_FOR_WORKERS:
        yield from map(function, head)
        yield from map(function, items)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        pending: deque = deque()
        try:
            for item in itertools.chain(head, items):
                pending.append(pool.submit(function, item))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
