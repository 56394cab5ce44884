"""The GitHub workflow is valid: checked against the GitHub Actions workflow schema (vendored in
check-jsonschema, offline), plus the references a schema cannot see (step outputs, the shared-cache
wiring)."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github/workflows").glob("*.yml"))


def schema_check(*paths):
    exe = shutil.which("check-jsonschema") or str(Path(sys.executable).parent / "check-jsonschema")
    return subprocess.run([exe, "--builtin-schema", "vendor.github-workflows", *map(str, paths)],
                          capture_output=True, text=True)


def test_workflows_match_the_github_actions_schema():
    assert WORKFLOWS
    done = schema_check(*WORKFLOWS)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_schema_check_catches_a_broken_workflow(tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text(WORKFLOWS[0].read_text().replace("runs-on:", "runs_on:", 1))
    assert schema_check(broken).returncode != 0


def _steps(workflow):
    return [step for job in workflow["jobs"].values() for step in job.get("steps", [])]


def test_step_outputs_refer_to_steps_that_exist():
    for path in WORKFLOWS:
        text = path.read_text()
        ids = {step.get("id") for step in _steps(yaml.safe_load(text))}
        for ref in set(re.findall(r"steps\.([\w-]+)\.", text)):
            assert ref in ids, f"{path.name}: steps.{ref} has no step with that id"


def test_every_repro_uses_the_shared_cache_when_it_is_enabled():
    workflow = yaml.safe_load((ROOT / ".github/workflows/pr.yml").read_text())
    steps = _steps(workflow)
    names = [s.get("name", "") for s in steps]
    check = names.index("Shared DVC cache")
    repro_steps = [i for i, s in enumerate(steps) if "dvc repro" in s.get("run", "")]
    assert repro_steps and all(i > check for i in repro_steps)
    for i in repro_steps:
        assert "dvc repro $PULL" in steps[i]["run"], steps[i]["name"]
        assert "--pull" in steps[i]["env"]["PULL"]
    # Only main pushes to the shared cache; pull requests only read it.
    pushers = [s for s in steps if "cache push" in s.get("run", "")]
    assert len(pushers) == 1 and pushers[0]["if"] == "github.event_name == 'push'"
    assert workflow[True]["push"]["branches"] == ["main"]  # YAML 1.1 reads the key `on` as True
