"""Evaluation gates: "tuned.format_valid >= 0.9" style rules checked against reports/eval.json."""
from __future__ import annotations

import operator
import re
from typing import NamedTuple

_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq}
_GATE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(>=|<=|==|>|<)\s*(-?\d+(?:\.\d*)?(?:[eE]-?\d+)?)\s*$")


class Gate(NamedTuple):
    metric: str
    op: str
    threshold: float


def parse_gate(text: str) -> Gate:
    match = _GATE.match(text)
    if not match:
        raise ValueError(f"gate {text!r} is not of the form '<metric> <op> <number>', "
                         "e.g. 'tuned.format_valid >= 0.9'")
    return Gate(match[1], match[2], float(match[3]))
