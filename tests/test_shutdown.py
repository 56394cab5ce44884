"""Clean shutdown (issue 14): a data stage stopped by SIGTERM removes its temporary files and
stops its worker processes; one stopped by SIGKILL (which nothing can catch) leaves no worker
behind (they die with their parent), and its next run sweeps the temporary files it left."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ENV = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "QLORA_DVC_WORKERS": "2"}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """60k generated support tickets, cleaned and deduplicated (the stages below are killed mid-run)."""
    spec = importlib.util.spec_from_file_location("bench_data", ROOT / "bench" / "data_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    project = tmp_path_factory.mktemp("shutdown") / "project"
    (project / "data/raw").mkdir(parents=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["raw"] = "data/raw/big.jsonl"
    params["clean"]["max_rejected_fraction"] = 1.0
    params["split"]["max_leakage"] = 10**9
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    bench.generate(project / "data/raw/big.jsonl", 60_000)
    for name in ("clean", "dedup"):
        assert _run(project, name).returncode == 0
    return project


def _run(project: Path, name: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=project, env=ENV, capture_output=True,
                          text=True, timeout=600)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _gone(pid: int) -> bool:
    """Exited (absent, or a zombie nobody has reaped yet: it holds no memory and runs nothing)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def _leftovers(project: Path) -> list[str]:
    return sorted(p.name for folder in ("data/clean", "data/dedup", "data/split") if (project / folder).exists()
                  for p in (project / folder).iterdir() if p.name.endswith(".tmp"))


def _start_and_wait_for_workers(project: Path, name: str, temp_glob: str) -> tuple[subprocess.Popen, list[int]]:
    process = subprocess.Popen([sys.executable, "-m", f"stages.{name}"], cwd=project, env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    workers: list[int] = []
    while time.time() < deadline:
        assert process.poll() is None, f"{name} finished before it could be killed: {process.stderr.read()}"
        workers = _children(process.pid)
        if len(workers) >= 2 and list(project.glob(temp_glob)):
            return process, workers
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"{name}: no worker processes and temporary files within 120 s")


# (stage, temporary files it holds while its workers run)
STAGES = [("clean", "data/clean/.records.jsonl.*.tmp"), ("split", "data/split/.tokens.*.tmp")]


@pytest.mark.slow
@pytest.mark.parametrize("name, temp_glob", STAGES)
def test_sigterm_removes_temporary_files_and_stops_the_workers(project, name, temp_glob):
    process, workers = _start_and_wait_for_workers(project, name, temp_glob)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 143
    assert process.stderr.read().strip().splitlines()[-1] == f"{name}: terminated"
    assert _leftovers(project) == []
    assert all(_gone(pid) for pid in workers)


@pytest.mark.slow
@pytest.mark.parametrize("name, temp_glob", STAGES)
def test_after_sigkill_workers_die_and_the_rerun_leaves_nothing_behind(project, name, temp_glob):
    process, workers = _start_and_wait_for_workers(project, name, temp_glob)
    process.kill()
    process.wait(timeout=60)
    deadline = time.time() + 30
    while time.time() < deadline and not all(_gone(pid) for pid in workers):
        time.sleep(0.05)
    assert all(_gone(pid) for pid in workers), "workers outlived their SIGKILLed stage"
    assert list(project.glob(temp_glob))   # SIGKILL cannot be caught: the temp files are still there ...
    result = _run(project, name)
    assert result.returncode == 0, result.stderr
    assert _leftovers(project) == []       # ... until the next run sweeps them
    if name == "clean":
        report = json.loads((project / "reports/clean.json").read_text())
        assert report["rows_in"] == 60_000 and report["accounting_ok"]
