"""Input paths (issue 14): every file the clean stage reads, directly, inside a folder or through
a symlink, lies inside the project or under data.allowed_roots; FIFOs, devices and sockets are
refused before anything opens them; an unreadable file is reported as an unreadable input."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CANARY = "qlora-dvc-canary-7d1f0c"


def _project(base: Path, raw: str = "data/raw/rows", **data) -> Path:
    project = base / "project"
    (project / "data" / "raw" / "rows").mkdir(parents=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update({"raw": raw, **data})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rows = [json.dumps({"messages": [{"role": "user", "content": f"question number {i} about routers"},
                                     {"role": "assistant", "content": f"answer number {i}"}]}) for i in range(20)]
    (project / "data/raw/rows/good.jsonl").write_text("\n".join(rows) + "\n")
    return project


def _clean(project: Path, user: int | None = None) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "SECRET_FOR_TEST": CANARY}
    return subprocess.run([sys.executable, "-m", "stages.clean"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=60, user=user)


def _no_canary_anywhere(project: Path) -> None:
    for path in project.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert CANARY.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("where", ["inside_folder", "nested_symlinked_folder", "data_raw_itself", "absolute"])
def test_a_symlink_to_proc_self_environ_is_refused_and_nothing_of_it_lands_anywhere(tmp_path, where):
    project = _project(tmp_path)
    rows = project / "data/raw/rows"
    if where == "inside_folder":
        (rows / "secrets.jsonl").symlink_to("/proc/self/environ")
    elif where == "nested_symlinked_folder":
        (rows / "more").symlink_to("/proc/self")   # a folder outside the project, through a symlink
    elif where == "data_raw_itself":
        (project / "data/raw/env.jsonl").symlink_to("/proc/self/environ")
        project = _project(tmp_path / "b", raw="data/raw/env.jsonl")
        (project / "data/raw/env.jsonl").symlink_to("/proc/self/environ")
    else:
        project = _project(tmp_path / "b", raw="/proc/self/environ")
    result = _clean(project)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "outside the project and data.allowed_roots" in result.stderr and "/proc/" in result.stderr
    assert CANARY not in result.stdout + result.stderr
    assert not (project / "data/clean/records.jsonl").exists() and not (project / "data/clean/rejected.jsonl").exists()
    _no_canary_anywhere(project)


def test_symlinks_inside_the_project_and_under_allowed_roots_are_read(tmp_path):
    outside = tmp_path / "shared-data"
    outside.mkdir()
    (outside / "extra.jsonl").write_text(json.dumps({"prompt": "an outside question here", "completion": "yes"}) + "\n")
    project = _project(tmp_path, format="auto")
    (project / "data/raw/rows/again.jsonl").symlink_to(project / "data/raw/rows/good.jsonl")
    (project / "data/raw/rows/loop").symlink_to(project / "data/raw/rows")   # a loop is walked once
    result = _clean(project)
    assert result.returncode == 0, result.stderr
    assert json.loads((project / "reports/clean.json").read_text())["rows_in"] == 40
    (project / "data/raw/rows/outside.jsonl").symlink_to(outside / "extra.jsonl")
    result = _clean(project)
    assert result.returncode == 1 and "outside the project and data.allowed_roots" in result.stderr
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["allowed_roots"] = [str(outside)]
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    result = _clean(project)
    assert result.returncode == 0, result.stderr
    assert json.loads((project / "reports/clean.json").read_text())["rows_in"] == 41


def test_relative_allowed_roots_are_a_params_error(tmp_path):
    project = _project(tmp_path, allowed_roots=["data/elsewhere"])
    result = _clean(project)
    assert result.returncode == 1 and "data.allowed_roots: must be absolute directories" in result.stderr


def test_a_fifo_in_a_data_folder_is_refused_without_hanging(tmp_path):
    project = _project(tmp_path)
    os.mkfifo(project / "data/raw/rows/pipe.jsonl")
    result = _clean(project)   # the 60 s timeout would fire if the FIFO were opened
    assert result.returncode == 1 and "pipe.jsonl: a FIFO, not a data file; refused" in result.stderr


def test_a_socket_and_a_device_are_refused(tmp_path):
    project = _project(tmp_path)
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(project / "data/raw/rows/sock.jsonl"))
        result = _clean(project)
        assert result.returncode == 1 and "sock.jsonl: a socket, not a data file; refused" in result.stderr
    finally:
        server.close()
    (project / "data/raw/rows/sock.jsonl").unlink()
    project = _project(tmp_path / "b", raw="/dev/zero", allowed_roots=["/dev"])
    result = _clean(project)
    assert result.returncode == 1 and "/dev/zero: a device, not a data file; refused" in result.stderr


def test_broken_and_looping_symlinks_are_unreadable_inputs(tmp_path):
    project = _project(tmp_path)
    (project / "data/raw/rows/gone.jsonl").symlink_to(project / "data/raw/nowhere.jsonl")
    result = _clean(project)
    assert result.returncode == 1 and "gone.jsonl: a symlink to" in result.stderr and "does not exist" in result.stderr
    (project / "data/raw/rows/gone.jsonl").unlink()
    (project / "data/raw/rows/loop.jsonl").symlink_to(project / "data/raw/rows/loop.jsonl")
    result = _clean(project)
    assert result.returncode == 1 and "loop.jsonl: unreadable input" in result.stderr
    assert "cannot write" not in result.stderr


def test_a_file_that_fails_to_read_is_an_unreadable_input_not_an_output_error(tmp_path):
    """A read error (EIO here: /proc/self/mem at offset 0, with /proc named in data.allowed_roots)
    names the input, where it used to be reported as an output that cannot be written."""
    project = _project(tmp_path, allowed_roots=["/proc"])
    (project / "data/raw/rows/mem.jsonl").symlink_to("/proc/self/mem")
    result = _clean(project)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "mem.jsonl: unreadable input: Input/output error" in result.stderr
    assert "cannot write" not in result.stderr
    assert not (project / "data/clean/records.jsonl").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_a_file_without_read_permission_is_an_unreadable_input(tmp_path):
    project = _project(tmp_path)
    locked = project / "data/raw/rows/locked.jsonl"
    locked.write_text('{"prompt": "a b c", "completion": "d"}\n')
    locked.chmod(0)
    result = _clean(project)
    assert result.returncode == 1 and "locked.jsonl: unreadable input: permission denied" in result.stderr
