from pathlib import Path

import pytest

from stages.lib.params import ParamsError, load_params, validate_params

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_params_are_valid():
    params = load_params()
    assert params.model.trust_remote_code is False
    assert params.train.lora.target_modules == "all-linear"


def test_empty_file_takes_defaults():
    assert validate_params(None).split.test_fraction == 0.1


def test_every_problem_is_reported_at_once_with_its_key():
    raw = {"train": {"lora": {"r": 0}, "batch_size": "eight", "bogus": 1},
           "split": {"test_fraction": 1.5},
           "evaluate": {"extract": "(", "gates": ["tuned.json_valid >> 1"]}}
    with pytest.raises(ParamsError) as info:
        validate_params(raw)
    message = str(info.value)
    for expected in ("train.lora.r: Input should be greater than 0, got 0",
                     "train.batch_size:", "train.bogus: unknown key",
                     "split.test_fraction:", "evaluate.extract: not a valid regular expression",
                     "evaluate.gates:"):
        assert expected in message
    assert "6 problem(s)" in message


def test_secret_looking_key_gets_pointed_message():
    with pytest.raises(ParamsError, match=r"model\.hf_token: unknown key; secrets do not belong"):
        validate_params({"model": {"hf_token": "hf_abc"}})


def test_cross_field_rules():
    with pytest.raises(ParamsError, match="format 'columns' needs data.fields.prompt"):
        validate_params({"data": {"format": "columns"}})
    with pytest.raises(ParamsError, match="must be below 1"):
        validate_params({"split": {"test_fraction": 0.6, "validation_fraction": 0.5}})


def test_extract_regex_needs_a_group():
    with pytest.raises(ParamsError, match="capture group"):
        validate_params({"evaluate": {"extract": "####"}})
    assert validate_params({"evaluate": {"extract": r"####\s*(-?[\d,.]+)"}}).evaluate.extract


def test_load_params_errors(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ParamsError, match="expected a mapping"):
        load_params(bad)


def test_early_stopping_needs_a_checkpoint_at_every_evaluation():
    with pytest.raises(ParamsError, match="save_steps .8. to be a multiple of train.eval_steps .20."):
        validate_params({"train": {"early_stopping_patience": 2, "save_steps": 8, "eval_steps": 20}})
    assert validate_params({"train": {"early_stopping_patience": 2, "save_steps": 20, "eval_steps": 10},
                            "split": {"validation_fraction": 0.1}})
    with pytest.raises(ParamsError, match=r"early_stopping_patience needs split.validation_fraction > 0"):
        validate_params({"train": {"early_stopping_patience": 2, "save_steps": 20, "eval_steps": 10},
                         "split": {"validation_fraction": 0.0}})



def _problems(raw) -> str:
    with pytest.raises(ParamsError) as info:
        validate_params(raw)
    return str(info.value)


def test_booleans_and_strings_are_not_numbers():
    message = _problems({"dedup": {"threshold": True, "num_perm": "128"}, "train": {"batch_size": False,
                         "learning_rate": "0.001"}, "clean": {"min_chars": 2.0}})
    for key in ("dedup.threshold: Input should be a valid number, got True",
                "dedup.num_perm: Input should be a valid integer, got '128'",
                "train.batch_size: Input should be a valid integer, got False",
                "train.learning_rate: Input should be a valid number, got '0.001'",
                "clean.min_chars: Input should be a valid integer, got 2.0"):
        assert key in message
    assert "5 problem(s)" in message
    # An integer where a float is expected is fine (YAML `epochs: 2`).
    assert validate_params({"train": {"epochs": 2, "learning_rate": 1}}).train.epochs == 2.0


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_floats_must_be_finite(value):
    message = _problems({"train": {"learning_rate": value, "epochs": value}, "dedup": {"threshold": value}})
    for key in ("train.learning_rate:", "train.epochs:", "dedup.threshold:"):
        assert key in message
    assert "finite number" in message


def test_yaml_infinity_is_refused_and_scientific_notation_read_as_dvc_reads_it(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  learning_rate: .inf\n")
    with pytest.raises(ParamsError, match="train.learning_rate: Input should be a finite number"):
        load_params(path)
    # PyYAML alone reads 1e-3 as a string; DVC (YAML 1.2) reads a float, and so do we.
    path.write_text("train:\n  learning_rate: 2e-4\n  weight_decay: 1E-2\n")
    loaded = load_params(path).train
    assert loaded.learning_rate == 2e-4 and loaded.weight_decay == 0.01


def test_ranges_match_what_the_code_can_do():
    message = _problems({"dedup": {"seed": -1, "shingle_size": 10**30}, "split": {"ngram": 10**30, "seed": 2**40},
                         "train": {"seed": -5, "learning_rate": 2e4, "lr_scheduler": "warmup_stable_decay"}})
    for expected in ("dedup.seed: Input should be greater than or equal to 0, got -1",
                     "dedup.shingle_size: Input should be less than or equal to 64",
                     "split.ngram: Input should be less than or equal to 256",
                     "split.seed: Input should be less than or equal to 4294967295",
                     "train.seed: Input should be greater than or equal to 0",
                     "train.learning_rate: Input should be less than or equal to 1",
                     "train.lr_scheduler:"):
        assert expected in message
    assert "7 problem(s)" in message


def test_cross_field_rules_are_reported_with_the_per_key_problems():
    message = _problems({"train": {"lora": {"r": 0}, "early_stopping_patience": 2, "save_steps": 8, "eval_steps": 20,
                                   "learning_rate": float("inf")},
                         "clean": {"min_chars": 50, "max_chars": 10},
                         "split": {"group_by": "conversation", "test_fraction": 0.7, "validation_fraction": 0.3},
                         "data": {"format": "columns"}})
    for expected in ("train.lora.r:", "train.learning_rate:",
                     "train.early_stopping_patience needs train.save_steps (8) to be a multiple of train.eval_steps (20)",
                     "clean.min_chars: 50 is more than clean.max_chars (10)",
                     "split.group_by: 'conversation' must be one of data.keep_columns",
                     "split.test_fraction + split.validation_fraction must be below 1",
                     "format 'columns' needs data.fields.prompt"):
        assert expected in message, message
    assert "7 problem(s)" in message
    # A rule whose key already has an error is skipped rather than reported twice or crashing.
    message = _problems({"clean": {"min_chars": "many", "max_chars": 10}})
    assert "1 problem(s)" in message


def test_stage_params_match_dvc_yaml():
    import yaml

    from stages.lib.params import STAGE_PARAMS

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert {name: tuple(stage.get("params", ())) for name, stage in stages.items()} == STAGE_PARAMS


def test_a_stage_run_by_hand_refuses_missing_params_as_dvc_repro_does(tmp_path):
    import subprocess
    import sys

    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    del params["split"]
    del params["clean"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match="stage 'split' reads split but it is missing"):
        load_params(tmp_path / "params.yaml", stage="split")
    with pytest.raises(ParamsError, match="stage 'clean' reads clean but it is missing"):
        load_params(tmp_path / "params.yaml", stage="clean")
    assert load_params(tmp_path / "params.yaml", stage="train").train.seed == params["train"]["seed"]
    for stage, phrase in (("split", "reads split but"), ("clean", "reads clean but")):
        result = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=tmp_path, capture_output=True,
                                text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=60)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert phrase in result.stderr and "missing" in result.stderr, result.stderr


def _differences(model: dict, shipped: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose value differs between the models' defaults and params.yaml (or that
    only one of them has)."""
    found = []
    for key in sorted(set(model) | set(shipped)):
        name = f"{prefix}{key}"
        if key not in shipped:
            found.append(f"{name}: default {model[key]!r}, missing from params.yaml")
        elif key not in model:
            found.append(f"{name}: in params.yaml, not in the models")
        elif isinstance(model[key], dict) and isinstance(shipped[key], dict) and key != "json_schema":
            found += _differences(model[key], shipped[key], name + ".")
        elif model[key] != shipped[key]:
            found.append(f"{name}: default {model[key]!r}, params.yaml {shipped[key]!r}")
    return found


def test_defaults_are_the_shipped_params_yaml():
    # One source of truth: the models' defaults are what params.yaml ships, key for key.
    import yaml

    from stages.lib.params import Params

    shipped = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    differences = _differences(Params().model_dump(), shipped)
    assert not differences, "pydantic defaults and params.yaml disagree:\n  " + "\n  ".join(differences)


def test_the_disagreement_check_names_the_key():
    # The check above catches the drift it exists for: a changed value, a key left out.
    from stages.lib.params import Params

    defaults = Params().model_dump()
    drifted = {**defaults, "dedup": {**defaults["dedup"], "threshold": 0.8}, "train": {
        **defaults["train"], "lora": {k: v for k, v in defaults["train"]["lora"].items() if k != "r"}}}
    assert _differences(defaults, drifted) == [
        "dedup.threshold: default 0.7, params.yaml 0.8",
        "train.lora.r: default 16, missing from params.yaml"]


def test_max_steps_zero_is_refused_with_what_it_would_mean():
    with pytest.raises(ParamsError, match=r"train.max_steps: 0 would train nothing: use -1"):
        validate_params({"train": {"max_steps": 0}})
    assert validate_params({"train": {"max_steps": -1}}).train.max_steps == -1


def test_lr_scheduler_names_are_transformers_own():
    import typing

    from transformers.trainer_utils import SchedulerType

    from stages.lib.params import TrainParams

    allowed = typing.get_args(TrainParams.model_fields["lr_scheduler"].annotation)
    assert allowed and set(allowed) <= {s.value for s in SchedulerType}
    with pytest.raises(ParamsError, match=r"train.lr_scheduler: Input should be 'linear', 'cosine'.*got 'bogus'"):
        validate_params({"train": {"lr_scheduler": "bogus"}})
