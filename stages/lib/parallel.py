"""Ordered parallel map over batches, in worker processes.

The data stages split their work into batches of a few thousand records whose results are
independent (hashes, signatures, cleaned lines). Worker processes (forked, so nothing is
re-imported) do the batches; the parent reads the input, hands batches out and takes results
back in input order whatever the scheduling, so outputs stay byte-identical run to run and
identical to a single-process run (tests/test_parallel.py).

Shutdown: when the stage fails or is terminated (an exception, SIGTERM turned into one by
stages/lib/stage.py, Ctrl-C), the workers are terminated at once instead of finishing their
batches; and each worker asks the kernel to kill it when its parent dies (PR_SET_PDEATHSIG), so
a SIGKILLed stage leaves no worker blocked on a queue nobody will ever fill
(tests/test_shutdown.py).
"""
from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
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


def _die_with_parent(parent: int) -> None:
    """Worker initializer: SIGKILL this worker when the stage process dies (Linux prctl
    PR_SET_PDEATHSIG; elsewhere a no-op), and leave SIGINT/SIGTERM to the default action, the
    parent being the one that turns them into a clean shutdown."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C reaches the whole group: the parent handles it
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)        # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):   # pragma: no cover - not Linux
        pass
    if os.getppid() != parent:   # the parent died before the prctl took effect
        os._exit(1)


def _terminate(pool: ProcessPoolExecutor) -> None:
    """Stop the workers now. ProcessPoolExecutor has no terminate(); its process table
    (`_processes`, pid -> Process) is what shutdown itself walks. Then release queues and threads."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=5)
    # wait=True: the executor's manager thread sees the dead workers, fails what was pending and
    # exits, closing its pipes itself (with wait=False its exit hook can write to a closed pipe).
    pool.shutdown(wait=True, cancel_futures=True)


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
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_die_with_parent,
                               initargs=(os.getpid(),))
    pending: deque = deque()
    try:
        for item in itertools.chain(head, items):
            pending.append(pool.submit(function, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BaseException:
        # A failure, a signal turned into an exception, or the consumer giving up (GeneratorExit):
        # the remaining batches are of no use, so the workers stop now.
        _terminate(pool)
        raise
    pool.shutdown(wait=True)
