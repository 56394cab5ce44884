"""The training curves (stages/lib/training.py, make_dvclive_callback) against the callback DVCLive
ships for transformers, on one Trainer run: the reasons the project keeps its own, checked.

If a DVCLive release numbers its points by training step, this test fails, and the project's own
callback can give way to the library's."""
from __future__ import annotations

import csv

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("dvclive")

from tests.tiny_models import SHAPE  # noqa: E402


def _steps(path):
    with open(path, newline="") as handle:
        return [int(row["step"]) for row in csv.DictReader(handle, delimiter="\t")]


def test_curves_are_numbered_by_training_step_unlike_dvclives_callback(tmp_path, monkeypatch):
    import transformers
    from transformers import Trainer, TrainingArguments
    from transformers.integrations import DVCLiveCallback

    from stages.lib.training import make_dvclive_callback

    monkeypatch.chdir(tmp_path)  # DVCLive looks for a repository from the working directory
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, **SHAPE)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (12, 16)).tolist()]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=2,
                             logging_steps=1, eval_strategy="steps", eval_steps=3, save_strategy="no",
                             report_to="none", use_cpu=True, learning_rate=1e-3)
    ours = make_dvclive_callback(tmp_path / "ours")
    from dvclive import Live

    theirs = DVCLiveCallback(live=Live(dir=str(tmp_path / "theirs"), save_dvc_exp=False, dvcyaml=None, report=None))
    Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows[:4], callbacks=[ours, theirs]).train()

    # Ours: one point per training step, evaluations at the steps they ran.
    assert _steps(tmp_path / "ours/plots/metrics/train/loss.tsv") == [1, 2, 3, 4, 5, 6]
    assert _steps(tmp_path / "ours/plots/metrics/eval/loss.tsv") == [3, 6]
    # DVCLive's: a point per log call, so each evaluation shifts the per-step losses after it; the
    # per-step loss lands outside train/ (which dvc.yaml plots), and train/loss is the run's mean.
    assert _steps(tmp_path / "theirs/plots/metrics/loss.tsv") == [0, 1, 2, 4, 5, 6]
    assert _steps(tmp_path / "theirs/plots/metrics/eval/loss.tsv") == [3, 7]
    assert len(_steps(tmp_path / "theirs/plots/metrics/train/loss.tsv")) == 1
