"""Faults injected for real: a stage SIGKILLed mid-write, an output path that cannot be written."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env():
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1",
                PYTHONPATH=str(ROOT))


def _ticket(i: int) -> str:
    words = " ".join(f"w{(i * 7919 + k * 104729) % 1000003}" for k in range(12))
    return json.dumps({"messages": [{"role": "user", "content": f"Ticket {i}: {words}"},
                                    {"role": "assistant", "content": f"Answer {i} {words[::-1]}"}]})


def _project(tmp_path: Path, rows: int) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    shutil.copytree(ROOT / "stages", project / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", project)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["raw"] = "data/raw/tickets.jsonl"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    (project / "data/raw").mkdir(parents=True)
    (project / "data/raw/tickets.jsonl").write_text("".join(_ticket(i) + "\n" for i in range(rows)))
    for command in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"]):
        subprocess.run(command, cwd=project, check=True, env=_env())
    return project


def _run(args, cwd):
    return subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True)


@pytest.mark.slow
def test_stage_killed_mid_write_leaves_nothing_that_looks_complete(tmp_path):
    project = _project(tmp_path, rows=200)
    first = _run([str(BIN / "dvc"), "repro", "clean"], project)
    assert first.returncode == 0, first.stderr
    # A new data version, big enough that the stage is still writing when it is killed.
    big = "".join(_ticket(i) + "\n" for i in range(150_000))
    (project / "data/raw/tickets.jsonl").write_text(big)
    process = subprocess.Popen([str(BIN / "dvc"), "repro", "clean"], cwd=project, env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    clean_dir = project / "data/clean"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and not list(clean_dir.glob(".records.jsonl.*.tmp")):
            assert process.poll() is None, "the stage finished before it could be killed"
            time.sleep(0.05)
        time.sleep(0.3)  # let it write part of the file
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    # No output under its real name: the partial data exists only as a hidden temp file.
    assert not (clean_dir / "records.jsonl").exists()
    status = json.loads(_run([str(BIN / "dvc"), "status", "--json"], project).stdout)
    assert "clean" in status
    recovered = _run([str(BIN / "dvc"), "repro", "clean"], project)
    assert recovered.returncode == 0, recovered.stderr
    report = json.loads((project / "reports/clean.json").read_text())
    assert report["rows_in"] == report["kept"] + report["rejected"] == 150_000
    assert sum(1 for _ in open(clean_dir / "records.jsonl")) == report["kept"]
    assert "clean" not in json.loads(_run([str(BIN / "dvc"), "status", "--json"], project).stdout or "{}")


def test_unwritable_output_is_one_clear_error(tmp_path):
    project = _project(tmp_path, rows=20)
    (project / "data/clean").write_text("a file where the output folder should be")
    result = _run([sys.executable, "-m", "stages.clean"], project)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "cannot write" in result.stderr and "data/clean" in result.stderr
