"""The reviewer's tables: metrics as rows, intervals and verdicts, and the `qlora-dvc table` command."""
import json
import os
import subprocess
import sys
from pathlib import Path

from stages.lib.review import comparison_table, eval_table, point_comparison_table, to_markdown, verdict_counts

ROOT = Path(__file__).resolve().parents[1]
REPORT = {
    "base": {"json_valid": {"value": 0.0, "lower": 0.0, "upper": 0.1072},
             "loss": {"value": 2.12, "lower": 2.0, "upper": 2.3},
             "field_accuracy": {"category": {"value": 0.0, "lower": 0.0, "upper": 0.1072}}},
    "tuned": {"json_valid": {"value": 1.0, "lower": 0.8928, "upper": 1.0},
              "loss": {"value": 0.81, "lower": 0.7, "upper": 0.9},
              "field_accuracy": {"category": {"value": 0.25, "lower": 0.13, "upper": 0.42}}},
    "delta": {"json_valid": {"value": 1.0, "lower": 1.0, "upper": 1.0},
              "loss": {"value": -1.31, "lower": -1.5, "upper": -1.1},
              "field_accuracy": {"category": {"value": 0.25, "lower": -0.01, "upper": 0.41}}},
    "n": {"test": 32, "probes": 43},
}


def test_eval_table_has_metrics_as_rows_and_the_interval_columns():
    frame = eval_table(REPORT)
    assert list(frame.columns) == ["metric", "better", "base", "tuned", "delta", "95 % interval of delta", "verdict"]
    assert list(frame["metric"]) == ["json_valid", "loss", "field_accuracy.category"]
    rows = {r["metric"]: r for r in frame.to_dict("records")}
    assert rows["json_valid"]["base"] == "0.000 [0.000, 0.107]" and rows["json_valid"]["delta"] == "+1.000"
    assert rows["loss"]["better"] == "lower" and rows["loss"]["verdict"] == "🟢 better"  # loss fell
    assert rows["field_accuracy.category"]["verdict"] == "⚪ no detectable change"  # interval holds 0
    assert rows["field_accuracy.category"]["95 % interval of delta"] == "[-0.010, +0.410]"
    markdown = to_markdown(frame)
    assert markdown.splitlines()[0].startswith("| metric") and "+1.000" in markdown  # not re-parsed as 1.0


def test_old_reports_without_intervals_still_render():
    old = {"base": {"json_valid": 0.0}, "tuned": {"json_valid": 1.0}, "delta": {"json_valid": 1.0}}
    [row] = eval_table(old).to_dict("records")
    assert row["tuned"] == "1.000" and row["95 % interval of delta"] == "—" and row["verdict"] == "—"


def test_comparison_table_and_counts():
    compared = {"old": REPORT["base"], "new": REPORT["tuned"], "delta": REPORT["delta"]}
    frame = comparison_table(compared, "tuned @ main", "tuned (this PR)")
    assert list(frame.columns)[:3] == ["metric", "tuned @ main", "tuned (this PR)"]
    assert verdict_counts(frame) == {"better": 2, "no detectable change": 1}


def test_table_command(tmp_path):
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports/eval.json").write_text(json.dumps(REPORT))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "qlora_dvc", "table"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Rows: 32 test, 43 probes" in done.stdout and "| json_valid" in done.stdout
    assert "Wilson score interval" in done.stdout
    (tmp_path / "reports/eval.json").unlink()
    done = subprocess.run([sys.executable, "-m", "qlora_dvc", "table"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 1 and "does not exist; run `dvc repro` first" in done.stderr


def test_point_comparison_without_intervals():
    frame = point_comparison_table({"json_valid": 0.5, "loss": {"value": 1.2}}, REPORT["tuned"], "tuned @ main", "now")
    rows = {r["metric"]: r for r in frame.to_dict("records")}
    assert rows["json_valid"]["change"] == "+0.500" and rows["loss"]["change"] == "-0.390"
    assert rows["field_accuracy.category"]["tuned @ main"] == "—"
