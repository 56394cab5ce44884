"""The split stage's work as a library call: every record on exactly one side, byte for byte, a
passing audit on unrelated rows, and a failure (with the files still written) that says why."""
from __future__ import annotations

import pytest

from stages.lib import splitting
from stages.lib.deduplicate import DedupOutputs, deduplicate
from stages.lib.io import write_jsonl
from stages.lib.params import validate_params
from stages.lib.records import make_record
from stages.lib.split_records import split_records

WORDS = ("apple", "river", "stone", "cloud", "maple", "tiger", "violin", "copper", "lantern", "meadow",
         "harbor", "pepper", "saddle", "walnut", "glacier", "thunder", "orchid", "falcon", "marble", "cactus")


def _records(n: int) -> list[dict]:
    """n unrelated conversations: no two share a long n-gram, a prefix or an answer."""
    rows = []
    for i in range(n):
        words = [WORDS[(i * 7 + k * 3) % len(WORDS)] + str(i) for k in range(12)]
        rows.append(make_record([{"role": "user", "content": "Describe " + " ".join(words)},
                                 {"role": "assistant", "content": f"Answer number {i}: " + " ".join(words[::-1])}],
                                {"line": i + 1}))
    return rows


def _dedup(tmp_path, rows):
    source = tmp_path / "clean.jsonl"
    write_jsonl(source, rows)
    outputs = DedupOutputs(kept=tmp_path / "dedup.jsonl", removed=tmp_path / "removed.jsonl",
                           signatures=tmp_path / "signatures.npy")
    deduplicate(source, validate_params({}).dedup, outputs)
    return outputs


@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    monkeypatch.setenv("QLORA_DVC_WORKERS", "1")


def _sides(tmp_path) -> dict:
    return {side: tmp_path / "split" / f"{name}.jsonl" for side, name in enumerate(splitting.SIDE_NAMES)}


def test_every_record_lands_on_one_side_byte_for_byte(tmp_path):
    dedup = _dedup(tmp_path, _records(60))
    outputs = _sides(tmp_path)
    params = validate_params({"split": {"test_fraction": 0.2, "validation_fraction": 0.1}}).split
    result = split_records(dedup.kept, dedup.signatures, params, outputs, "reports/split.json")
    assert result.failure is None and result.warnings == []
    report = result.report
    assert report["passed"] and report["leaked_pairs"] == 0 and report["accounting_ok"]
    written = {side: path.read_bytes().splitlines(keepends=True) for side, path in outputs.items()}
    assert [len(written[side]) for side in sorted(written)] == [report["train"], report["validation"], report["test"]]
    assert sorted(line for lines in written.values() for line in lines) == sorted(
        dedup.kept.read_bytes().splitlines(keepends=True))
    assert not (tmp_path / "split" / "tokens").exists()   # the scratch store is removed


def test_an_empty_side_fails_saying_why_and_the_files_are_still_written(tmp_path):
    dedup = _dedup(tmp_path, _records(1))   # one row cannot fill both test and validation
    outputs = _sides(tmp_path)
    params = validate_params({"split": {"test_fraction": 0.2, "validation_fraction": 0.1}}).split
    result = split_records(dedup.kept, dedup.signatures, params, outputs, "reports/split.json")
    assert result.failure is not None and "split is empty" in result.failure
    assert "split.test_fraction=0.2" in result.failure or "split.validation_fraction=0.1" in result.failure
    assert not result.report["passed"] and result.report["empty_sides"]
    assert all(path.exists() for path in outputs.values())
