import pytest

from stages.lib.params import ParamsError, load_params, validate_params


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
    assert validate_params({"train": {"early_stopping_patience": 2, "save_steps": 20, "eval_steps": 10}})
