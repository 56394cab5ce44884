"""Seven architectures end to end: a tiny random-weight model of each (tests/tiny_models.py, with
its family's real chat template) goes through `dvc repro` -- train (nf4 QLoRA on CPU) ->
evaluate_base / evaluate -> export -- and the exported GGUF, written by llama.cpp's own converter,
must give in llama.cpp's runtime the same tokens for the prompt and the same greedy answer as
transformers gives for the merged model (f32 GGUF). The data stages run once; each architecture
then re-runs the model stages only."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import chat_families
from test_pipeline_e2e import BIN, IGNORE, ROOT, _run, _set_params
from tiny_models import ARCHITECTURES, build_tiny_model

pytestmark = pytest.mark.slow

TINY = {
    "split": {"validation_fraction": 0.0},  # 60 rows: too few for a validation split
    # nf4 on purpose: QLoRA on every architecture (on CPU the default, quantization auto, is none).
    # No replay: the masks are checked on the sample's rows (prompts longer than the JSON answers),
    # and a tiny random model's replay answers would be 96 tokens of noise.
    "train": {"quantization": "nf4", "max_steps": 2, "batch_size": 4, "save_steps": 2, "eval_steps": 2, "logging_steps": 1,
              "max_length": 192, "replay.share": 0.0},
    "evaluate": {"max_samples": 2, "max_new_tokens": 8, "batch_size": 8, "n_samples": 1, "gates": []},
    # f32: llama.cpp must then give exactly transformers' greedy tokens.
    "export": {"gguf": "f32", "check_prompts": 2, "check_max_new_tokens": 12},
}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = tmp_path_factory.mktemp("arch") / "project"
    shutil.copytree(ROOT, project, ignore=IGNORE)
    lines = (ROOT / "data/raw/support_tickets.jsonl").read_bytes().splitlines(keepends=True)
    (project / "data/raw/tiny.jsonl").write_bytes(b"".join(lines[:60]))
    _set_params(project, {"data": {"raw": "data/raw/tiny.jsonl"}, **TINY})
    _run(["git", "init", "-q"], project)
    _run(["git", "add", "-A"], project)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"], project)
    return project


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_architecture_trains_evaluates_and_exports_a_gguf_llama_cpp_agrees_with(
        project, family_tokenizer, architecture):
    _config, family = ARCHITECTURES[architecture]
    model_dir = build_tiny_model(architecture, family_tokenizer(family), project / "tiny" / family)
    # A local base model: model.files names its directory, so DVC re-runs the model stages when
    # its weights change (and the default's models/base is not there in this copy).
    _set_params(project, {"model": {"base": str(model_dir), "files": str(model_dir)}})
    result = _run([str(BIN / "dvc"), "repro"], project)
    log = result.stdout + result.stderr

    train = json.loads((project / "reports/train.json").read_text())
    assert train["steps"] == 2 and train["plan"]["quantize"] is True
    # The mask found each reply and its end of turn, and little else: the sample's prompts are
    # longer than its JSON answers.
    assert 0 < train["supervised_share_min"] <= train["supervised_share_mean"] < 0.6
    evaluation = json.loads((project / "reports/eval.json").read_text())
    assert {"base", "tuned"} <= evaluation.keys()

    export = json.loads((project / "reports/export.json").read_text())
    assert export["merged"]["check"]["greedy_tokens_equal"], log[-2000:]
    gguf = export["gguf"]
    assert gguf["writer"].startswith("llama.cpp convert_hf_to_gguf.py")
    check = gguf["check"]
    assert check["runtime"].startswith("llama.cpp"), check
    assert check["tokenizer_equal"] and check["greedy_tokens_equal"] and check["ok"], check
    assert check["chat_template_equal"], "the GGUF must carry the family's chat template"
    assert all(row["n_tokens"] > 0 for row in check["rows"])
    # The GGUF carries the family's chat template and its end-of-turn tokens stop generation.
    assert (project / "models/gguf/Modelfile").read_text().count("PARAMETER stop") >= 1
    expected_end = chat_families()[family]["end_of_turn"]
    stops = export["merged"]["eos_tokens"]
    assert any(token in expected_end for token in stops), (stops, expected_end)
