"""Train, evaluate, export, generate and the PR report fail loudly and early (issue 20).

Each test injects one of the faults an adversarial pass found (a diverging learning rate, an
adapter of NaNs or of another base, a hub model that cannot be reached, a probe row without
answers, a pattern that backtracks for ever, ...) into a small project that uses a tiny
random-weight Llama (2 layers, hidden 64, the real SmolLM2 tokenizer), runs the real stage
through the shared wrapper (stages/lib/stage.py), and checks for one clear line on stderr, exit
status 1, and no traceback.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.processes import sigint_as_in_a_terminal

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _conversation(i: int, *, answer: bool = True) -> dict:
    messages = [{"role": "user", "content": f"Ticket {i}: my order {i * 7} arrived broken"}]
    if answer:
        messages.append({"role": "assistant", "content": f"Sorry about order {i * 7}; a replacement is on its way."})
    return {"id": f"row{i}", "messages": messages, "source": {"file": "t", "line": i}, "meta": {}}


def _write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


TINY_PARAMS = {
    "model": {"base": "models/tiny", "files": "models/tiny"},
    "train": {"quantization": "none", "max_steps": 2, "batch_size": 2, "max_length": 64, "save_steps": 1,
              "eval_steps": 2, "logging_steps": 1, "learning_rate": 0.001},
    "evaluate": {"max_samples": 2, "max_new_tokens": 4, "batch_size": 8, "n_samples": 1, "gates": [],
                 "json_schema": None, "json_fields": []},
    "export": {"gguf": None, "check_prompts": 1, "check_max_new_tokens": 4},
}


def set_params(project: Path, updates: dict) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in updates.items():
        for key, value in values.items():
            node = params.setdefault(section, {})
            *parents, last = key.split(".")
            for part in parents:
                node = node[part]
            node[last] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def project(tmp_path, tiny_model_dir, monkeypatch):
    """A project with the tiny model in models/tiny, a split and the shipped probes; cwd inside it."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "params.yaml", project)
    set_params(project, TINY_PARAMS)
    shutil.copytree(tiny_model_dir, project / "models/tiny")
    _write_jsonl(project / "data/split/train.jsonl", [_conversation(i) for i in range(8)])
    _write_jsonl(project / "data/split/validation.jsonl", [_conversation(i) for i in range(8, 10)])
    _write_jsonl(project / "data/split/test.jsonl", [_conversation(i) for i in range(10, 13)])
    # Three of the shipped probes and the start of their text: enough to run every code path.
    (project / "data/probes").mkdir(parents=True)
    shipped = (ROOT / "data/probes/general.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (project / "data/probes/general.jsonl").write_text("".join(shipped[:3]), encoding="utf-8")
    text = (ROOT / "data/probes/general_text.txt").read_text(encoding="utf-8")
    (project / "data/probes/general_text.txt").write_text(text[:600], encoding="utf-8")
    monkeypatch.chdir(project)
    # No network here: offline, as a laptop on a train (read at import by huggingface_hub).
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return project


def run_stage_here(name: str, main, capsys, argv=None) -> tuple[int, str]:
    """Run a stage's main through the shared wrapper, in this process; return (status, stderr)."""
    from stages.lib.stage import run_stage

    status = run_stage(name, main, argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return status, err


def last_line(err: str) -> str:
    # A progress bar redraws its line with carriage returns; the message is what follows them.
    return err.strip().splitlines()[-1].split("\r")[-1]


def _train(capsys):
    from stages import train

    return run_stage_here("train", train.main, capsys)


def _evaluate(capsys, which: str):
    from stages import evaluate

    return run_stage_here("evaluate", evaluate.main, capsys, ["--model", which])


def _export(capsys):
    from stages import export

    return run_stage_here("export", export.main, capsys)


def _fake_adapter(project: Path, base_dir: Path, *, nan: bool = False, seed: int = 0) -> Path:
    """A LoRA adapter of `base_dir` written as the train stage writes it (training_config.json with
    the base's identity), without training: lora_B random so the adapter changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from stages.lib.io import write_json
    from stages.lib.modeling import ResolvedModel, base_identity

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)
                if nan:
                    parameter.fill_(float("nan"))
    adapter = project / "models/adapter"
    peft_model.save_pretrained(adapter, safe_serialization=True)
    identity = base_identity(ResolvedModel(str(base_dir), None, False, "models/tiny"))
    write_json(adapter / "training_config.json", {"base_model": {**identity, "resolved": str(base_dir)}})
    return adapter


# --------------------------------------------------------------------------------------------
# Silent wrong results


def test_infinite_learning_rate_is_refused_by_params():
    from stages.lib.params import ParamsError, validate_params

    with pytest.raises(ParamsError, match=r"train\.learning_rate"):
        validate_params({"train": {"learning_rate": float("inf")}})


def _poison_base(project: Path) -> None:
    """One norm weight of the base set to NaN (a corrupted download, an overflowed conversion):
    every loss and logit of the model is then NaN."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = project / "models/tiny/model.safetensors"
    tensors = load_file(str(weights))
    norm = next(k for k in tensors if k.endswith("norm.weight"))
    tensors[norm] = torch.full_like(tensors[norm], float("nan"))
    save_file(tensors, str(weights), metadata={"format": "pt"})


def test_non_finite_training_stops_naming_the_step(project, capsys):
    # The Trainer logs a NaN loss as the running mean (logging_nan_inf_filter) and carries on to
    # an adapter of NaNs with exit 0; the guard stops at the first step instead.
    _poison_base(project)
    status, err = _train(capsys)
    assert status == 1
    line = last_line(err)
    assert line.startswith("train: step 1: the gradient is not finite (NaN or infinity)"), line
    assert "lower train.learning_rate" in line
    assert not (project / "models/adapter").exists()


def test_training_guard_catches_a_nan_loss_at_its_step():
    """The callback on its own: gradients that are NaN before the first update name step 1."""
    import torch

    from stages.lib.numeric import NonFiniteError, make_finite_guard_callback

    layer = torch.nn.Linear(2, 2)
    layer(torch.tensor([[float("nan"), 1.0]])).sum().backward()
    guard = make_finite_guard_callback()

    class Args:
        fp16 = False
        learning_rate = 1e-3

    class State:
        global_step = 0

    with pytest.raises(NonFiniteError, match=r"^step 1: the gradient is not finite .* weight"):
        guard.on_pre_optimizer_step(Args(), State(), None, model=layer)


def strict_json(text: str):
    """JSON as a strict parser reads it: NaN and Infinity are not JSON (Python's json accepts them)."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_metrics_json_never_holds_nan(tmp_path):
    from stages.lib.io import write_json

    write_json(tmp_path / "m.json", {"loss": float("nan"), "nested": {"ppl": float("inf")}, "ok": 0.5})
    data = strict_json((tmp_path / "m.json").read_text())
    assert data["loss"] is None and data["nested"]["ppl"] is None and data["ok"] == 0.5
    assert data["non_finite"] == {"loss": "nan: not a finite number, written as null",
                                  "nested.ppl": "inf: not a finite number, written as null"}


def test_evaluation_of_a_nan_model_writes_null_and_the_reason(project, capsys):
    """A base whose weights hold NaN: the loss is NaN; eval_base.json says null and why."""
    _poison_base(project)
    status, err = _evaluate(capsys, "base")
    assert status == 0, err
    for path in ("reports/eval_base.json", "data/eval/base/metrics.json", "data/eval/base/scores.json"):
        strict_json((project / path).read_text())
    metrics = json.loads((project / "reports/eval_base.json").read_text())
    assert "loss" not in metrics and "perplexity" not in metrics  # no number made up
    assert metrics["non_finite"]["test.loss_sum"] == ("2 of 2 rows not finite (NaN or infinity): the metrics "
                                                      "computed from it are left out")
    assert "warning: non-finite " in err and "test.loss_sum" in err


def test_export_refuses_a_nan_adapter(project, capsys):
    _fake_adapter(project, project / "models/tiny", nan=True)
    status, err = _export(capsys)
    assert status == 1
    assert "non-finite weights" in last_line(err) and "models/adapter" in last_line(err)
    assert not (project / "models/merged").exists()


def test_evaluate_refuses_a_nan_adapter(project, capsys):
    _fake_adapter(project, project / "models/tiny", nan=True)
    status, err = _evaluate(capsys, "tuned")
    assert status == 1 and "non-finite weights" in last_line(err)


def test_export_never_reports_a_nan_merge_as_equal():
    """The merge check's max |logit diff| must not hide NaN (max(0.0, nan) is 0.0 in Python)."""
    from stages.lib.numeric import NonFiniteError, check_model_finite
    import torch

    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="the merged model has non-finite weights .* weight"):
        check_model_finite(model, "the merged model")


def test_max_steps_zero_is_an_error_not_one_step():
    from stages.lib.params import ParamsError, validate_params

    with pytest.raises(ParamsError, match="train.max_steps: 0 would train nothing"):
        validate_params({"train": {"max_steps": 0}})


def test_test_rows_without_a_reference_are_an_error(project, capsys):
    _write_jsonl(project / "data/split/test.jsonl", [_conversation(1), _conversation(2, answer=False)])
    status, err = _evaluate(capsys, "base")
    assert status == 1
    assert "1 of 2 test rows have no reference answer" in last_line(err) and "row2" in last_line(err)


@pytest.mark.parametrize("stage", ["evaluate", "export"])
def test_adapter_of_another_base_with_the_same_shapes_is_refused(project, capsys, tmp_path, smollm2_tokenizer,
                                                                  stage):
    from conftest import make_tiny_model

    other = make_tiny_model(tmp_path / "other", smollm2_tokenizer, seed=1)  # same shapes, other weights
    _fake_adapter(project, other)  # records the other base's hash under the same name (models/tiny)
    status, err = _evaluate(capsys, "tuned") if stage == "evaluate" else _export(capsys)
    assert status == 1
    line = last_line(err)
    assert "does not belong to this base model" in line and "files (sha256)" in line, line


def test_weights_replaced_in_place_are_refused_by_evaluate(project, capsys):
    _fake_adapter(project, project / "models/tiny")
    from safetensors.torch import load_file, save_file

    weights = project / "models/tiny/model.safetensors"
    tensors = load_file(str(weights))
    tensors = {k: v * 1.01 for k, v in tensors.items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    status, err = _evaluate(capsys, "tuned")
    assert status == 1 and "does not belong to this base model" in last_line(err)


# --------------------------------------------------------------------------------------------
# Raw tracebacks from libraries


def test_target_modules_matching_nothing_is_one_line(project, capsys):
    set_params(project, {"train": {"lora.target_modules": ["q_projj", "v_proj"]}})
    status, err = _train(capsys)
    assert status == 1
    assert last_line(err) == ("train: train.lora.target_modules: 'q_projj' matches no module of the model; its "
                              "linear layers are down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj "
                              "(or use all-linear)")


def test_unknown_lr_scheduler_is_a_params_error():
    from stages.lib.params import ParamsError, validate_params

    with pytest.raises(ParamsError, match="train.lr_scheduler: Input should be 'linear', 'cosine'"):
        validate_params({"train": {"lr_scheduler": "bogus"}})


def test_offline_hub_model_is_one_line(project, capsys):
    set_params(project, {"model": {"base": "qlora-dvc-test/no-such-model", "files": "models/base"}})
    (project / "models/base").mkdir(parents=True)
    status, err = _train(capsys)
    assert status == 1
    line = last_line(err)
    assert "qlora-dvc-test/no-such-model is not in the local Hugging Face cache" in line
    assert "HF_HUB_OFFLINE is set (offline)" in line


def _hub_error(kind: str, status: int):
    import importlib

    from huggingface_hub import errors

    # The HTTP library huggingface_hub is built on (httpx, or its fork httpx2 in 2.x).
    http = importlib.import_module(errors.Response.__module__.split(".")[0])
    request = http.Request("GET", "https://huggingface.co/api/models/org/name")
    response = http.Response(status, request=request, headers={"x-request-id": "test"})
    return getattr(errors, kind)(f"{status} Client Error", response=response)


@pytest.mark.parametrize("kind,status,token,expected", [
    ("GatedRepoError", 401, None, "is a gated model and no token is set: accept its licence at "
                                  "https://huggingface.co/org/name, then export HF_TOKEN"),
    ("GatedRepoError", 403, "hf_x", "is a gated model and the HF_TOKEN in the environment has no access"),
    ("RepositoryNotFoundError", 401, None, "the hub has no model 'org/name' readable without a token "
                                           "(token missing)"),
    ("RepositoryNotFoundError", 404, "hf_x", "'org/name' was not found on the hub, or the HF_TOKEN"),
    ("RevisionNotFoundError", 404, None, "model.revision: 'v9' does not exist for org/name"),
])
def test_hub_failures_each_get_their_own_message(monkeypatch, kind, status, token, expected):
    """The hub's real exception classes, raised where transformers calls the hub, and wrapped by
    transformers as it does (no network here: the download function is replaced)."""
    import transformers.utils.hub as hub

    from stages.lib.modeling import ModelError, ResolvedModel, load_tokenizer

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    else:
        monkeypatch.delenv("HF_TOKEN", raising=False)

    def fail(*args, **kwargs):
        raise _hub_error(kind, status)

    monkeypatch.setattr(hub, "hf_hub_download", fail)
    monkeypatch.setattr(hub, "snapshot_download", fail)
    monkeypatch.setattr(hub, "try_to_load_from_cache", lambda *a, **k: None)
    with pytest.raises(ModelError) as info:
        load_tokenizer(ResolvedModel("org/name", "v9", False, "org/name"))
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_generate_with_an_offline_hub_model_is_one_line(project):
    set_params(project, {"model": {"base": "qlora-dvc-test/no-such-model", "files": "models/base"}})
    result = subprocess.run([sys.executable, "-m", "qlora_dvc", "generate", "--model", "base", "hello"], cwd=project,
                            env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "is not in the local Hugging Face cache" in last_line(result.stderr)


def test_disk_full_while_training_is_one_line(project, capsys, monkeypatch):
    """dvclive's summary written to /dev/full: the kernel's own ENOSPC, in the middle of the
    Trainer's callbacks. (Only the write is redirected: pointing Live's metrics_file at /dev/full
    would make its start-up clean-up delete the device node.)"""
    from dvclive import Live
    from dvclive.serialize import dump_json

    monkeypatch.setattr(Live, "make_summary", lambda self: dump_json(self.summary, "/dev/full"))
    status, err = _train(capsys)
    assert status == 1
    line = last_line(err)
    assert line.startswith("train: no space left on device") and line.endswith(
        "free some space and run it again (train resumes from its last complete checkpoint)"), line


def test_unwritable_reports_folder_is_one_line(project, capsys):
    (project / "reports").write_text("a file where the reports folder should be")
    status, err = _evaluate(capsys, "base")
    assert status == 1
    line = last_line(err)
    assert "cannot write reports/eval_base.json" in line, line


def test_probe_row_without_accept_is_one_line(project, capsys):
    probes = project / "data/probes/general.jsonl"
    probes.write_text(probes.read_text() + json.dumps({"id": "broken", "prompt": "2+2?"}) + "\n")
    status, err = _evaluate(capsys, "base")
    assert status == 1
    line = last_line(err)
    assert "bad probe row" in line and "(broken): needs \"accept\"" in line, line


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"r": 4}'])
def test_malformed_adapter_config_is_one_line(project, capsys, content):
    _fake_adapter(project, project / "models/tiny")
    (project / "models/adapter/adapter_config.json").write_text(content)
    for run in (lambda: _evaluate(capsys, "tuned"), lambda: _export(capsys)):
        status, err = run()
        assert status == 1
        line = last_line(err)
        assert "models/adapter/adapter_config.json is not" in line and "dvc repro train" in line, line


@pytest.mark.slow
def test_ctrl_c_is_one_line(project):
    """SIGINT while the stage generates: "evaluate: interrupted", exit 130, no traceback."""
    set_params(project, {"evaluate": {"max_samples": 400, "max_new_tokens": 200, "batch_size": 1}})
    _write_jsonl(project / "data/split/test.jsonl", [_conversation(i) for i in range(400)])
    process = subprocess.Popen([sys.executable, "-m", "stages.evaluate", "--model", "base"], cwd=project,
                               env=dict(os.environ, PYTHONPATH=str(ROOT)), stderr=subprocess.PIPE,
                               preexec_fn=sigint_as_in_a_terminal)
    seen, deadline = b"", time.time() + 240
    try:
        while b"test split" not in seen and time.time() < deadline:  # the progress bar: generating
            chunk = os.read(process.stderr.fileno(), 4096)
            if not chunk:
                break
            seen += chunk
        time.sleep(1.0)  # a person's Ctrl-C comes a moment after the bar appears, mid-generation
        process.send_signal(signal.SIGINT)
        rest = process.communicate(timeout=120)[1]
    finally:
        if process.poll() is None:
            process.kill()
    err = (seen + rest).decode(errors="replace")
    assert b"test split" in seen, err
    assert process.returncode == 130, err
    assert "Traceback" not in err and last_line(err) == "evaluate: interrupted"


# --------------------------------------------------------------------------------------------
# Unbounded work


def test_several_processes_on_cpu_are_refused_without_relaunching(project):
    set_params(project, {"train": {"num_processes": 2}})
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    result = subprocess.run([sys.executable, "-m", "stages.train"], cwd=project, capture_output=True, text=True,
                            env=dict(env, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES=""), timeout=300)
    assert result.returncode == 1
    assert "running: " not in result.stderr  # no accelerate launch at all
    assert "Traceback" not in result.stderr
    assert last_line(result.stderr).startswith("train: train.num_processes=2 needs CUDA GPUs")


def test_a_launched_process_never_launches_again():
    from stages.lib.limits import LAUNCHED_MARK, inside_launcher

    assert inside_launcher({LAUNCHED_MARK: "1"}) and inside_launcher({"LOCAL_RANK": "0"})
    assert not inside_launcher({})


def test_huge_batch_is_refused_before_it_hangs(project, capsys):
    # 10,000 rows of 30-odd tokens x 49,152 vocabulary x 4 bytes x 2: about 110 GiB for the logits.
    set_params(project, {"train": {"batch_size": 10000, "packing": False}})  # batch_size counts unpacked rows
    _write_jsonl(project / "data/split/train.jsonl", [_conversation(i) for i in range(10000)])
    status, err = _train(capsys)
    assert status == 1
    line = last_line(err)
    assert line.startswith("train: train.batch_size=10000 needs about ") and "lower train.batch_size" in line, line


def test_huge_eval_batch_is_refused(project, capsys):
    # 2,000 rows of 250 tokens x 49,152 x 4 bytes x 2: about 180 GiB for the loss pass's logits.
    set_params(project, {"evaluate": {"batch_size": 60000, "max_samples": 100000}})
    rows = [{**_conversation(i), "messages": [{"role": "user", "content": f"{i} " + "word " * 240},
                                              {"role": "assistant", "content": "ok"}]} for i in range(2000)]
    _write_jsonl(project / "data/split/test.jsonl", rows)
    status, err = _evaluate(capsys, "base")
    assert status == 1 and "lower evaluate.batch_size" in last_line(err)


def test_backtracking_extract_pattern_is_cut_off():
    from stages.lib.metrics import ExtractTimeout, extract_answer

    # The pattern on the text that hung Python's re: the regex engine cuts the nested
    # quantifier short (milliseconds).
    assert extract_answer("a" * 40 + "!", "(a+)+$") is None
    # What it cannot cut short is stopped by the time limit, with a message naming the parameter.
    with pytest.raises(ExtractTimeout, match=r"evaluate.extract: '\(a\|aa\)\+\$' ran for more than 1 s"):
        extract_answer("a" * 40 + "!", "(a|aa)+$")
    with pytest.raises(ExtractTimeout, match="exponential backtracking"):
        extract_answer("a" * 20000 + "!", "(a+)+$")


def test_backtracking_extract_pattern_fails_the_stage_in_one_line(project, capsys):
    set_params(project, {"evaluate": {"extract": "(a|aa)+$"}})
    _write_jsonl(project / "data/split/test.jsonl",
                 [{**_conversation(1), "messages": [{"role": "user", "content": "say a"},
                                                    {"role": "assistant", "content": "a" * 40 + "!"}]}])
    status, err = _evaluate(capsys, "base")
    assert status == 1 and "evaluate.extract" in last_line(err) and "simplify it" in last_line(err)


def test_max_new_tokens_past_the_context_is_refused(project, capsys):
    set_params(project, {"evaluate": {"max_new_tokens": 100000}})
    status, err = _evaluate(capsys, "base")
    assert status == 1
    assert "evaluate.max_new_tokens=100000 does not fit the model's context of 256 positions" in last_line(err)


def test_prompts_longer_than_the_context_are_cut_with_a_warning(project, capsys):
    long = {**_conversation(1), "messages": [{"role": "user", "content": "word " * 400},
                                             {"role": "assistant", "content": "ok"}]}
    _write_jsonl(project / "data/split/test.jsonl", [long, _conversation(2)])
    status, err = _evaluate(capsys, "base")
    assert status == 0, err
    assert "warning: 1 of 2 base: test split prompts are longer than the 252 tokens" in err


@pytest.mark.slow
def test_generate_refuses_a_prompt_longer_than_the_context(project):
    result = subprocess.run([sys.executable, "-m", "qlora_dvc", "generate", "--model", "base", "-"], cwd=project,
                            input="word " * 200_000, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    line = last_line(result.stderr)
    assert "the prompt is 200" in line and "the model reads 256 positions" in line, line


# --------------------------------------------------------------------------------------------
# Caches that see every input


def _stage_deps(project: Path, stage: str) -> set[str]:
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        (found,) = repo.stage.collect(stage)
        return {os.path.relpath(d.def_path, ".") if os.path.isabs(d.def_path) else d.def_path for d in found.deps}


def test_local_base_model_and_probes_are_dvc_dependencies(project):
    shutil.copy(ROOT / "dvc.yaml", project)
    shutil.copytree(ROOT / "stages", project / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(project / "data/probes", project / "data/my_probes")
    set_params(project, {"evaluate": {"probes": "data/my_probes"}})
    for command in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"]):
        subprocess.run(command, cwd=project, check=True)
    for stage in ("train", "evaluate_base", "evaluate", "export"):
        assert "models/tiny" in _stage_deps(project, stage), stage
    for stage in ("evaluate_base", "evaluate"):
        assert "data/my_probes" in _stage_deps(project, stage)


def test_model_files_must_follow_a_local_model_base(project):
    from stages.lib.modeling import ModelError, check_model_files
    from stages.lib.params import load_params

    set_params(project, {"model": {"files": "models/base"}})
    with pytest.raises(ModelError, match="model.files: 'models/base' must be the local model directory"):
        check_model_files(load_params().model)


@pytest.mark.parametrize("key,value,expected", [
    ("evaluate.probes", "../outside", "evaluate: evaluate.probes: '../outside' points outside the project"),
    ("model.base", "../outside-model", "model.base: '../outside-model' points outside the project"),
])
def test_path_params_are_checked_like_data_raw(project, capsys, key, value, expected):
    (project.parent / "outside").mkdir()
    shutil.copytree(project / "data/probes", project.parent / "outside", dirs_exist_ok=True)
    shutil.copytree(project / "models/tiny", project.parent / "outside-model")
    section, name = key.split(".")
    set_params(project, {section: {name: value, **({"files": value} if section == "model" else {})}})
    status, err = _evaluate(capsys, "base")
    assert status == 1 and expected in last_line(err), last_line(err)


def test_adapter_records_its_base_identity(project, capsys):
    status, err = _train(capsys)
    assert status == 0, err
    recorded = json.loads((project / "models/adapter/training_config.json").read_text())["base_model"]
    from stages.lib.modeling import directory_sha256

    assert recorded["base"] == "models/tiny" and recorded["sha256"] == directory_sha256(project / "models/tiny")
    assert json.loads((project / "reports/train.json").read_text())["base"]["sha256"] == recorded["sha256"]
    # And evaluate accepts it: the same base.
    status, err = _evaluate(capsys, "base")
    assert status == 0, err
    status, err = _evaluate(capsys, "tuned")
    assert status == 0, err
    assert all(math.isfinite(v) for v in json.loads((project / "reports/eval.json").read_text())["tuned"].values()
               if isinstance(v, float))
