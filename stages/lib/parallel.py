"""Ordered parallel map over batches, in threads.

The data stages' batch work is mostly numpy (hashing, MinHash, sorting), which releases the GIL:
while one thread is inside numpy, another can parse the next batch's JSON. Results come back in
input order whatever the scheduling, so outputs stay byte-identical run to run.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """Threads for batch work: the CPUs this process may use, at most 4 (beyond that the
    GIL-holding parts, JSON parsing and per-record Python, dominate)."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        available = os.cpu_count() or 1
    return max(1, min(4, available))


def ordered_map(function: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> Iterator[R]:
    """`map(function, items)` run by `workers` threads, yielding results in input order.

    At most 2 x workers items are in flight, so memory stays bounded on any input size; an
    exception in `function` is raised here, at that item's place in the order."""
    workers = default_workers() if workers is None else workers
    if workers <= 1:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="batch") as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append(pool.submit(function, item))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
