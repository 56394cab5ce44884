"""run_stage: every stage fails the same way (one line, exit 1), Ctrl-C exits 130, --debug shows
the traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from stages.lib.stage import StageError, run_stage

ROOT = Path(__file__).resolve().parents[1]


def test_status_passes_through():
    assert run_stage("x", lambda: 0) == 0
    assert run_stage("x", lambda: None) == 0
    assert run_stage("x", lambda: 1) == 1


def test_one_clear_line_without_traceback(capsys, monkeypatch):
    monkeypatch.delenv("QLORA_DVC_DEBUG", raising=False)

    def main():
        raise StageError("the input is empty")

    assert run_stage("clean", main) == 1
    assert capsys.readouterr().err == "clean: the input is empty\n"


def test_unexpected_exception_names_its_type(capsys, monkeypatch):
    monkeypatch.delenv("QLORA_DVC_DEBUG", raising=False)

    def main():
        return {}["missing"]

    assert run_stage("split", main) == 1
    assert capsys.readouterr().err == "split: KeyError: 'missing'\n"


def test_debug_env_prints_traceback(capsys, monkeypatch):
    monkeypatch.setenv("QLORA_DVC_DEBUG", "1")

    def main():
        raise ValueError("bad value")

    assert run_stage("train", main) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.endswith("train: bad value\n")


def test_debug_flag_is_taken_out_of_argv(capsys, monkeypatch):
    monkeypatch.delenv("QLORA_DVC_DEBUG", raising=False)
    seen = []

    def main(argv):
        seen.append(argv)
        raise ValueError("boom")

    assert run_stage("evaluate", main, ["--model", "base", "--debug"]) == 1
    assert seen == [["--model", "base"]]
    assert "Traceback" in capsys.readouterr().err


def test_keyboard_interrupt_is_130(capsys):
    def main():
        raise KeyboardInterrupt

    assert run_stage("train", main) == 130
    assert capsys.readouterr().err == "train: interrupted\n"


def test_argparse_exit_is_kept():
    def main():
        raise SystemExit(2)

    with pytest.raises(SystemExit):
        run_stage("evaluate", main)


@pytest.mark.parametrize("script", sorted(p.stem for p in (ROOT / "stages").glob("*.py") if p.stem != "__init__"))
def test_every_stage_script_runs_under_run_stage(script):
    source = (ROOT / "stages" / f"{script}.py").read_text(encoding="utf-8")
    # run_model_stage (stages/lib/modeling.py) leaves bitsandbytes out, then calls run_stage
    # (tests/test_modeling.py runs it).
    assert "run_stage(" in source or "run_model_stage(" in source, \
        f"stages/{script}.py does not run under stages.lib.stage.run_stage"


def test_a_stage_that_fails_prints_one_line(tmp_path):
    # A real stage in a project with no params.yaml: one line on stderr, exit 1, no traceback.
    result = subprocess.run([sys.executable, "-m", "stages.clean"], cwd=tmp_path, capture_output=True,
                            text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("clean")
