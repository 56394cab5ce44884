"""The pull-request summary on a real git + DVC repository with two commits."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qlora_dvc.pr_report import dvc_executable

PROJECT = Path(__file__).resolve().parents[1]

# The stage derives its metrics from params, so a param change is a metric change.
GEN = textwrap.dedent("""
    import json, os, yaml
    p = yaml.safe_load(open("params.yaml"))
    tuned = round(min(1.0, p["train"]["learning_rate"] * 1000), 4)
    os.makedirs("reports/plots", exist_ok=True)
    report = {"base": {"json_valid": 0.05, "loss": 2.5},
              "tuned": {"json_valid": tuned, "loss": 1.0},
              "delta": {"json_valid": round(tuned - 0.05, 4), "loss": -1.5},
              "n": {"test": 8, "probes": 4}}
    json.dump(report, open("reports/eval.json", "w"), indent=2)
    json.dump([{"metric": "json_valid (tuned)", "model": "tuned", "value": tuned}],
              open("reports/plots/eval_metrics.json", "w"))
""")

DVC_YAML = textwrap.dedent(f"""
    stages:
      evaluate:
        cmd: {sys.executable} gen.py
        deps: [gen.py]
        params: [train.learning_rate]
        metrics:
          - reports/eval.json:
              cache: false
        plots:
          - reports/plots/eval_metrics.json:
              cache: false
              template: bar_horizontal
              x: value
              y: metric
""")

PARAMS = "train:\n  learning_rate: {lr}\nevaluate:\n  gates:\n    - tuned.json_valid >= 0.7\n"


def sh(cmd, cwd, check=True):
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_TERMINAL_PROMPT": "0"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise AssertionError(f"{cmd} failed:\n{done.stdout}\n{done.stderr}")
    return done


def pr_report(cwd, *args):
    env = {**os.environ, "DVC_NO_ANALYTICS": "1",
           "PYTHONPATH": os.pathsep.join([str(PROJECT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "qlora_dvc", "pr-report", *args], cwd=cwd, env=env,
                          capture_output=True, text=True)


def git_init(path: Path):
    sh(["git", "init", "-q", "-b", "main"], path)
    for key, value in (("user.name", "test"), ("user.email", "test@example.com"), ("commit.gpgsign", "false")):
        sh(["git", "config", key, value], path)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    path = tmp_path_factory.mktemp("project")
    dvc = dvc_executable()
    git_init(path)
    sh([dvc, "init", "-q"], path)
    (path / "gen.py").write_text(GEN)
    (path / "dvc.yaml").write_text(DVC_YAML)
    (path / "params.yaml").write_text(PARAMS.format(lr=0.0005))
    sh([dvc, "repro", "-q"], path)
    sh(["git", "add", "-A"], path)
    sh(["git", "commit", "-q", "-m", "first"], path)
    first = sh(["git", "rev-parse", "HEAD"], path).stdout.strip()

    (path / "params.yaml").write_text(PARAMS.format(lr=0.0008))
    sh([dvc, "repro", "-q"], path)
    sh(["git", "add", "-A"], path)
    sh(["git", "commit", "-q", "-m", "second: higher learning rate"], path)
    return path, first


def test_summary_between_two_commits(repo):
    path, first = repo
    done = pr_report(path, "--base", first, "--out", "reports/pr_summary.md")
    assert done.returncode == 0, done.stderr
    summary = (path / "reports/pr_summary.md").read_text()

    # dvc metrics diff: tuned.json_valid went from 0.5 to 0.8.
    assert "tuned.json_valid" in summary and "0.5" in summary and "0.8" in summary
    assert "delta.json_valid" in summary
    # dvc params diff: the learning rate change.
    assert "train.learning_rate" in summary and "0.0005" in summary and "0.0008" in summary
    # Headline: base model, tuned, tuned - base, tuned at the base revision, change vs base revision.
    assert "| json_valid | higher | 0.0500 | 0.8000 | +0.7500 🟢 | 0.5000 | +0.3000 🟢 |" in summary
    assert "| loss | lower | 2.5000 | 1.0000 | -1.5000 🟢 | 1.0000 | +0.0000 |" in summary
    assert "Rows scored: test 8, probes 4." in summary
    assert "All 1 gate(s) pass" in summary
    # Plots: rendered by dvc plots diff and linked relative to the summary.
    assert "(pr_plots/index.html)" in summary
    assert (path / "reports/pr_plots/index.html").is_file()


def test_summary_against_same_revision_with_a_failing_gate(repo, tmp_path):
    path, _ = repo
    params = path / "params.yaml"
    original = params.read_text()
    params.write_text(original.replace("tuned.json_valid >= 0.7", "tuned.json_valid >= 0.99"))
    try:
        done = pr_report(path, "--base", "HEAD", "--out", str(tmp_path / "s.md"), "--no-plots",
                         "--note", "CI-sized run", "--metrics-file", "reports/eval.json")
    finally:
        params.write_text(original)
    assert done.returncode == 0, done.stderr
    summary = (tmp_path / "s.md").read_text()
    assert "> CI-sized run" in summary
    assert "No metric changed." in summary
    assert "| params.yaml | evaluate.gates |" in summary  # dvc diffs every key of params.yaml
    assert "### Plots" not in summary
    assert "1 of 1 gate(s) fail" in summary
    assert "tuned.json_valid = 0.8 (base 0.05, delta 0.75)" in summary


def test_unknown_base_revision(repo):
    path, _ = repo
    done = pr_report(path, "--base", "no-such-branch")
    assert done.returncode == 1
    assert "base revision 'no-such-branch' not found" in done.stderr


def test_not_a_git_repository(tmp_path):
    done = pr_report(tmp_path, "--base", "main")
    assert done.returncode == 1
    assert "not inside a git repository" in done.stderr


def test_no_metrics_yet(tmp_path):
    git_init(tmp_path)
    sh([dvc_executable(), "init", "-q"], tmp_path)
    sh(["git", "commit", "-q", "-m", "init"], tmp_path)
    done = pr_report(tmp_path, "--base", "main")
    assert done.returncode == 1
    assert "no metrics yet: reports/eval.json does not exist" in done.stderr
    assert not (tmp_path / "reports/pr_summary.md").exists()


def test_not_a_dvc_project(tmp_path):
    git_init(tmp_path)
    done = pr_report(tmp_path, "--base", "main")
    assert done.returncode == 1
    assert "not inside a DVC project" in done.stderr


def test_empty_dvc_table_means_nothing_changed():
    from qlora_dvc.pr_report import _table_or_none

    header = "| Path   | Param   | HEAD   | workspace   |\n|--------|---------|--------|-------------|\n"
    assert _table_or_none(header) is None
    assert _table_or_none("") is None
    assert _table_or_none(header + "| params.yaml | train.lr | 1 | 2 |\n").endswith("| 2 |")
