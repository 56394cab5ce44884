"""The pull-request summary's "Preference" section: the LLM judge (reports/judge.json) and blind
human preference (reports/prefs.json), tuned vs base, each rate with its 95 % interval, next to
the same figure at the base revision. Pure: reports in, markdown out."""
from __future__ import annotations

from typing import Any, Mapping

JUDGE_REPORT = "reports/judge.json"
PREFS_REPORT = "reports/prefs.json"


def _rate(share: Any) -> str:
    if not isinstance(share, Mapping) or share.get("rate") is None:
        return "—"
    if share.get("lower") is None:
        return f"{share['rate']:.2f}"
    return f"{share['rate']:.2f} [{share['lower']:.2f}, {share['upper']:.2f}]"


def _win_at_base(report: Mapping | None) -> str:
    if not report or report.get("enabled") is False or not report.get("rows", report.get("judgements")):
        return "—"
    return _rate(report.get("win"))


def preference_section(judge: Mapping | None, prefs: Mapping | None, judge_at_base: Mapping | None,
                       prefs_at_base: Mapping | None, base_label: str, judge_model: str | None = None) -> str:
    """Markdown for the PR summary; says plainly when the judge is off or nobody has judged."""
    header = ["| judged by | tuned wins [95 % CI] | ties | tuned loses | not counted | "
              f"position flips | tuned wins @ `{base_label}` |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    rows, notes = [], []
    if judge and judge.get("enabled") and judge.get("rows"):
        flips = (judge.get("position_bias") or {}).get("flip_rate")
        who = f"LLM judge `{judge_model}`" if judge_model else "LLM judge"
        rows.append(f"| {who}, {judge['rows']} rows × 2 orders | {_rate(judge.get('win'))} | "
                    f"{_rate(judge.get('tie'))} | {_rate(judge.get('loss'))} | "
                    f"{(judge.get('unparsable') or {}).get('count', 0)} unparsable | {_rate(flips)} | "
                    f"{_win_at_base(judge_at_base)} |")
    else:
        notes.append("LLM judge: off (`evaluate.judge.enabled: false`; README, \"Judging what metrics cannot\").")
    if prefs and prefs.get("judgements"):
        rows.append(f"| people, blind: {prefs['judgements']} judgement(s) by {prefs.get('raters', 0)} rater(s) | "
                    f"{_rate(prefs.get('win'))} | {_rate(prefs.get('tie'))} | {_rate(prefs.get('loss'))} | "
                    f"{prefs.get('skipped', 0)} skipped, {prefs.get('stale', 0)} stale | — | "
                    f"{_win_at_base(prefs_at_base)} |")
    else:
        notes.append("Blind human preference: no judgements of the current answers yet (`qlora-dvc prefs`).")
    lines = header + rows if rows else []
    if lines:
        lines.append("")
    return "\n".join(lines + notes)
