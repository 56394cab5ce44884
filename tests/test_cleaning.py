"""Filters and row accounting of the clean stage's library (stages/lib/cleaning.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages.lib.cleaning import CleanSummary, clean_file_rows, clean_messages
from stages.lib.formats import InputError, RowError, list_input_files, read_rows
from stages.lib.params import Params

BAD = Path(__file__).parent / "data" / "bad"


def _m(*turns):
    return [{"role": role, "content": content} for role, content in turns]


def _clean(messages, min_chars=2, max_chars=100, require_assistant_last=True):
    return clean_messages(messages, min_chars, max_chars, require_assistant_last)


@pytest.mark.parametrize("messages, kind, reason", [
    (_m(("user", "  \t "), ("assistant", "fine")), "empty_turn", "turn 1 (user) is empty or only whitespace"),
    (_m(("user", "hello"), ("assistant", "")), "empty_turn", "turn 2 (assistant) is empty"),
    (_m(("user", "?"), ("assistant", "fine")), "too_short", "turn 1 (user) has 1 character(s), fewer than clean.min_chars=2"),
    (_m(("user", "x" * 60), ("assistant", "y" * 60)), "too_long", "conversation has 120 characters, more than clean.max_chars=100"),
    (_m(("assistant", "hi"), ("user", "hello")), "role_order", "turn 1 is an assistant turn"),
    (_m(("system", "s"), ("assistant", "hi")), "role_order", "turn 2 is an assistant turn"),
    (_m(("user", "hi"), ("user", "again"), ("assistant", "yes")), "role_order", "turns 1 and 2 are both user turns"),
    (_m(("user", "hi"), ("assistant", "yo"), ("system", "late")), "role_order", "turn 3 is a system turn"),
    (_m(("user", "hi"), ("assistant", "yo"), ("user", "more?")), "not_assistant_last", "the last turn (3) is a user turn"),
    (_m(("user", "hi")), "no_assistant", "conversation has no assistant turn"),
    (_m(("system", "only a system prompt")), "no_turns", "conversation has no user turn"),
    ([], "no_turns", "conversation has no turns"),
])
def test_each_rejection_has_a_kind_and_a_readable_reason(messages, kind, reason):
    with pytest.raises(RowError) as info:
        _clean(messages)
    assert info.value.kind == kind and reason in str(info.value)


def test_assistant_last_can_be_relaxed():
    messages = _m(("user", "hi"), ("assistant", "yo"), ("user", "more?"))
    assert len(_clean(messages, require_assistant_last=False)) == 3


def test_clean_normalises_and_drops_an_empty_system_prompt():
    out = _clean(_m(("system", "  "), ("user", "Cafe\u0301  time\r\n"), ("assistant", " ok ")))
    assert out == [{"role": "user", "content": "Caf\u00e9 time"}, {"role": "assistant", "content": "ok"}]


def _run_file(path: Path, **data):
    params = Params(data=data)
    summary = CleanSummary()
    results = list(clean_file_rows(read_rows(path, path.name), params.data, params.clean, summary))
    return results, summary


@pytest.mark.parametrize("name, kept, reasons", [
    ("invalid_json.jsonl", 3, {"invalid_json": 2}),
    ("truncated_last_line.jsonl", 2, {"truncated": 1}),
    ("wrong_types.jsonl", 1, {"wrong_type": 5, "not_an_object": 2}),
    ("missing_fields.jsonl", 2, {"missing_field": 3}),
    ("nulls.jsonl", 1, {"null_value": 3, "not_an_object": 1}),
    ("not_utf8.jsonl", 2, {"not_utf8": 2}),
    ("bom_crlf.jsonl", 3, {}),
    ("empty_strings.jsonl", 2, {"empty_turn": 2}),
    ("whitespace_turns.jsonl", 2, {"empty_turn": 2}),
    ("deeply_nested.jsonl", 2, {"invalid_json": 2, "wrong_type": 1}),
    ("duplicate_ids.jsonl", 4, {}),
    ("roles_out_of_order.jsonl", 1, {"role_order": 3, "not_assistant_last": 1, "unknown_role": 1, "no_turns": 2}),
    ("empty.jsonl", 0, {}),
])
def test_bad_input_corpus_is_accounted_for_row_by_row(name, kept, reasons):
    results, summary = _run_file(BAD / name)
    assert summary.kept == kept and dict(summary.rejected_by_reason) == reasons
    assert summary.rows_in == summary.kept + summary.rejected == len(results)
    for is_kept, row in results:
        if not is_kept:
            assert row["reason"].startswith(f"line {row['line']}: ") and row["file"] == name
            assert len(row["raw"]) <= 600


def test_ragged_csv_with_a_field_mapping():
    results, summary = _run_file(BAD / "ragged.csv", fields={"prompt": "question", "response": "answer"},
                                 keep_columns=["topic"])
    assert summary.formats_by_file == {"ragged.csv": "columns"}
    assert dict(summary.rejected_by_reason) == {"ragged_csv": 2}
    kept = [row for ok, row in results if ok]
    assert [r["source"]["line"] for r in kept] == [2, 5, 7]
    assert kept[0]["meta"] == {"topic": "billing"}


def test_mixed_directory_uses_one_mapping_for_every_file():
    files, _ = list_input_files(BAD / "mixed_dir")
    params = Params(data={"fields": {"prompt": "question", "response": "answer"}})
    summary = CleanSummary()
    results = []
    for path in files:
        results += list(clean_file_rows(read_rows(path, path.name), params.data, params.clean, summary))
    assert summary.rows_in == 6 and summary.kept == 3
    assert dict(summary.rejected_by_reason) == {"null_value": 1, "empty_turn": 1, "missing_field": 1}


def test_undetectable_format_is_a_clear_input_error(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(InputError, match="cannot detect the data format.*columns seen: answer, question"):
        _run_file(path)


def test_records_have_content_ids_sources_and_kept_columns(tmp_path):
    path = tmp_path / "a.jsonl"
    rows = [{"messages": _m(("user", "Hello there"), ("assistant", "Hi!")), "ticket": "T1", "noise": 1}] * 2
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results, _ = _run_file(path, keep_columns=["ticket"])
    (_, first), (_, second) = results
    assert first["id"] == second["id"] and len(first["id"]) == 16  # same content, same id
    assert first["source"] == {"file": "a.jsonl", "line": 1} and second["source"]["line"] == 2
    assert first["meta"] == {"ticket": "T1"}


def test_detection_waits_for_the_first_readable_row(tmp_path, monkeypatch):
    from stages.lib import cleaning

    monkeypatch.setattr(cleaning, "DETECT_ROWS", 2)   # read-ahead: at most 200 rows
    path = tmp_path / "late.jsonl"
    good = json.dumps({"prompt": "A question?", "completion": "An answer."})
    path.write_text("not json\n" * 250 + good + "\n" + good + "\n")
    results, summary = _run_file(path)
    assert summary.rows_in == 252 and summary.kept == 2 and summary.rejected == 250
    assert summary.formats_by_file == {"late.jsonl": "prompt_completion"}


def _serialised(path: Path, data: dict, **kwargs):
    """(records bytes, rejections bytes, summary) of clean_file, and the same row by row."""
    from stages.lib.cleaning import clean_file
    from stages.lib.io import dumps_record

    params = Params(data=data)
    batched, batched_summary = [], CleanSummary()
    for kept, rejected in clean_file(path, path.name, params.data, params.clean, batched_summary, **kwargs):
        batched.append((kept, rejected))
    row_summary = CleanSummary()
    rows = list(clean_file_rows(read_rows(path, path.name), params.data, params.clean, row_summary))
    expected = ("".join(dumps_record(r) + "\n" for ok, r in rows if ok),
                "".join(dumps_record(r) + "\n" for ok, r in rows if not ok))
    got = ("".join(k for k, _ in batched), "".join(r for _, r in batched))
    return got, expected, batched_summary, row_summary


@pytest.mark.parametrize("name", sorted(p.name for p in BAD.iterdir() if p.is_file()))
@pytest.mark.parametrize("workers", [1, 2])
def test_batched_cleaning_in_worker_processes_writes_what_row_by_row_cleaning_writes(name, workers):
    # Small batches so that every file is cut into several, handed to worker processes.
    data = {"fields": {"prompt": "question", "response": "answer"}, "keep_columns": ["topic"]} if name.endswith(".csv") else {}
    try:
        got, expected, batched, row_by_row = _serialised(BAD / name, data, batch_rows=2, workers=workers)
    except InputError as exc:   # a file whose format cannot be detected: the same error both ways
        with pytest.raises(InputError, match=str(exc)[:40]):
            list(clean_file_rows(read_rows(BAD / name, name), Params(data=data).data, Params().clean, CleanSummary()))
        return
    assert got == expected
    for field in ("rows_in", "kept", "rejected", "blank_lines", "rejected_by_reason", "formats_by_file"):
        assert getattr(batched, field) == getattr(row_by_row, field), field


def test_batched_cleaning_finds_the_format_after_a_long_unreadable_start(tmp_path):
    # No row of the read-ahead parses: the format comes from the first readable row, as row by row.
    path = tmp_path / "late.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi!"}]})
    path.write_text("{broken\n" * 10_050 + good + "\n" + good.replace("hello", "again") + "\n")
    got, expected, batched, row_by_row = _serialised(path, {}, batch_rows=4096, workers=2)
    assert got == expected and batched.kept == row_by_row.kept == 2 and batched.rejected == 10_050
