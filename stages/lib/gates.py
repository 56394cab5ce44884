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


def _lookup(report: dict, dotted: str):
    """The value at a dotted path ("tuned.field_accuracy.category"); KeyError if absent."""
    value = report
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


def _leaves(report: dict, prefix: str = "") -> list[str]:
    names = []
    for key, value in report.items():
        if isinstance(value, dict):
            names += _leaves(value, f"{prefix}{key}.")
        else:
            names.append(f"{prefix}{key}")
    return names


def _fmt(value) -> str:
    if isinstance(value, float):
        return str(round(value, 4))
    return repr(value) if isinstance(value, str) else str(value)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _context(report: dict, metric: str) -> str:
    """ " (base 0.05)" for a tuned.* metric; the other two sides of base/tuned/delta otherwise."""
    side, _, rest = metric.partition(".")
    if side not in ("base", "tuned", "delta") or not rest:
        return ""
    others = []
    for other in ("base", "tuned", "delta"):
        if other == side:
            continue
        try:
            others.append(f"{other} {_fmt(_lookup(report, f'{other}.{rest}'))}")
        except KeyError:
            pass
    return f" ({', '.join(others)})" if others else ""


def check_gates(gate_texts: list[str], report: dict) -> list[str]:
    """Check `evaluate.gates` against the reports/eval.json layout; return one message per failure.

    A metric that is not in the report (a typo, or a metric that is not configured) is a failure,
    never a silent pass: a gate that cannot be checked protects nothing.
    """
    import difflib

    failures = []
    known = [name for name in _leaves(report) if _is_number(_lookup(report, name))]
    for text in gate_texts:
        try:
            gate = parse_gate(text)
        except ValueError as exc:
            failures.append(str(exc))
            continue
        try:
            value = _lookup(report, gate.metric)
        except KeyError:
            hint = difflib.get_close_matches(gate.metric, known, n=1)
            failures.append(f"gate {text!r}: metric {gate.metric!r} not in reports/eval.json"
                            + (f" (did you mean {hint[0]!r}?)" if hint else "")
                            + f"; known: {', '.join(known) or '(none)'}")
            continue
        if not _is_number(value):
            failures.append(f"gate {text!r}: {gate.metric} is not a number ({_fmt(value)}); "
                            f"known: {', '.join(known) or '(none)'}")
            continue
        if not _OPS[gate.op](value, gate.threshold):
            failures.append(f"gate {text!r} failed: {gate.metric} = {_fmt(value)}"
                            + _context(report, gate.metric))
    return failures
