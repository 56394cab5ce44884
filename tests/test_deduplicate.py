"""The dedup stage's work as a library call: kept records byte for byte, removed rows named, the
accounting against the clean report, and an empty input refused without touching the outputs."""
from __future__ import annotations

import json

import pytest

from stages.lib import minhash
from stages.lib.deduplicate import DedupOutputs, deduplicate
from stages.lib.io import write_jsonl
from stages.lib.params import validate_params
from stages.lib.records import make_record
from stages.lib.stage import StageError


def _conversation(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


@pytest.fixture
def outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_DVC_WORKERS", "1")
    return DedupOutputs(kept=tmp_path / "records.jsonl", removed=tmp_path / "removed.jsonl",
                        signatures=tmp_path / "signatures.npy")


def test_keeps_the_first_of_each_duplicate_and_names_the_rest(tmp_path, outputs):
    story = "the quick brown fox jumps over the lazy dog near the river bank at dawn every single day"
    rows = [make_record(_conversation("Summarise: " + story, "A fox jumps over a dog."), {"line": 1}),
            make_record(_conversation("What is two plus two?", "Four."), {"line": 2}),
            make_record(_conversation("Summarise: " + story, "A fox jumps over a dog."), {"line": 3}),
            make_record(_conversation("Summarise: " + story + " again", "A fox jumps over a dog."), {"line": 4})]
    source = tmp_path / "clean.jsonl"
    write_jsonl(source, rows)
    params = validate_params({"dedup": {"threshold": 0.7}}).dedup
    report = deduplicate(source, params, outputs, {"rows_in": 6, "rejected": 2, "kept": 4})

    lines = source.read_bytes().splitlines(keepends=True)
    assert outputs.kept.read_bytes() == lines[0] + lines[1]   # byte for byte, in input order
    removed = [json.loads(line) for line in outputs.removed.read_text().splitlines()]
    assert [(r["kind"], r["duplicate_of"], r["source"]["line"]) for r in removed] == [
        ("exact", rows[0]["id"], 3), ("near", rows[0]["id"], 4)]
    assert report["rows_in"] == 4 and report["kept"] == 2
    assert (report["removed_exact"], report["removed_near"]) == (1, 1)
    assert report["accounting"] == {"raw_rows": 6, "rejected": 2, "removed": 2, "kept": 2, "ok": True}
    signatures = minhash.read_signatures(outputs.signatures)   # every input row, for split
    assert signatures.num_perm == params.num_perm


def test_no_accounting_against_a_clean_report_of_another_input(tmp_path, outputs):
    source = tmp_path / "clean.jsonl"
    write_jsonl(source, [make_record(_conversation("hello", "hi"), {"line": 1})])
    report = deduplicate(source, validate_params({}).dedup, outputs, {"rows_in": 9, "rejected": 0, "kept": 9})
    assert "accounting" not in report and report["kept"] == 1


def test_an_empty_input_is_refused_and_no_output_is_written(tmp_path, outputs):
    source = tmp_path / "clean.jsonl"
    source.write_text("")
    with pytest.raises(StageError, match="has no records"):
        deduplicate(source, validate_params({}).dedup, outputs)
    assert not any(path.exists() for path in (outputs.kept, outputs.removed, outputs.signatures))
