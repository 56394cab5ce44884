"""Progress bars for the data stages: tqdm on a terminal, a silent counter anywhere else.

tqdm draws nothing when stderr is not a terminal (disable=None), as under CI or with the output
sent to a file; in that case it is not even imported, which saves ~50 ms of start-up per stage
(a stage on 100k rows takes 2-3 s in all).
"""
from __future__ import annotations

import sys
from typing import Optional


class _Silent:
    """The part of tqdm's interface the stages use, doing nothing but count."""

    def __init__(self) -> None:
        self.n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        pass

    def __enter__(self) -> "_Silent":
        return self

    def __exit__(self, *exc) -> None:
        return None


def progress_bar(desc: str, total: Optional[int] = None, unit: str = " rows"):
    if not sys.stderr.isatty():
        return _Silent()
    from tqdm import tqdm

    return tqdm(desc=desc, total=total, unit=unit, file=sys.stderr, mininterval=1)
