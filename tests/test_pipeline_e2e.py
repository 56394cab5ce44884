"""End to end: `dvc repro` of the whole pipeline on a tiny config, with the real default model on
CPU. Checks the adapter, that LoRA learned while the base stayed put, caching, which stages a
params change invalidates, resume after SIGKILL, and that a canary HF_TOKEN leaks nowhere."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

# Made at run time, so the token is in no file (this one included) unless the pipeline leaks it.
CANARY = "hf_canary" + uuid.uuid4().hex
BIN = Path(sys.executable).parent
TINY = {
    "train": {"max_steps": 6, "batch_size": 4, "save_steps": 2, "eval_steps": 3, "logging_steps": 1,
              "max_length": 256, "replay.max_new_tokens": 16},
    # No gates: six steps teach the format only partly; gates are the default config's business.
    "evaluate": {"max_samples": 4, "max_new_tokens": 24, "batch_size": 8, "n_samples": 2, "gates": []},
    "export": {"gguf": None, "check_prompts": 1, "check_max_new_tokens": 8},
}
# What the copy leaves out: outputs, caches and environments, never sources.
IGNORE = shutil.ignore_patterns(".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".hypothesis",
                                "models", "checkpoints", "cache", "tmp", "clean", "dedup", "split", "eval",
                                "reports", ".whl", "bench")


def _env() -> dict:
    env = dict(os.environ, HF_TOKEN=CANARY, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1")
    return env


def _run(args, cwd, check=True, **kwargs):
    result = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def _set_params(project: Path, updates: dict) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in updates.items():
        for key, value in values.items():
            node = params[section]
            *parents, last = key.split(".")
            for part in parents:
                node = node[part]
            node[last] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = tmp_path_factory.mktemp("e2e") / "project"
    shutil.copytree(ROOT, project, ignore=IGNORE)
    # Its own DVC cache, as in CI's fresh clone: not a developer's shared cache (.dvc/config.local),
    # whose run-cache holds everyone's runs (the shared-cache test pushes the run-cache).
    (project / ".dvc/config.local").unlink(missing_ok=True)
    # models/ holds outputs and is left out above, except what git tracks there: models/base/README.md
    # keeps model.files (a DVC dependency of train, evaluate and export) present in a fresh clone.
    (project / "models/base").mkdir(parents=True)
    shutil.copy(ROOT / "models/base/README.md", project / "models/base")
    # A slice of the shipped sample keeps the run short; its defects still exercise every stage.
    # Bytes, not text: the sample has a non-UTF-8 line on purpose.
    lines = (ROOT / "data/raw/support_tickets.jsonl").read_bytes().splitlines(keepends=True)
    (project / "data/raw/tiny.jsonl").write_bytes(b"".join(lines[:160]))
    _set_params(project, {"data": {"raw": "data/raw/tiny.jsonl"}, **TINY})
    _run(["git", "init", "-q"], project)
    _run(["git", "add", "-A"], project)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"], project)
    result = _run([str(BIN / "dvc"), "repro"], project)
    project.joinpath("first_repro.log").write_text(result.stdout + result.stderr)
    return project


def test_repro_writes_a_peft_adapter_and_reports(project):
    adapter = project / "models/adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "training_config.json"):
        assert (adapter / name).exists(), name
    train = json.loads((project / "reports/train.json").read_text())
    assert train["steps"] == 6
    assert train["final_loss"] < train["first_loss"], "training on CPU must lower the loss"
    # The CPU default: no nf4, packed rows, and bf16 products of the frozen weights (fp32 LoRA,
    # norms, loss) where the CPU has bf16 matrix instructions, fp32 where it would emulate them.
    from stages.lib.precision import cpu_multiplies_bf16

    expected_dtype = "bf16" if cpu_multiplies_bf16() else "fp32"
    assert train["plan"]["compute_dtype"] == expected_dtype and train["plan"]["quantize"] is False
    assert train["plan"]["packing"] is True
    loss_curve = (project / "reports/train/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert loss_curve[0] == "step\tloss" and len(loss_curve) == 7
    report = json.loads((project / "reports/eval.json").read_text())
    assert {"base", "tuned", "delta"} <= report.keys()
    for metric in ("loss", "json_valid", "rouge_l", "chrf", "general_accuracy", "general_perplexity"):
        for side in ("base", "tuned", "delta"):
            entry = report[side][metric]  # every metric has its 95 % interval
            assert entry["lower"] <= entry["value"] <= entry["upper"], (side, metric, entry)
    assert report["tuned"]["loss"]["value"] < report["base"]["loss"]["value"]
    assert report["n"]["test"] == 4 and report["interval"]["confidence"] == 0.95
    # The per-row results the intervals come from are kept, one row per test row and probe.
    scores = json.loads((project / "data/eval/tuned/scores.json").read_text())
    assert len(scores["test"]) == 4 and all(r["loss_tokens"] > 0 for r in scores["test"])
    assert len(scores["probes"]) == report["n"]["probes"] and scores["text"]
    assert (project / "reports/samples.md").read_text().count("| marks |") == 2


def test_lora_weights_changed_base_weights_did_not(project):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    adapter = project / "models/adapter"
    weights = load_file(adapter / "adapter_model.safetensors")
    assert weights and all("lora_" in name for name in weights)
    # lora_B starts at zero: any non-zero B means the adapter learned.
    assert any(t.abs().sum() > 0 for n, t in weights.items() if "lora_B" in n)

    # The materialised default model's folder (models/base/builtin/<gguf name>-<sha>).
    base_dir = next(path for path in (project / "models/base/builtin").iterdir() if path.is_dir())
    base_before = load_file(base_dir / "model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    ids = torch.tensor([[1, 4093, 198, 19556, 30, 2, 198, 1, 520, 9531, 198]])
    with torch.no_grad():
        base_logits = base(ids).logits
        tuned = PeftModel.from_pretrained(base, adapter)  # plain PEFT, no project code
        tuned_logits = tuned(ids).logits
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-4)
    for name, tensor in tuned.get_base_model().state_dict().items():
        key = name.replace(".base_layer", "")
        if key in base_before:
            assert torch.equal(tensor, base_before[key]), f"base weight {key} changed"


def test_second_repro_does_nothing(project):
    result = _run([str(BIN / "dvc"), "repro"], project)
    assert "Data and pipelines are up to date" in result.stdout + result.stderr


def _changed_stages(project) -> set[str]:
    status = json.loads(_run([str(BIN / "dvc"), "status", "--json"], project).stdout or "{}")
    return set(status)


def test_params_changes_invalidate_exactly_their_stages(project):
    original = (project / "params.yaml").read_text()
    try:
        _set_params(project, {"train": {"lora.r": 8}})
        assert _changed_stages(project) == {"train"}  # evaluate follows from the new adapter
        (project / "params.yaml").write_text(original)
        _set_params(project, {"dedup": {"threshold": 0.75}})
        assert _changed_stages(project) == {"dedup"}  # clean is untouched; split follows dedup
        (project / "params.yaml").write_text(original)
        _set_params(project, {"evaluate": {"max_new_tokens": 20}})
        assert _changed_stages(project) == {"evaluate_base", "evaluate"}
        (project / "params.yaml").write_text(original)
        # The judge's params re-run the judge alone, never the (minutes-long) generation; its
        # operational knobs re-run nothing.
        _set_params(project, {"evaluate": {"judge.rubric": "Prefer the shorter answer."}})
        assert _changed_stages(project) == {"judge"}
        (project / "params.yaml").write_text(original)
        _set_params(project, {"evaluate": {"judge.retries": 9, "judge.timeout_s": 5, "judge.concurrency": 4}})
        assert _changed_stages(project) == set()
    finally:
        (project / "params.yaml").write_text(original)
    assert _changed_stages(project) == set()


def test_forced_rerun_is_deterministic(project):
    """Data stages byte for byte; CPU training with the same seed to within float tolerance."""
    import torch
    from safetensors.torch import load_file

    data_outputs = ["data/clean/records.jsonl", "data/clean/rejected.jsonl", "data/dedup/records.jsonl",
                    "data/dedup/removed.jsonl", "data/split/train.jsonl", "data/split/test.jsonl"]
    before = {p: (project / p).read_bytes() for p in data_outputs}
    adapter_before = load_file(project / "models/adapter/adapter_model.safetensors")
    _run([str(BIN / "dvc"), "repro", "-f", "train"], project)
    for path in data_outputs:
        assert (project / path).read_bytes() == before[path], f"{path} changed on a forced re-run"
    adapter_after = load_file(project / "models/adapter/adapter_model.safetensors")
    assert adapter_after.keys() == adapter_before.keys()
    for name, tensor in adapter_before.items():
        assert torch.allclose(tensor, adapter_after[name], atol=1e-5), name


def test_killed_training_resumes_from_its_last_checkpoint(project):
    _set_params(project, {"train": {"learning_rate": 0.0004}})  # a new run: old checkpoints don't apply
    checkpoints = project / "checkpoints/train"
    process = subprocess.Popen([str(BIN / "dvc"), "repro", "train"], cwd=project, env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    try:
        while time.time() < deadline and process.poll() is None:
            if list(checkpoints.glob("*/checkpoint-4/checkpoint_seal.json")):
                break
            time.sleep(0.5)
        assert process.poll() is None, "training finished before it could be interrupted"
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    result = _run([str(BIN / "dvc"), "repro", "train"], project)
    assert "resuming from" in result.stderr
    assert json.loads((project / "reports/train.json").read_text())["resumed_from_step"] == 4
    loss_curve = (project / "reports/train/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert len(loss_curve) == 7, "the curve before the interruption is replayed"


def test_canary_token_appears_nowhere(project):
    leaks = []
    for path in project.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000 and ".git" not in path.parts:
            if CANARY.encode() in path.read_bytes():
                leaks.append(str(path.relative_to(project)))
    assert not leaks, f"HF_TOKEN leaked into {leaks}"


# --- the shared DVC cache (CI) through a local-directory remote ------------------------------------
# It commits the fixture's outputs (dvc.lock, the remote in .dvc/config) so that clones can find them;
# the workspace itself is left as it was, so the tests after it see the same project.

def _downstream(project, changed: set[str]) -> set[str]:
    """The stages `dvc repro` runs: the changed ones and every stage that depends on them (dvc
    status reports only the first; the others change when their inputs are rewritten)."""
    import re

    dot = _run([str(BIN / "dvc"), "dag", "--dot"], project).stdout
    edges = re.findall(r'"([^"]+)" -> "([^"]+)"', dot)
    result, frontier = set(changed), list(changed)
    while frontier:
        stage = frontier.pop()
        for upstream, downstream in edges:
            if upstream == stage and downstream not in result:
                result.add(downstream)
                frontier.append(downstream)
    return result


def test_shared_cache_through_a_local_remote(project, tmp_path):
    dvc = str(BIN / "dvc")
    remote = tmp_path / "remote"
    remote.mkdir()
    # What main's CI does: run the pipeline (earlier tests of this module may have left stages
    # out of date, e.g. a re-trained adapter that evaluate has not seen), then push outputs,
    # run-cache and the uncached outputs (metrics, plots) to the shared remote.
    _run([dvc, "repro"], project)
    _run([dvc, "remote", "add", "-d", "shared", str(remote)], project)
    _run([sys.executable, "-m", "qlora_dvc", "cache", "push"], project)
    _run(["git", "add", "-A"], project)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "outputs"], project)

    # A fresh clone (its own empty cache, no outputs): dvc pull, then nothing is out of date.
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    assert not (clone / "models/adapter").exists()
    _run([dvc, "pull"], clone)
    assert (clone / "models/adapter/adapter_model.safetensors").is_file()
    assert _changed_stages(clone) == set()

    # What a change re-runs, as `dvc repro` would decide it in that clone.
    original = (clone / "params.yaml").read_text()
    try:
        _set_params(clone, {"evaluate": {"max_new_tokens": 20}})
        # judge and prefs read both evaluations' answers (cheap: the judge is off by default).
        assert _downstream(clone, _changed_stages(clone)) == {"evaluate_base", "evaluate", "judge", "prefs"}
        (clone / "params.yaml").write_text(original)
        _set_params(clone, {"train": {"learning_rate": 0.0005}})
        assert _downstream(clone, _changed_stages(clone)) == {"train", "evaluate", "export", "judge", "prefs"}
    finally:
        (clone / "params.yaml").write_text(original)

    # A remote that is not there: said in one line, and CI falls back to running every stage.
    done = _run([sys.executable, "-m", "qlora_dvc", "cache", "check", "--url", str(tmp_path / "gone")], clone)
    assert done.stdout.strip() == "enabled=false"
    assert "is not an existing directory" in done.stderr and "falling back to running every stage" in done.stderr

    # CI's path: CI runs its own (CI-sized) params, which no committed dvc.lock describes, so only
    # the remote's run-cache can spare it the work. A fresh clone without dvc.lock is in that
    # position: `dvc repro --pull` finds every stage's deps, params and command in the run-cache,
    # restores its outputs, and runs none.
    ci = tmp_path / "ci"
    _run(["git", "clone", "-q", str(project), str(ci)], tmp_path)
    (ci / "dvc.lock").unlink()
    result = _run([dvc, "repro", "--pull"], ci)
    log = result.stdout + result.stderr
    assert "Stage 'train' is cached - skipping run" in log
    # DVC saves no run-cache entry for a stage with an uncached plain `outs:` entry (metrics and
    # plots are exempt): dvc.yaml keeps such outputs cached, or this stage would re-run.
    ran = re.findall(r"Running stage '(\w+)'", log)
    assert not ran, log[-3000:]
    assert _changed_stages(ci) == set()


def test_judge_on_with_a_stand_in_judge_server(project, tmp_path, monkeypatch):
    """Issue 16's "done when": with llama.cpp's server serving the default model as a stand-in
    judge, `dvc repro` with the judge on writes reports/judge.json with both orders judged for
    every row, a second `dvc repro` does nothing, the PR report shows the judge's win rate with
    its interval, and a new adapter re-judges."""
    from test_judge_llama import MODEL_ALIAS, llama_judge_server

    key = "sk-judge-canary-" + uuid.uuid4().hex
    monkeypatch.setenv("JUDGE_API_KEY", key)     # llama.cpp ignores it; it must leak nowhere
    original = (project / "params.yaml").read_text()
    try:
        with llama_judge_server(tmp_path) as url:
            _set_params(project, {"evaluate": {"judge.enabled": True, "judge.url": url, "judge.model": MODEL_ALIAS,
                                               "judge.response_format": "json_object_schema",
                                               "judge.max_tokens": 96, "judge.timeout_s": 300}})
            first = _run([str(BIN / "dvc"), "repro"], project)
            second = _run([str(BIN / "dvc"), "repro"], project)
            log = first.stdout + first.stderr
            assert "Running stage 'judge'" in log
            assert "Data and pipelines are up to date" in second.stdout + second.stderr
            rows = [json.loads(line)["id"] for line in (project / "data/eval/tuned/predictions.jsonl").read_text().splitlines()]
            report = json.loads((project / "reports/judge.json").read_text())
            assert report["enabled"] is True and report["rows"] == len(rows) == TINY["evaluate"]["max_samples"]
            replies = [json.loads(line) for line in (project / "data/judge/replies.jsonl").read_text().splitlines()]
            assert sorted((r["id"], r["order"]) for r in replies) == sorted(
                (row, order) for row in rows for order in ("base_first", "tuned_first"))
            assert all(r["reply"] for r in replies) and report["unparsable"]["count"] == 0
            assert sum(report[k]["count"] for k in ("win", "tie", "loss", "unparsable")) == len(rows)
            assert report["win"]["lower"] <= report["win"]["rate"] <= report["win"]["upper"]
            _run([sys.executable, "-m", "qlora_dvc", "pr-report", "--base", "HEAD", "--no-plots", "--out", "pr.md"],
                 project)
            win = report["win"]
            assert (f"| LLM judge `{MODEL_ALIAS}`, {len(rows)} rows × 2 orders | {win['rate']:.2f} "
                    f"[{win['lower']:.2f}, {win['upper']:.2f}] |") in (project / "pr.md").read_text()
            # A new adapter means new tuned answers: the judge runs again (export is left out here).
            _set_params(project, {"train": {"lora.r": 4}})
            third = _run([str(BIN / "dvc"), "repro", "judge"], project)
            log3 = third.stdout + third.stderr
            assert "Running stage 'train'" in log3 and "Running stage 'judge'" in log3
            assert json.loads((project / "reports/judge.json").read_text())["judgements"] == 2 * len(rows)
    finally:
        (project / "params.yaml").write_text(original)
    for path in project.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000 and ".git" not in path.parts:
            assert key.encode() not in path.read_bytes(), f"the judge key leaked into {path}"
