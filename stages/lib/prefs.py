"""Blind human preference: the judgement records `qlora-dvc prefs` appends, and the win rates the
`prefs` stage makes of them.

A judgement records which model's answer was shown as A (the page never tells the rater), the
key pressed, and a fingerprint of the two answers it saw. The stage counts only judgements whose
fingerprint matches the current predictions: after a new adapter the old judgements are about
answers that no longer exist, and are reported as stale instead of being counted.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping, Sequence

from stages.lib.io import parse_jsonl_lines
from stages.lib.pairing import share

CHOICES = ("A", "B", "tie", "skip")


def answers_fingerprint(base: str, tuned: str) -> str:
    """Names the exact pair of answers a rater saw (16 hex digits of a SHA-256)."""
    return hashlib.sha256(json.dumps([base, tuned], ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def preferred_model(choice: str, shown_first: str) -> str | None:
    """'base', 'tuned' or 'tie' from the key pressed and which model was shown as A; None for skip."""
    if choice not in CHOICES:
        raise ValueError(f"unknown choice {choice!r}; expected one of {', '.join(CHOICES)}")
    if shown_first not in ("base", "tuned"):
        raise ValueError(f"shown_first must be 'base' or 'tuned', got {shown_first!r}")
    if choice == "skip":
        return None
    if choice == "tie":
        return "tie"
    other = "tuned" if shown_first == "base" else "base"
    return shown_first if choice == "A" else other


def judgement_record(row_id: str, fingerprint: str, shown_first: str, choice: str, rater: str,
                     at: str) -> dict:
    return {"id": row_id, "answers": fingerprint, "shown_first": shown_first, "choice": choice,
            "preferred": preferred_model(choice, shown_first), "rater": rater, "at": at}


def summarize_prefs(judgements: Iterable[Mapping[str, Any]], pairs: Sequence[Mapping[str, Any]]) -> dict:
    """Win / tie / loss of the tuned model over the current rows, with 95 % Wilson intervals.

    Per rater and row the latest judgement counts (a rater may change their mind); skips are
    reported, not counted; judgements of answers that changed since are stale."""
    current = {p["id"]: answers_fingerprint(p["base"], p["tuned"]) for p in pairs}
    latest: dict[tuple[str, str], Mapping] = {}
    stale = malformed = 0
    for j in judgements:
        if not isinstance(j, Mapping) or j.get("choice") not in CHOICES or "id" not in j:
            malformed += 1
            continue
        if current.get(j["id"]) != j.get("answers"):
            stale += 1
            continue
        latest[(str(j.get("rater", "")), j["id"])] = j   # later lines win
    counted = [j for j in latest.values() if j["choice"] != "skip"]
    preferred = [preferred_model(j["choice"], j["shown_first"]) for j in counted]
    n = len(counted)
    shown_first_won = sum(j["choice"] == "A" for j in counted)
    decisive = sum(j["choice"] in ("A", "B") for j in counted)
    return {
        "judgements": n,
        "rows_judged": len({j["id"] for j in counted}),
        "rows": len(pairs),
        "raters": len({j.get("rater", "") for j in counted}),
        "skipped": sum(1 for j in latest.values() if j["choice"] == "skip"),
        "stale": stale,
        "malformed": malformed,
        "win": share(preferred.count("tuned"), n),
        "tie": share(preferred.count("tie"), n),
        "loss": share(preferred.count("base"), n),
        # Humans have position bias too; sides are random, so this should hover around 0.5.
        "first_shown_rate": share(shown_first_won, decisive),
    }


def read_judgements(lines: Iterable[str]) -> list[Any]:
    """Parse the judgements file; a line that is not JSON is kept as None (counted malformed),
    so one bad edit cannot hide the rest."""
    return list(parse_jsonl_lines(lines, malformed_as_none=True))
