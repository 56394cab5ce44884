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


def _lookup_raw(report: dict, dotted: str):
    value = report
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


def _lookup(report: dict, dotted: str):
    """The value at a dotted path ("tuned.field_accuracy.category"); KeyError if absent.

    A metric with an interval is {"value", "lower", "upper"}: its bare name means its value, so
    `delta.general_accuracy >= -0.25` and `delta.general_accuracy.lower >= -0.25` both work."""
    value = _lookup_raw(report, dotted)
    if isinstance(value, dict) and "value" in value:
        value = value["value"]
    return value


def _leaves(report: dict, prefix: str = "") -> list[str]:
    names = []
    for key, value in report.items():
        if isinstance(value, dict):
            if "value" in value:
                names.append(f"{prefix}{key}")
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
    """ " (base 0.05, delta 0.85 [0.7, 0.95])" for a tuned.* metric: the other sides of
    base/tuned/delta, and the interval of the metric when it has one."""
    side, _, rest = metric.partition(".")
    if side not in ("base", "tuned", "delta") or not rest:
        return ""
    for bound in (".value", ".lower", ".upper"):
        if rest.endswith(bound):
            rest = rest[: -len(bound)]
    others = []
    for other in ("base", "tuned", "delta"):
        try:
            value = _lookup(report, f"{other}.{rest}")
        except KeyError:
            continue
        try:
            entry = _lookup_raw(report, f"{other}.{rest}")
            interval = f" [{_fmt(entry['lower'])}, {_fmt(entry['upper'])}]" if isinstance(entry, dict) else ""
        except (KeyError, TypeError):
            interval = ""
        if other == side and not interval:
            continue
        others.append(f"{other} {_fmt(value)}{interval}")
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
