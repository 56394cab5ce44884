"""The `qlora-dvc` console script: pyproject points it at a callable, packaging ships its package,
and the subcommands dispatch, print their help and fail in one line."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_console_script_resolves_to_a_callable():
    target = _pyproject()["project"]["scripts"]["qlora-dvc"]
    module, _, attr = target.partition(":")
    assert callable(getattr(importlib.import_module(module), attr))


def test_packaging_ships_the_cli_and_the_stages():
    from setuptools import find_packages

    include = _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    found = set(find_packages(where=str(ROOT), include=include))
    assert {"qlora_dvc", "stages", "stages.lib"} <= found


def _cli(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("QLORA_DVC_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "qlora_dvc", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_help_lists_every_command():
    from qlora_dvc.cli import COMMANDS

    done = _cli("--help")
    assert done.returncode == 0
    for name in COMMANDS:
        assert name in done.stdout


def test_no_command_and_unknown_command_are_usage_errors():
    assert _cli().returncode == 2
    done = _cli("frobnicate")
    assert done.returncode == 2 and "unknown command 'frobnicate'" in done.stderr


@pytest.mark.parametrize("command", ["generate", "pr-report", "prefs"])
def test_each_command_has_its_own_help(command):
    done = _cli(command, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: qlora-dvc {command}")


def test_a_failing_command_is_one_line_and_exit_1(tmp_path):
    # Not a git repository: pr-report explains in one line.
    done = _cli("pr-report", "--no-plots", cwd=tmp_path)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("pr-report: ")
