"""The pull-request summary on a real git + DVC repository with two commits."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qlora_dvc.pr_report import dvc_executable

PROJECT = Path(__file__).resolve().parents[1]

# A miniature of the real pipeline: a data stage (rejects, duplicates, a seeded split by id) and an
# evaluate stage that scores made-up predictions with the project's own scoring code, so that the
# per-row results, intervals and label analysis are the real ones. The tuned model's accuracy
# follows train.learning_rate, so a param change is a metric change.
PREP = textwrap.dedent("""
    import hashlib, json, os
    for folder in ("data/split", "data/clean", "data/dedup"):
        os.makedirs(folder, exist_ok=True)
    splits, rejected, removed = {"train": [], "test": []}, [], []
    for line_no, line in enumerate(open("data/raw.jsonl"), 1):
        row = json.loads(line)
        if "bad" in row:
            rejected.append({"line": line_no, "kind": row["bad"]})
            continue
        rid = hashlib.sha1(row["text"].encode()).hexdigest()[:16]
        if row.get("dup"):
            removed.append({"id": rid, "kind": "exact"})
            continue
        answer = json.dumps({"category": row["label"]})
        record = {"id": rid, "messages": [{"role": "user", "content": row["text"]},
                                          {"role": "assistant", "content": answer}]}
        splits["test" if int(rid, 16) % 3 == 0 else "train"].append(record)
    for name, records in splits.items():
        with open(f"data/split/{name}.jsonl", "w") as out:
            out.writelines(json.dumps(r, sort_keys=True) + "\\n" for r in records)
    with open("data/clean/rejected.jsonl", "w") as out:
        out.writelines(json.dumps(r) + "\\n" for r in rejected)
    with open("data/dedup/removed.jsonl", "w") as out:
        out.writelines(json.dumps(r) + "\\n" for r in removed)
""")

GEN = textwrap.dedent("""
    import json, os, yaml
    from stages.lib.evaluation import eval_report
    from stages.lib.labels import label_report
    from stages.lib.metrics import probe_row_scores, row_scores
    p = yaml.safe_load(open("params.yaml"))
    share = p["train"]["learning_rate"] * 1000          # 0.5 -> half the rows right
    test = [json.loads(line) for line in open("data/split/test.jsonl")]
    refs = [r["messages"][-1]["content"] for r in test]
    ids = [r["id"] for r in test]
    tuned = [ref if (int(i, 16) % 100) / 100 < share else json.dumps({"category": "bug"})
             for i, ref in zip(ids, refs)]
    base = ["Sure, here is the answer" for _ in test]
    settings = {"json_schema": {"type": "object"}, "json_fields": ["category"]}
    probes = [{"id": f"p{k}", "accept": ["yes"]} for k in range(10)]
    scores = {}
    for model, preds in (("base", base), ("tuned", tuned)):
        scores[model] = {"test": row_scores(preds, refs, settings, ids=ids),
                         "probes": probe_row_scores(["yes"] * 7 + ["no"] * 3, probes), "text": []}
        os.makedirs(f"data/eval/{model}", exist_ok=True)
        json.dump(scores[model], open(f"data/eval/{model}/scores.json", "w"))
    os.makedirs("reports/plots", exist_ok=True)
    json.dump(eval_report(scores["base"], scores["tuned"]), open("reports/eval.json", "w"), indent=2)
    json.dump({m: label_report(preds, refs, ["category"]) for m, preds in (("base", base), ("tuned", tuned))},
              open("reports/labels.json", "w"))
    json.dump([{"metric": "json_valid (tuned)", "model": "tuned", "value": 1.0}],
              open("reports/plots/eval_metrics.json", "w"))
""")

DVC_YAML = textwrap.dedent(f"""
    stages:
      prepare:
        cmd: {sys.executable} prep.py
        deps: [prep.py, data/raw.jsonl]
        outs: [data/split, data/clean, data/dedup]
      evaluate:
        cmd: {sys.executable} gen.py
        deps: [gen.py, data/split/test.jsonl]
        params: [train.learning_rate]
        outs: [data/eval]
        metrics:
          - reports/eval.json:
              cache: false
        plots:
          - reports/plots/eval_metrics.json:
              cache: false
              template: bar_horizontal
              x: value
              y: metric
          - reports/labels.json:
              cache: false
""")

PARAMS = "train:\n  learning_rate: {lr}\nevaluate:\n  gates:\n    - tuned.json_valid >= 0.7\n"
LABELS = ("billing", "bug", "account", "shipping")


def raw_rows(n, start=0):
    return [{"text": f"ticket number {k}: something about {LABELS[k % 4]}", "label": LABELS[k % 4]}
            for k in range(start, start + n)]


def write_raw(path, rows):
    import json

    (path / "data").mkdir(exist_ok=True)
    (path / "data/raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


BASE_ROWS = raw_rows(90) + [{"bad": "too_long"}, {"text": "ticket number 3: something about account",
                                                  "label": "account", "dup": True}]


def sh(cmd, cwd, check=True):
    done = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True)
    if check and done.returncode != 0:
        raise AssertionError(f"{cmd} failed:\n{done.stdout}\n{done.stderr}")
    return done


def pr_report(cwd, *args):
    return subprocess.run([sys.executable, "-m", "qlora_dvc", "pr-report", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True)


def _env():
    # The venv's bin on PATH: DVC's queue starts its worker as a bare `dvc` from PATH, and
    # `make test` runs the venv's python without activating the venv.
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_TERMINAL_PROMPT": "0",
            "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
            "PYTHONPATH": os.pathsep.join([str(PROJECT), os.environ.get("PYTHONPATH", "")])}


def git_init(path: Path):
    sh(["git", "init", "-q", "-b", "main"], path)
    for key, value in (("user.name", "test"), ("user.email", "test@example.com"), ("commit.gpgsign", "false")):
        sh(["git", "config", key, value], path)


def commit(path, message):
    dvc = dvc_executable()
    sh([dvc, "repro", "-q"], path)
    sh(["git", "add", "-A"], path)
    sh(["git", "commit", "-q", "-m", message], path)
    return sh(["git", "rev-parse", "HEAD"], path).stdout.strip()


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """Four commits, each changing one kind of thing: first, params only, data only, code only."""
    path = tmp_path_factory.mktemp("project")
    git_init(path)
    sh([dvc_executable(), "init", "-q"], path)
    (path / "prep.py").write_text(PREP)
    (path / "gen.py").write_text(GEN)
    (path / "dvc.yaml").write_text(DVC_YAML)
    (path / "params.yaml").write_text(PARAMS.format(lr=0.0005))
    write_raw(path, BASE_ROWS)
    shas = {"first": commit(path, "first")}
    (path / "params.yaml").write_text(PARAMS.format(lr=0.0009))
    shas["params"] = commit(path, "params only: higher learning rate")
    # Data only: 12 new rows, 3 rows gone, one more rejected row of a new kind.
    write_raw(path, raw_rows(87, start=3) + raw_rows(12, start=500) + BASE_ROWS[90:] + [{"bad": "empty_turn"}])
    shas["data"] = commit(path, "data only")
    (path / "gen.py").write_text(GEN + "# a comment: code changed, results did not\n")
    shas["code"] = commit(path, "code only")
    return path, shas


def at(path, sha):
    sh(["git", "checkout", "-q", sha], path)
    sh([dvc_executable(), "checkout", "-q"], path)


def summary_of(path, base, *args):
    done = pr_report(path, "--base", base, "--out", "reports/pr_summary.md", *args)
    assert done.returncode == 0, done.stderr
    return (path / "reports/pr_summary.md").read_text()


def section(summary, title):
    """The text of one '### title' section."""
    start = summary.index(f"### {title}")
    end = summary.find("\n### ", start + 4)
    return summary[start:end if end != -1 else None]


def cells(text):
    """The rows of the markdown tables in `text`, as lists of stripped cells (header included)."""
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|") and not line.startswith("|:") and not line.startswith("|-")]


def test_params_only_change(repo):
    path, shas = repo
    at(path, shas["params"])
    summary = summary_of(path, shas["first"])
    Path(os.environ.get("PR_REPORT_SAMPLE", os.devnull)).write_text(summary)
    changed = section(summary, "What changed")
    assert "**Params**: 1 changed: `train.learning_rate`" in changed
    assert "**Data**: no change in the cleaned, deduplicated or split data" in changed
    assert "**Code**: no change" in changed
    # The tuned model against the base revision's, on the same rows, with an interval and verdict.
    compared = section(summary, "Tuned model: this pull request vs")
    assert "On the rows both revisions scored (" in compared
    row = next(r for r in cells(compared) if r[0] == "field_accuracy.category")
    old_value, new_value, change, interval, verdict = row[1:6]
    assert float(old_value.split()[0]) < float(new_value.split()[0]) and change.startswith("+")
    low, high = (float(x) for x in interval.strip("[]").split(","))
    assert low <= float(change) <= high
    assert verdict in ("🟢 better", "⚪ no detectable change")
    assert ("better" in verdict) == (low > 0)
    assert "Wilson score interval" in compared and "paired percentile bootstrap" in compared
    # The reviewer's table: metrics as rows; base, tuned, delta and its interval as columns.
    table = section(summary, "Reviewer's table")
    rows = cells(table)
    assert rows[0] == ["metric", "better", "base", "tuned", "delta", "95 % interval of delta", "verdict"]
    json_valid = next(r for r in rows if r[0] == "json_valid")
    assert json_valid[2].startswith("0.000 [0.000, ") and json_valid[3].startswith("1.000 [")
    assert json_valid[4] == "+1.000" and json_valid[6] == "🟢 better"  # 0 of n valid JSON -> n of n
    # Per-label results from scikit-learn for the one label field.
    labels = section(summary, "Per-label results")
    assert "`category`" in labels or "<code>category</code>" in labels
    label_rows = cells(labels)
    assert ["label", "precision", "recall", "F1", "support"] in label_rows
    billing = next(r for r in label_rows if r[0] == "billing")
    assert 0 < float(billing[3]) <= 1 and int(billing[4]) > 0
    assert "(no answer)" in labels
    # dvc params diff and metrics diff are still there.
    assert "train.learning_rate" in summary and "0.0005" in summary and "0.0009" in summary
    assert "tuned.json_valid.value" in summary or "tuned.field_accuracy.category.value" in summary
    assert "All 1 gate(s) pass" in summary
    # Plots: rendered by dvc plots diff and linked relative to the summary.
    assert "(pr_plots/index.html)" in summary
    assert (path / "reports/pr_plots/index.html").is_file()
    # ... and as PNG images in the summary itself (metric bars with intervals, the confusion matrix).
    plots = section(summary, "Plots")
    assert "![Metrics with 95 % intervals](pr_images/metrics.png)" in plots
    assert "![Confusion matrix: category](pr_images/confusion-category.png)" in plots
    for name in ("metrics.png", "confusion-category.png"):
        assert (path / "reports/pr_images" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # In CI the images are published and shown from a URL.
    done = pr_report(path, "--base", shas["first"], "--out", "reports/s2.md",
                     "--image-url", "https://example.org/plots/{name}?raw=true")
    assert done.returncode == 0, done.stderr
    assert "](https://example.org/plots/metrics.png?raw=true)" in (path / "reports/s2.md").read_text()


def test_data_only_change(repo):
    path, shas = repo
    at(path, shas["data"])
    summary = summary_of(path, shas["params"], "--no-plots")
    changed = section(summary, "What changed")
    assert "**Params**: no change" in changed and "**Code**: no change" in changed
    assert "**Data**: " in changed and "test +" in changed and "clean counts changed" in changed
    assert "`data/raw.jsonl`" in changed
    diff = section(summary, "Dataset diff vs")
    rows = {r[0]: r for r in cells(diff) if r[0] in ("train", "test")}
    added = sum(int(rows[s][3].lstrip("+")) for s in ("train", "test"))
    removed = sum(int(rows[s][4].lstrip("−")) for s in ("train", "test"))
    assert (added, removed) == (12, 3)
    assert ["empty\\_turn", "0", "1", "+1"] in cells(diff)  # the clean reason that appeared (escaped for markdown)
    assert "ticket number 500" in diff or "ticket number 501" in diff or "ticket number 502" in diff  # examples
    assert "ticket number 0" in diff  # a removed row's example


def test_code_only_change_is_no_detectable_change(repo):
    path, shas = repo
    at(path, shas["code"])
    summary = summary_of(path, shas["data"], "--no-plots")
    changed = section(summary, "What changed")
    assert "**Code**: 1 file(s): `gen.py` (stages: evaluate)" in changed
    assert "**Params**: no change" in changed
    assert "**Data**: no change" in changed
    compared = section(summary, "Tuned model: this pull request vs")
    verdicts = [r[-1] for r in cells(compared)[1:]]
    assert verdicts and all(v == "⚪ no detectable change" for v in verdicts)
    assert "better" not in compared.split("\n\n", 1)[0] and "worse" not in compared.split("\n\n", 1)[0]


def test_base_revision_without_per_row_results_falls_back_to_point_values(repo, tmp_path):
    path, shas = repo
    at(path, shas["params"])
    # A clone with its own empty cache and no remote: the base revision's outputs are unreachable.
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(path), str(clone)], tmp_path)
    for key, value in (("user.name", "t"), ("user.email", "t@t")):
        sh(["git", "config", key, value], clone)
    sh(["git", "checkout", "-q", shas["params"]], clone)
    for folder in ("reports", "data/eval", "data/split", "data/clean", "data/dedup"):
        src = path / folder
        import shutil
        shutil.copytree(src, clone / folder, dirs_exist_ok=True)
    summary = summary_of(clone, shas["first"], "--no-plots")
    compared = section(summary, "Tuned model: this pull request vs")
    assert "are not available" in compared and "Point values only" in compared
    assert any(r[0] == "field_accuracy.category" for r in cells(compared))
    assert "are not in the DVC cache or remote" in section(summary, "Dataset diff vs")


def test_summary_against_same_revision_with_a_failing_gate(repo, tmp_path):
    path, shas = repo
    at(path, shas["params"])
    params = path / "params.yaml"
    original = params.read_text()
    params.write_text(original.replace("gates:\n", "gates:\n    - tuned.field_accuracy.category >= 0.99\n"
                                                 "    - delta.general_accuracy.lower >= 0.5\n"))
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
    assert "2 of 3 gate(s) fail" in summary
    # The failure names the metric, its value and the other sides with their intervals.
    assert "tuned.field_accuracy.category = 0." in summary and "(base 0.0 [0.0, 0." in summary
    assert "delta.general_accuracy.lower = 0.0 (base 0.7 [" in summary


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


@pytest.mark.slow
def test_sweep_queued_run_and_compared(repo):
    """A small grid through DVC's queue, end to end, and its table in the summary when asked."""
    import time

    path, shas = repo
    at(path, shas["code"])
    dvc = dvc_executable()
    queued = sh([dvc, "exp", "run", "--queue", "-S", "train.learning_rate=0.0006,0.0008"], path)
    assert queued.stdout.count("Queued experiment") == 2
    sh([dvc, "queue", "start", "-j", "1"], path)
    deadline, status = time.time() + 600, ""
    while time.time() < deadline:
        status = sh([dvc, "queue", "status"], path).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    assert status.count("Success") == 2, status

    summary = summary_of(path, shas["data"], "--no-plots", "--experiments")
    table = section(summary, "Experiments")
    assert "Swept: `train.learning_rate`" in table
    rows = cells(table)
    header = rows[0]
    assert header[0] == "Experiment"
    lr = next(i for i, h in enumerate(header) if h.endswith("train.learning_rate"))
    assert {r[lr] for r in rows[1:]} == {"0.0009", "0.0006", "0.0008"}  # baseline and the two runs
    assert any(h.endswith("tuned.json_valid.value") for h in header)
    # Only the swept params and the headline metrics: no interval bounds, no other metric or dep.
    assert not any(h.endswith((".lower", ".upper")) or "chrf" in h or h.endswith(".py") for h in header), header
    # Without --experiments there is no such section.
    assert "### Experiments" not in summary_of(path, shas["data"], "--no-plots")


def test_stale_workspace_is_warned_about(repo, tmp_path):
    """Params changed and `dvc repro` not run: the metrics shown are stale, and the summary says so."""
    path, shas = repo
    at(path, shas["code"])
    params = path / "params.yaml"
    original = params.read_text()
    params.write_text(PARAMS.format(lr=0.0007))
    try:
        done = pr_report(path, "--base", shas["params"], "--out", str(tmp_path / "s.md"), "--no-plots")
    finally:
        params.write_text(original)
    assert done.returncode == 0, done.stderr
    summary = (tmp_path / "s.md").read_text()
    assert "> **Warning:** The workspace is not up to date: `dvc status` lists `evaluate` as changed" in summary
    assert "Run `dvc repro`" in summary and "pr-report: warning:" in done.stderr
    # Up to date again: no warning.
    done = pr_report(path, "--base", shas["params"], "--out", str(tmp_path / "s2.md"), "--no-plots")
    assert done.returncode == 0, done.stderr
    assert "not up to date" not in (tmp_path / "s2.md").read_text()


@pytest.mark.parametrize("content,problem", [
    ("[1, 2]", "the top level is a JSON list, not an object"),
    ('{"base": [0.5], "tuned": {"loss": 1}}', "'base' is a JSON list, not an object"),
    ('{"n": 3, "tuned": {}}', "'n' is a JSON int, not an object"),
    ('{"accuracy": 0.5}', "it has neither a 'base' nor a 'tuned' block"),
])
def test_wrong_shape_eval_json_is_one_line(repo, tmp_path, content, problem):
    path, shas = repo
    at(path, shas["code"])
    bad = path / "reports/bad_eval.json"
    bad.write_text(content)
    try:
        done = pr_report(path, "--base", shas["params"], "--out", str(tmp_path / "s.md"), "--no-plots",
                         "--metrics-file", "reports/bad_eval.json")
    finally:
        bad.unlink()
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"pr-report: reports/bad_eval.json is not an evaluate report ({problem}); re-run `dvc repro evaluate` "
        "(or pass --metrics-file)")
