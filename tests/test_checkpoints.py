import json

from stages.lib import checkpoints


def _fake_checkpoint(run_dir, step, sealed=True):
    folder = run_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"weights" * step)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if sealed:
        checkpoints.seal_checkpoint(folder)
    return folder


def test_newest_sealed_checkpoint_wins(tmp_path):
    _fake_checkpoint(tmp_path, 10)
    newest = _fake_checkpoint(tmp_path, 20)
    assert checkpoints.latest_valid_checkpoint(tmp_path) == newest


def test_half_written_checkpoint_is_skipped(tmp_path, caplog):
    good = _fake_checkpoint(tmp_path, 10)
    _fake_checkpoint(tmp_path, 20, sealed=False)
    assert checkpoints.latest_valid_checkpoint(tmp_path) == good
    assert "no seal" in caplog.text


def test_corrupted_checkpoint_is_skipped_with_a_warning(tmp_path, caplog):
    good = _fake_checkpoint(tmp_path, 10)
    bad = _fake_checkpoint(tmp_path, 20)
    (bad / "adapter_model.safetensors").write_bytes(b"bit rot!" * 20)
    assert checkpoints.latest_valid_checkpoint(tmp_path) == good
    assert "corrupted" in caplog.text
    (good / "trainer_state.json").unlink()
    assert checkpoints.latest_valid_checkpoint(tmp_path) is None
    assert "missing" in caplog.text


def test_no_checkpoints(tmp_path):
    assert checkpoints.latest_valid_checkpoint(tmp_path / "nothing") is None


def test_fingerprint_follows_data_and_semantic_params(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"a": 1}\n')
    model = {"base": "m"}
    train = {"learning_rate": 1e-4, "logging_steps": 5, "save_steps": 10}
    base = checkpoints.run_fingerprint([data], model, train)
    assert checkpoints.run_fingerprint([data], model, {**train, "logging_steps": 1, "save_steps": 3}) == base
    assert checkpoints.run_fingerprint([data], model, {**train, "learning_rate": 2e-4}) != base
    assert checkpoints.run_fingerprint([data], {"base": "other"}, train) != base
    data.write_text('{"a": 2}\n')
    assert checkpoints.run_fingerprint([data], model, train) != base


def test_prune_keeps_only_current_run(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "current").mkdir()
    checkpoints.prune_other_runs(tmp_path, keep="current")
    assert [p.name for p in tmp_path.iterdir()] == ["current"]
