"""`qlora-dvc cache check|push` on a real DVC project with a local-directory remote: a missing or
unreachable remote is said in one line and answered with enabled=false (run everything), never an
error and never silence. The pipeline-level test (fresh clone, dvc pull, what re-runs) is in
tests/test_pipeline_e2e.py."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_dvc.pr_report import dvc_executable

ROOT = Path(__file__).resolve().parents[1]


def run(args, cwd, **env):
    environment = {k: v for k, v in os.environ.items() if k not in ("DVC_REMOTE_URL", "GITHUB_OUTPUT")}
    environment.update(DVC_NO_ANALYTICS="1", **env,
                       PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(args, cwd=cwd, env=environment, capture_output=True, text=True)


@pytest.fixture
def project(tmp_path):
    path = tmp_path / "project"
    path.mkdir()
    run(["git", "init", "-q"], path)
    assert run([dvc_executable(), "init", "-q"], path).returncode == 0
    (path / "data.txt").write_text("some data\n")
    assert run([dvc_executable(), "add", "-q", "data.txt"], path).returncode == 0
    return path


def cache(project, *args, **env):
    return run([sys.executable, "-m", "qlora_dvc", "cache", *args], project, **env)


def test_no_remote_means_run_everything_and_says_so(project, tmp_path):
    outputs = tmp_path / "github_output"
    done = cache(project, "check", GITHUB_ACTIONS="true", GITHUB_OUTPUT=str(outputs))
    assert done.returncode == 0
    assert done.stdout.strip() == "enabled=false"
    assert "::notice::cache: no DVC remote configured (set DVC_REMOTE_URL" in done.stderr
    assert outputs.read_text() == "enabled=false\n"


def test_missing_directory_is_unusable_not_silently_empty(project, tmp_path):
    done = cache(project, "check", "--url", str(tmp_path / "no-such-remote"), GITHUB_ACTIONS="true")
    assert done.returncode == 0 and done.stdout.strip() == "enabled=false"
    assert "::warning::cache: the DVC remote 'shared' cannot be used" in done.stderr
    assert "is not an existing directory" in done.stderr and "falling back to running every stage" in done.stderr


def test_unreachable_host(project):
    # Port 1 on localhost refuses connections (or the storage plugin is missing): not usable either way.
    done = cache(project, "check", DVC_REMOTE_URL="ssh://ci:secret@127.0.0.1:1/cache")
    assert done.stdout.strip() == "enabled=false" and "cannot be used" in done.stderr
    assert "secret" not in done.stderr + done.stdout  # credentials in a URL are never printed


def test_local_remote_is_configured_locally_checked_and_pushed(project, tmp_path):
    remote = tmp_path / "remote"
    remote.mkdir()
    done = cache(project, "check", DVC_REMOTE_URL=str(remote))
    assert done.stdout.strip() == "enabled=true", done.stderr
    assert "using the DVC remote 'shared'" in done.stderr
    # In .dvc/config.local, which git ignores: nothing about the team's storage gets committed by CI.
    assert "shared" in (project / ".dvc/config.local").read_text()
    assert "shared" not in (project / ".dvc/config").read_text()
    done = cache(project, "push")
    assert done.returncode == 0, done.stderr
    assert any(remote.rglob("*")), "nothing was pushed"


# `prepare` also writes an uncached metric, as every stage of the real pipeline does: `dvc push
# --run-cache` leaves such outputs out, and without them the stage is not restored (treeverse/dvc#5749).
PIPELINE = """
stages:
  prepare:
    cmd: {python} -c "import yaml; x = yaml.safe_load(open('params.yaml'))['x']; open('a.txt', 'w').write(str(x)); open('m.json', 'w').write(str([x]))"
    params: [x]
    outs: [a.txt]
    metrics:
      - m.json:
          cache: false
  train:
    cmd: {python} -c "open('b.txt', 'w').write(open('a.txt').read() * 2)"
    deps: [a.txt]
    outs: [b.txt]
"""


def test_a_fresh_clone_reuses_runs_through_the_run_cache(project, tmp_path):
    """What CI does with the shared cache, on a two-stage pipeline: main pushes outputs and
    run-cache; a fresh clone whose params no dvc.lock describes (CI's own config) restores every
    stage from the run-cache instead of running it; a stage whose params changed still runs."""
    dvc = dvc_executable()
    remote = tmp_path / "remote"
    remote.mkdir()
    (project / "dvc.yaml").write_text(PIPELINE.format(python=sys.executable))
    (project / "params.yaml").write_text("x: 1\n")
    assert run([dvc, "repro", "-q"], project).returncode == 0
    assert cache(project, "check", DVC_REMOTE_URL=str(remote)).stdout.strip() == "enabled=true"
    assert cache(project, "push").returncode == 0
    run(["git", "add", "-A"], project)
    assert run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "run"], project).returncode == 0

    clone = tmp_path / "clone"
    assert run(["git", "clone", "-q", str(project), str(clone)], tmp_path).returncode == 0
    (clone / "dvc.lock").unlink()
    assert cache(clone, "check", DVC_REMOTE_URL=str(remote)).stdout.strip() == "enabled=true"
    done = run([dvc, "repro", "--pull"], clone)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    assert "Running stage" not in log
    assert "Stage 'prepare' is cached - skipping run" in log and "Stage 'train' is cached - skipping run" in log
    assert (clone / "b.txt").read_text() == "11" and (clone / "m.json").read_text() == "[1]"

    # A changed param: that stage runs, and the one downstream of it (its input changed).
    (clone / "params.yaml").write_text("x: 2\n")
    done = run([dvc, "repro", "--pull"], clone)
    log = done.stdout + done.stderr
    assert "Running stage 'prepare'" in log and "Running stage 'train'" in log
    assert (clone / "b.txt").read_text() == "22"
