"""dvc.yaml's code `deps` are exactly the project modules each stage's script imports.

DVC re-runs a stage only when one of its `deps` changes, so a module the stage imports but does
not list makes an edit to it re-run nothing, and a module listed but not imported re-runs the
stage for nothing (the `evaluate_base` cache is the point of keeping it apart from training).
Imports are read with `ast`, transitively, including the lazy ones inside functions.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("stages", "qlora_dvc")


def _module_file(module: str) -> Path | None:
    """The project file for a dotted module name (a module or a package's __init__), else None."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(path: Path) -> set[str]:
    """Dotted names of every module `path` imports, anywhere in the file (lazy imports included).
    `from a.b import c` counts a.b, and a.b.c too when c is a module."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def project_imports(script: Path) -> set[str]:
    """Repository-relative paths of the project files `script` imports, transitively, itself
    included. Package __init__ files that hold no code (at most a docstring) are left out."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in _imported_modules(path):
            found = _module_file(module)
            if found is not None and found not in seen:
                todo.append(found)
    return {p.relative_to(ROOT).as_posix() for p in seen
            if not (p.name == "__init__.py" and _only_docstring(p))}


def _only_docstring(path: Path) -> bool:
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)


def _stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def _script_of(stage: dict) -> Path:
    # cmd: python -m stages.<name> [args]
    words = stage["cmd"].split()
    return _module_file(words[words.index("-m") + 1])


@pytest.mark.parametrize("name", sorted(_stages()))
def test_code_deps_are_the_modules_the_script_imports(name):
    stage = _stages()[name]
    listed = {d for d in stage["deps"] if str(d).endswith(".py")}
    imported = project_imports(_script_of(stage))
    assert listed == imported, (
        f"dvc.yaml stage {name!r}: missing from deps {sorted(imported - listed)}, "
        f"listed but not imported {sorted(listed - imported)}")


def test_the_import_reader_sees_lazy_and_from_imports(tmp_path, monkeypatch):
    # The walk must follow an import inside a function body and `from stages.lib import x`.
    found = project_imports(ROOT / "stages/train.py")
    assert "stages/lib/training.py" in found        # imported inside main()
    assert "stages/lib/packing.py" in found         # only through training.py
    assert "stages/lib/stage.py" in found           # inside `if __name__ == "__main__"`


def test_generation_does_not_import_training():
    # evaluate_base must stay cached when training code changes.
    assert "stages/lib/training.py" not in project_imports(ROOT / "stages/lib/generation.py")
    assert "stages/lib/training.py" not in project_imports(ROOT / "stages/evaluate.py")


def _project_copy(tmp_path: Path) -> Path:
    """The repository's tracked files (as they are in this checkout) in a fresh git repo, with every
    stage's outputs present as placeholders and `dvc commit` recording all stages as up to date.
    Only the code dependencies are under test, so the outputs' content does not matter."""
    import shutil
    import subprocess

    project = tmp_path / "project"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file() and not name.startswith(".dvc/config.local") and name != "dvc.lock":
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, project / name)
    # Committed before the outputs exist, so that git tracks only what the repository tracks
    # (DVC refuses to take over an output that git already tracks).
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"]):
        subprocess.run(command, cwd=project, check=True, capture_output=True)
    for stage in _stages().values():
        for section in ("outs", "metrics", "plots"):
            for entry in stage.get(section, []):
                out = project / (next(iter(entry)) if isinstance(entry, dict) else entry)
                if out.suffix:
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_text("{}\n")
                else:
                    out.mkdir(parents=True, exist_ok=True)
                    (out / "placeholder.json").write_text("{}\n")
    _dvc(project, "commit", "--force")
    return project


def _dvc(project: Path, *args) -> str:
    import os
    import subprocess
    import sys

    dvc = Path(sys.executable).with_name("dvc")
    done = subprocess.run([str(dvc), *args], cwd=project, capture_output=True, text=True,
                          env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _changed_stages(project: Path) -> set[str]:
    import json

    return set(json.loads(_dvc(project, "status", "--json") or "{}"))


def test_training_code_edit_leaves_evaluate_base_cached(tmp_path):
    project = _project_copy(tmp_path)
    assert _changed_stages(project) == set()

    training = project / "stages/lib/training.py"
    original = training.read_text()
    training.write_text(original + "\n# an edit to the training code\n")
    changed = _changed_stages(project)
    assert "train" in changed
    assert "evaluate_base" not in changed, changed

    # And the check can fail: the code evaluate_base does run re-runs it.
    training.write_text(original)
    generation = project / "stages/lib/generation.py"
    generation.write_text(generation.read_text() + "\n# an edit to the generation code\n")
    assert {"evaluate_base", "evaluate"} <= _changed_stages(project)


def _string_literals(paths) -> set[str]:
    found = set()
    for path in paths:
        for node in ast.walk(ast.parse((ROOT / path).read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and "/" in node.value:
                found.add(node.value.rstrip("/"))
    return found


@pytest.mark.parametrize("name", sorted(_stages()))
def test_paths_in_dvc_yaml_are_the_paths_the_stage_uses(name):
    # An output or data input renamed in dvc.yaml but not in the code (or the other way round)
    # would make DVC cache a file the stage never writes, or miss the one it reads.
    stage = _stages()[name]
    paths = [str(d) for d in stage["deps"] if not str(d).endswith(".py") and "${" not in str(d)]
    for section in ("outs", "metrics", "plots"):
        paths += [next(iter(e)) if isinstance(e, dict) else e for e in stage.get(section, [])]
    literals = _string_literals(project_imports(_script_of(stage)))
    # The code may name the path itself, a folder above it, or a file inside it.
    unknown = [p for p in paths if not any(p == lit or p.startswith(lit + "/") or lit.startswith(p + "/")
                                           for lit in literals)]
    assert not unknown, f"dvc.yaml stage {name!r} names paths its code never mentions: {unknown}"
