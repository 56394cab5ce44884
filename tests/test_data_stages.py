"""The clean, dedup and split stage scripts, run as the pipeline runs them (`python -m stages.X`
in a project directory): outputs, row accounting, byte-identical reruns, and clear errors (exit 1,
one message, no traceback) for user mistakes."""
from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BAD = ROOT / "tests" / "data" / "bad"
OUTPUTS = ["data/clean/records.jsonl", "data/clean/rejected.jsonl", "reports/clean.json",
           "data/dedup/records.jsonl", "data/dedup/removed.jsonl", "reports/dedup.json",
           "data/split/train.jsonl", "data/split/validation.jsonl", "data/split/test.jsonl", "reports/split.json"]


def _rows(n: int, seed: int = 0) -> list[str]:
    """Support-ticket-like rows with the usual defects: exact and near duplicates, bad lines."""
    rng = random.Random(seed)
    words = [f"word{i}" for i in range(400)]
    lines = []
    for i in range(n):
        user = f"Ticket {i}: " + " ".join(rng.choice(words) for _ in range(25))
        answer = json.dumps({"category": rng.choice(["billing", "bug"]), "summary": " ".join(rng.choice(words) for _ in range(5))})
        lines.append(json.dumps({"messages": [{"role": "system", "content": "Triage it."}, {"role": "user", "content": user},
                                              {"role": "assistant", "content": answer}], "ticket": f"T{i}"}))
    lines.append(lines[3])                                          # exact duplicate
    near = json.loads(lines[5])
    near["messages"][1]["content"] = near["messages"][1]["content"].upper() + " thanks"
    lines.append(json.dumps(near))                                  # near duplicate
    lines.append('{"messages": [oops')                              # invalid JSON
    lines.append(json.dumps({"messages": [{"role": "user", "content": "hi there"}]}))   # no assistant
    return lines


def _project(tmp_path: Path, raw_name: str = "tiny.jsonl", lines: list[str] | None = None, **updates) -> Path:
    project = tmp_path / "project"
    (project / "data" / "raw").mkdir(parents=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["raw"] = f"data/raw/{raw_name}"
    for dotted, value in updates.items():
        section, key = dotted.split("__")
        params[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if lines is not None:
        (project / "data" / "raw" / raw_name).write_text("\n".join(lines) + "\n")
    return project


def _stage(project: Path, name: str, **env_updates: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", **env_updates}
    return subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=120)


def _ok(project: Path, *names: str) -> None:
    for name in names:
        result = _stage(project, name)
        assert result.returncode == 0, f"{name}: {result.stderr}"


def _fails_cleanly(result: subprocess.CompletedProcess, *phrases: str) -> None:
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr


def _report(project: Path, name: str) -> dict:
    return json.loads((project / "reports" / f"{name}.json").read_text())


def test_three_stages_account_for_every_row_and_rerun_byte_identically(tmp_path):
    project = _project(tmp_path, lines=_rows(120), split__test_fraction=0.2)
    _ok(project, "clean", "dedup", "split")
    clean, dedup, split = _report(project, "clean"), _report(project, "dedup"), _report(project, "split")
    assert clean["format"] == "messages" and clean["format_source"] == "detected"
    assert (clean["rows_in"], clean["kept"], clean["rejected"]) == (124, 122, 2)
    assert clean["rejected_by_reason"] == {"invalid_json": 1, "no_assistant": 1}
    assert dedup["removed_exact"] == 1 and dedup["removed_near"] == 1
    assert dedup["accounting"] == {"raw_rows": 124, "rejected": 2, "removed": 2, "kept": 120, "ok": True}
    assert split["train"] + split["validation"] + split["test"] == dedup["kept"] == split["rows_in"]
    assert split["passed"] and split["leaked_pairs"] == 0
    rejected = [json.loads(line) for line in (project / "data/clean/rejected.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejected] == [123, 124] and rejected[0]["reason"].startswith("line 123: invalid JSON")
    removed = [json.loads(line) for line in (project / "data/dedup/removed.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in removed} == {"exact", "near"} and all(r["duplicate_of"] for r in removed)
    ids = {side: [json.loads(x)["id"] for x in (project / f"data/split/{side}.jsonl").read_text().splitlines()]
           for side in ("train", "validation", "test")}
    assert all(v == sorted(v) for v in ids.values())
    assert not (set(ids["train"]) & set(ids["test"]))

    first = {path: (project / path).read_bytes() for path in OUTPUTS}
    _ok(project, "clean", "dedup", "split")
    assert {path: (project / path).read_bytes() for path in OUTPUTS} == first


def test_worker_processes_change_nothing_in_the_outputs(tmp_path):
    # 9k rows: several batches in each stage, so the worker processes really share the work.
    project = _project(tmp_path, lines=_rows(9000), split__max_leakage=10**6)
    outputs = {}
    for workers in ("1", "2"):
        for name in ("clean", "dedup", "split"):
            result = _stage(project, name, QLORA_DVC_WORKERS=workers)
            assert result.returncode == 0, f"{name}: {result.stderr}"
        outputs[workers] = {path: (project / path).read_bytes() for path in OUTPUTS}
    assert outputs["1"] == outputs["2"]
    assert _report(project, "clean")["rows_in"] == 9004


def test_other_column_names_through_a_params_edit(tmp_path):
    rng = random.Random(5)
    vocab = [f"word{i}" for i in range(500)]
    lines = [json.dumps({"question": f"How do I {' '.join(rng.choice(vocab) for _ in range(8))}?",
                         "answer": f"Like this: {' '.join(rng.choice(vocab) for _ in range(6))}.",
                         "doc": f"d{i % 7}"}) for i in range(60)]
    project = _project(tmp_path, raw_name="qa.jsonl", lines=lines,
                       data__fields={"prompt": "question", "response": "answer", "system": None},
                       data__keep_columns=["doc"], split__group_by="doc", split__test_fraction=0.3,
                       split__validation_fraction=0.0)   # 7 groups: too few for three sides
    _ok(project, "clean", "dedup", "split")
    assert _report(project, "clean")["format"] == "columns"
    docs = {}
    for side in ("train", "validation", "test"):
        for line in (project / f"data/split/{side}.jsonl").read_text().splitlines():
            docs.setdefault(json.loads(line)["meta"]["doc"], set()).add(side)
    assert len(docs) == 7 and all(len(sides) == 1 for sides in docs.values())


def test_mixed_directory_and_parquet_input(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    project = _project(tmp_path, raw_name="dir", data__fields={"prompt": "question", "response": "answer", "system": None},
                       clean__max_rejected_fraction=0.6)
    shutil.copytree(BAD / "mixed_dir", project / "data/raw/dir")
    pq.write_table(pa.table({"question": ["Parquet question here?"], "answer": ["Parquet answer."]}),
                   project / "data/raw/dir/d.parquet")
    _ok(project, "clean")
    report = _report(project, "clean")
    assert report["files"] == 4 and report["ignored_files"] == ["data/raw/dir/README.txt"]
    assert (report["rows_in"], report["kept"]) == (7, 4)
    assert set(report["formats_by_file"].values()) == {"columns"}


def test_a_10_mb_record_is_rejected_with_its_line_number(tmp_path):
    lines = _rows(20)[:20]
    huge = {"messages": [{"role": "user", "content": "x " * 5_000_000}, {"role": "assistant", "content": "ok"}]}
    lines.insert(7, json.dumps(huge))
    project = _project(tmp_path, lines=lines)
    _ok(project, "clean")
    rejected = json.loads((project / "data/clean/rejected.jsonl").read_text())
    assert rejected["line"] == 8 and rejected["kind"] == "too_long"
    assert "more than clean.max_chars=4000" in rejected["reason"] and len(rejected["raw"]) < 600


def test_the_bad_input_corpus_never_crashes_the_clean_stage(tmp_path):
    """Every malformed file at once (a directory): one clear reason per bad row, and per file
    the rows in = kept + rejected."""
    project = _project(tmp_path, raw_name="bad", clean__max_rejected_fraction=1.0)
    (project / "data/raw/bad").mkdir()
    for path in BAD.glob("*.jsonl"):
        shutil.copy(path, project / "data/raw/bad" / path.name)
    result = _stage(project, "clean")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    report = _report(project, "clean")
    assert report["rows_in"] == report["kept"] + report["rejected"] == 58
    assert report["files"] == len(list(BAD.glob("*.jsonl")))
    kept = [json.loads(x) for x in (project / "data/clean/records.jsonl").read_text().splitlines()]
    rejected = [json.loads(x) for x in (project / "data/clean/rejected.jsonl").read_text().splitlines()]
    assert len(kept) == report["kept"] and len(rejected) == report["rejected"]
    for row in rejected:
        assert row["reason"].startswith(f"line {row['line']}: ") and row["kind"] and len(row["raw"]) <= 600
    # Line numbers are the file's own: each row of each file is in exactly one of the outputs.
    seen = sorted([(r["source"]["file"], r["source"]["line"]) for r in kept] + [(r["file"], r["line"]) for r in rejected])
    assert len(seen) == len(set(seen)) == 58


@pytest.mark.parametrize("setup, phrases", [
    ({"raw_name": "missing.jsonl"}, ["not found", "dvc pull"]),
    ({"raw_name": "empty.jsonl", "copy": True}, ["no rows (the input is empty)"]),
    ({"raw_name": "../../../outside.jsonl"}, ["points outside the project"]),
    ({"raw_name": "qa.jsonl", "lines": ['{"q": 1, "a": 2}']}, ["cannot detect the data format", "data.fields"]),
    ({"raw_name": "roles_out_of_order.jsonl", "copy": True}, ["rejected, more than clean.max_rejected_fraction=0.2",
                                                              "role_order 3"]),
    ({"raw_name": "tiny.jsonl", "lines": ["{}"], "params": {"clean": {"min_chars": -1, "bogus": 1}}},
     ["params.yaml has 2 problem(s)", "clean.min_chars", "clean.bogus: unknown key"]),
])
def test_clean_stage_errors_are_one_clear_message(tmp_path, setup, phrases):
    project = _project(tmp_path, raw_name=setup["raw_name"], lines=setup.get("lines"))
    if setup.get("copy"):
        shutil.copy(BAD / setup["raw_name"], project / "data/raw" / setup["raw_name"])
    if "params" in setup:
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["clean"].update(setup["params"]["clean"])
        (project / "params.yaml").write_text(yaml.safe_dump(params))
    _fails_cleanly(_stage(project, "clean"), *phrases)


def test_dedup_and_split_errors_are_clear(tmp_path):
    project = _project(tmp_path, lines=_rows(30), split__group_by="conversation", data__keep_columns=["conversation"])
    _fails_cleanly(_stage(project, "dedup"), "data/clean/records.jsonl: not found", "run the previous stage")
    _fails_cleanly(_stage(project, "split"), "data/dedup/records.jsonl: not found")
    _ok(project, "clean", "dedup")
    # The column is kept but no row has it.
    _fails_cleanly(_stage(project, "split"), "split.group_by is 'conversation'", "no record has meta.conversation")
    (project / "data/dedup/records.jsonl").write_text('{"id": "x"\n')
    _fails_cleanly(_stage(project, "split"), "line 1: not a record this pipeline wrote")
    # A group_by column that clean does not keep is a params error, reported before any work.
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["keep_columns"] = []
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    _fails_cleanly(_stage(project, "split"), "split.group_by: 'conversation' must be one of data.keep_columns")


def _pasted_passages() -> list[str]:
    """Pairs of rows sharing a pasted 20-word passage that MinHash does not see as near-duplicates."""
    rng = random.Random(3)
    words = [f"term{i}" for i in range(30000)]
    lines = []
    for i in range(80):
        passage = " ".join(rng.choice(words) for _ in range(20))
        for copy in range(2):
            user = " ".join(rng.choice(words) for _ in range(60)) + " " + passage
            lines.append(json.dumps({"messages": [{"role": "user", "content": user},
                                                  {"role": "assistant", "content": f"Answer {i}-{copy}."}]}))
    return lines


def test_split_groups_rows_sharing_a_long_passage(tmp_path):
    """The grouping joins rows by the audit's n-gram relation, so the pasted passages never straddle."""
    project = _project(tmp_path, lines=_pasted_passages(), split__test_fraction=0.4)
    _ok(project, "clean", "dedup", "split")
    report = _report(project, "split")
    assert report["passed"] and report["leaked_pairs"] == 0
    assert report["grouping"]["joined_by"]["ngram_user"] == 80 and report["groups"] == 80


def test_split_fails_naming_leaked_pairs(tmp_path, monkeypatch, capsys):
    """The audit stays independent of the grouping: with a grouping that ignores the n-gram links
    (as a bug would), the n-gram audit finds the pasted passages and the stage fails naming them."""
    from stages import split
    from stages.lib import splitting
    from stages.lib.stage import run_stage

    project = _project(tmp_path, lines=_pasted_passages(), split__test_fraction=0.4)
    _ok(project, "clean", "dedup")
    grouping_with_every_link = splitting.split_groups
    monkeypatch.setattr(splitting, "split_groups", lambda index, params, word_counts=None:
                        grouping_with_every_link(index, params, None))
    monkeypatch.chdir(project)
    monkeypatch.setenv("QLORA_DVC_WORKERS", "1")
    assert run_stage("split", split.main) == 1   # as `python -m stages.split` runs it
    err = capsys.readouterr().err
    assert "leaked train/test pair(s), more than split.max_leakage=0" in err and "ngram_user: test " in err
    assert "Traceback" not in err
    report = _report(project, "split")
    assert not report["passed"] and report["audit"]["ngram_user"]["pairs"] == report["leaked_pairs"] > 0
    example = report["audit"]["ngram_user"]["examples"][0]
    assert len(example["shared"].split()) == 13 and example["other_side"] in ("train", "validation")
    assert (project / "data/split/test.jsonl").exists()   # written anyway, to inspect


@pytest.mark.slow
def test_memory_stays_bounded_as_the_input_grows(tmp_path):
    """Issue 6, scale: clean streams (flat memory); dedup and split keep a small fixed-size index
    per row (fingerprint + keys), never the texts. 30k vs 150k rows: clean's peak RSS stays
    flat, dedup's and split's grow by under 2 kB per added row."""
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location("bench_data", ROOT / "bench" / "data_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    peaks = {}
    for rows in (30_000, 150_000):
        project = _project(tmp_path / str(rows), raw_name="big.jsonl", split__max_leakage=10**9,
                           clean__max_rejected_fraction=1.0)
        bench.generate(project / "data/raw/big.jsonl", rows)
        for name in ("clean", "dedup", "split"):
            process = subprocess.Popen([sys.executable, "-m", f"stages.{name}"], cwd=project,
                                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _, status, usage = os.wait4(process.pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0, name
            peaks[(name, rows)] = usage.ru_maxrss * 1024   # bytes
    assert peaks[("clean", 150_000)] < peaks[("clean", 30_000)] * 1.2
    for name in ("dedup", "split"):
        per_row = (peaks[(name, 150_000)] - peaks[(name, 30_000)]) / 120_000
        assert per_row < 2048, (name, per_row)
