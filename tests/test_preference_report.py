"""The PR summary's preference section: the LLM judge's and blind raters' win rates with intervals,
and the judge's win rate at the base revision (pure, then through `qlora-dvc pr-report` on a real
git + DVC repository)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from qlora_dvc.preference_report import preference_section
from qlora_dvc.pr_report import dvc_executable
from stages.lib.pairing import share

PROJECT = Path(__file__).resolve().parents[1]


def judge_report(wins, ties, losses, unparsable=0, flips=1):
    rows = wins + ties + losses + unparsable
    return {"enabled": True, "rows": rows, "judgements": 2 * rows, "unparsable_judgements": unparsable,
            "win": share(wins, rows), "tie": share(ties, rows), "loss": share(losses, rows),
            "unparsable": share(unparsable, rows),
            "position_bias": {"flip_rate": share(flips, rows - unparsable), "first_shown_rate": share(5, 10)}}


def prefs_report(wins, ties, losses):
    n = wins + ties + losses
    return {"judgements": n, "rows_judged": n, "rows": 32, "raters": 2, "skipped": 1, "stale": 3, "malformed": 0,
            "win": share(wins, n), "tie": share(ties, n), "loss": share(losses, n), "first_shown_rate": share(1, 2)}


def test_section_shows_rates_with_intervals_and_the_base_revision():
    text = preference_section(judge_report(20, 8, 3, unparsable=1), prefs_report(7, 2, 1),
                              judge_report(10, 10, 12), None, "main", "qwen2.5-7b-instruct")
    judge_row = next(line for line in text.splitlines() if line.startswith("| LLM judge"))
    assert judge_row == ("| LLM judge `qwen2.5-7b-instruct`, 32 rows × 2 orders | 0.62 [0.45, 0.77] | 0.25 [0.13, 0.42] "
                         "| 0.09 [0.03, 0.24] | 1 unparsable | 0.03 [0.01, 0.16] | 0.31 [0.18, 0.49] |")
    people = next(line for line in text.splitlines() if line.startswith("| people"))
    assert people.startswith("| people, blind: 10 judgement(s) by 2 rater(s) | 0.70 [0.40, 0.89] |")
    assert "1 skipped, 3 stale" in people and people.endswith("| — |")


def test_section_says_when_the_judge_is_off_and_nobody_judged():
    text = preference_section({"enabled": False}, prefs_report(0, 0, 0), None, None, "main")
    assert "LLM judge: off" in text and "no judgements of the current answers yet" in text
    assert "|" not in text


def _sh(cmd, cwd):
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_TERMINAL_PROMPT": "0"})
    assert done.returncode == 0, f"{cmd}: {done.stdout}\n{done.stderr}"
    return done


def test_pr_report_has_the_preference_section(tmp_path):
    dvc = dvc_executable()
    _sh(["git", "init", "-q", "-b", "main"], tmp_path)
    for key, value in (("user.name", "t"), ("user.email", "t@t"), ("commit.gpgsign", "false")):
        _sh(["git", "config", key, value], tmp_path)
    _sh([dvc, "init", "-q"], tmp_path)
    reports = tmp_path / "reports"
    reports.mkdir()
    (tmp_path / "params.yaml").write_text("evaluate:\n  judge:\n    model: stand-in\n")
    (tmp_path / "dvc.yaml").write_text("metrics:\n  - reports/eval.json\n  - reports/judge.json\n")
    (reports / "eval.json").write_text(json.dumps({"base": {"json_valid": 0.1}, "tuned": {"json_valid": 0.9}}))
    (reports / "judge.json").write_text(json.dumps(judge_report(4, 2, 2)))
    _sh(["git", "add", "-A"], tmp_path)
    _sh(["git", "commit", "-qm", "base"], tmp_path)
    (reports / "judge.json").write_text(json.dumps(judge_report(7, 1, 0)))
    (reports / "prefs.json").write_text(json.dumps(prefs_report(3, 0, 1)))

    done = subprocess.run([sys.executable, "-m", "qlora_dvc", "pr-report", "--base", "main", "--no-plots",
                           "--out", "summary.md"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(PROJECT)})
    assert done.returncode == 0, done.stderr
    summary = (tmp_path / "summary.md").read_text()
    assert "### Preference (tuned vs base)" in summary
    assert ("| LLM judge `stand-in`, 8 rows × 2 orders | 0.88 [0.53, 0.98] | 0.12 [0.02, 0.47] "
            "| 0.00 [0.00, 0.32] | 0 unparsable |") in summary
    assert summary.count("| 0.50 [0.22, 0.78] |") == 1     # the judge's win rate at main: 4 of 8
    assert "| people, blind: 4 judgement(s) by 2 rater(s) | 0.75 [0.30, 0.95] |" in summary
    # dvc metrics diff sees the judge's numbers too.
    assert "win.rate" in summary
