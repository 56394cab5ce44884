"""Readers (JSONL, JSON, CSV, Parquet, directories), format detection and conversion to messages."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stages.lib.formats import (InputError, RowError, detect_format, kept_columns, list_input_files, read_csv_rows,
                                read_json_rows, read_jsonl_rows, read_parquet_rows, read_rows, to_messages)
from stages.lib.params import FieldMapping

BAD = Path(__file__).parent / "data" / "bad"
NO_FIELDS = FieldMapping()


def _rows(reader, path):
    return [r for r in reader(path, path.name) if not r.blank]


def _reasons(rows):
    return {r.line: str(r.error) for r in rows if r.error}


# --- JSON Lines ----------------------------------------------------------------------------


def test_jsonl_invalid_json_is_reported_with_line_and_column():
    rows = _rows(read_jsonl_rows, BAD / "invalid_json.jsonl")
    assert [r.line for r in rows] == [1, 2, 3, 4, 5]
    assert _reasons(rows) == {2: "invalid JSON: Expecting ',' delimiter (column 49)",
                              4: "invalid JSON: Expecting value (column 1)"}


def test_jsonl_truncated_last_line_says_so():
    rows = _rows(read_jsonl_rows, BAD / "truncated_last_line.jsonl")
    assert rows[-1].error.kind == "truncated" and "truncated" in str(rows[-1].error)
    assert rows[-1].line == 3 and all(r.row for r in rows[:2])


def test_jsonl_last_line_without_newline_is_fine_when_complete(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}')
    assert [r.row for r in _rows(read_jsonl_rows, path)] == [{"a": 1}, {"a": 2}]


def test_jsonl_not_utf8_gives_the_byte_position():
    rows = _rows(read_jsonl_rows, BAD / "not_utf8.jsonl")
    assert _reasons(rows) == {2: "not UTF-8 at byte 47", 3: "not UTF-8 at byte 1"}
    assert "\\xe9" in rows[1].excerpt()  # the raw excerpt shows the bad byte


def test_jsonl_bom_crlf_and_blank_lines():
    rows = list(read_jsonl_rows(BAD / "bom_crlf.jsonl", "bom_crlf.jsonl"))
    assert [r.line for r in rows if not r.blank] == [1, 2, 4]
    assert [r.line for r in rows if r.blank] == [3]
    assert all(r.row and r.error is None for r in rows if not r.blank)


def test_jsonl_deep_nesting_is_a_row_error_not_a_crash():
    rows = _rows(read_jsonl_rows, BAD / "deeply_nested.jsonl")
    assert _reasons(rows) == {2: "invalid JSON: nested too deeply", 3: "invalid JSON: nested too deeply"}


def test_jsonl_non_object_rows_are_rejected():
    rows = _rows(read_jsonl_rows, BAD / "wrong_types.jsonl")
    assert _reasons(rows) == {7: "expected a JSON object, got a list", 8: "expected a JSON object, got text"}


def test_excerpt_is_truncated(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text("{" + "x" * 5000 + "\n")
    (row,) = _rows(read_jsonl_rows, path)
    assert len(row.excerpt()) < 600 and row.excerpt().endswith("(5001 characters)")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.binary(max_size=40), st.sampled_from([b'{"a": 1}', b"[", b"{}", b"\xef\xbb\xbf{}",
                                                                     b'{"messages": []}', b"\r", b"null"])),
                max_size=12))
def test_jsonl_any_bytes_either_parse_or_are_reported(tmp_path, chunks):
    """Fuzz: every non-blank line is exactly one row, parsed or rejected with a line number."""
    data = b"\n".join(chunks)
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(data)
    rows = list(read_jsonl_rows(path, "fuzz.jsonl"))
    physical = data.split(b"\n") if data else []
    if physical and physical[-1] == b"":
        physical.pop()
    assert len(rows) == len(physical)
    for row in rows:
        assert row.blank or (row.row is None) != (row.error is None)
        if row.error:
            assert row.error.kind in {"invalid_json", "not_utf8", "not_an_object", "truncated"}
    assert [r.line for r in rows] == list(range(1, len(rows) + 1))


# --- JSON ----------------------------------------------------------------------------------


def test_json_array_is_streamed_with_line_numbers(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n  {"q": 1},\n  {"q": 2,\n   "r": 3},\n  "oops",\n  {"q": 4}\n]\n')
    rows = _rows(read_json_rows, path)
    assert [(r.line, r.row) for r in rows] == [(2, {"q": 1}), (3, {"q": 2, "r": 3}), (5, None), (6, {"q": 4})]
    assert rows[2].error.kind == "not_an_object"


def test_json_array_with_a_broken_element_reports_and_stops(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[{"q": 1},\n {"q": 2 "r": 3},\n {"q": 4}]')
    rows = _rows(read_json_rows, path)
    assert rows[0].row == {"q": 1}
    assert rows[1].line == 2 and rows[1].error.kind == "invalid_json"
    assert "the rest of the file could not be read" in str(rows[1].error) and len(rows) == 2


def test_json_truncated_array(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[{"q": 1},\n {"q": 2}')
    rows = _rows(read_json_rows, path)
    assert rows[-1].error.kind == "truncated"


def test_json_array_larger_than_the_read_buffer(tmp_path, monkeypatch):
    from stages.lib import formats

    monkeypatch.setattr(formats._JsonStream, "CHUNK", 64)
    items = [{"q": "x" * (i % 50), "n": 123456789 + i} for i in range(200)]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(items, indent=1))
    assert [r.row for r in _rows(read_json_rows, path)] == items


def test_json_wrapper_object_single_object_and_jsonl_in_json(tmp_path):
    wrapper = tmp_path / "w.json"
    wrapper.write_text(json.dumps({"version": 2, "data": [{"q": 1}, {"q": 2}]}))
    assert [(r.line, r.row) for r in _rows(read_json_rows, wrapper)] == [(1, {"q": 1}), (2, {"q": 2})]
    single = tmp_path / "s.json"
    single.write_text('\ufeff{"messages": []}')
    assert [r.row for r in _rows(read_json_rows, single)] == [{"messages": []}]
    lines = tmp_path / "l.json"
    lines.write_text('{"q": 1}\n{"q": 2}\n')
    assert [(r.line, r.row) for r in _rows(read_json_rows, lines)] == [(1, {"q": 1}), (2, {"q": 2})]


def test_json_empty_and_garbage(tmp_path):
    empty = tmp_path / "e.json"
    empty.write_text("  \n")
    assert _rows(read_json_rows, empty) == []
    junk = tmp_path / "j.json"
    junk.write_text("{not json")
    (row,) = _rows(read_json_rows, junk)
    assert row.error.kind == "invalid_json"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=80) | st.text(alphabet='[]{},:"ab1 \n', max_size=60).map(str.encode))
def test_json_reader_never_raises_on_bad_bytes(tmp_path, data):
    path = tmp_path / "fuzz.json"
    path.write_bytes(data)
    try:
        rows = _rows(read_json_rows, path)
    except InputError:
        return
    assert all((r.row is None) != (r.error is None) for r in rows)


# --- CSV -----------------------------------------------------------------------------------


def test_csv_ragged_rows_and_multiline_fields():
    rows = _rows(read_csv_rows, BAD / "ragged.csv")
    assert [r.line for r in rows] == [2, 3, 4, 5, 7]
    assert _reasons(rows) == {3: "has 4 fields, the header has 3", 4: "has 1 field, the header has 3"}
    assert rows[3].row == {"question": "A question that spans\ntwo lines?", "answer": "Yes, it works.", "topic": "misc"}


def test_csv_bom_not_utf8_and_duplicate_header(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(b"\xef\xbb\xbfq,a\r\nfine,yes\r\nbad \xff byte,no\r\n")
    rows = _rows(read_csv_rows, path)
    assert rows[0].row == {"q": "fine", "a": "yes"}
    assert _reasons(rows) == {3: "not UTF-8 at byte 5"}
    dup = tmp_path / "d.csv"
    dup.write_text("q,q\n1,2\n")
    with pytest.raises(InputError, match="repeats column"):
        _rows(read_csv_rows, dup)


def test_csv_huge_field_is_read(tmp_path):
    path = tmp_path / "big.csv"
    path.write_text("q,a\n" + "x" * 300_000 + ",y\n")
    (row,) = _rows(read_csv_rows, path)
    assert len(row.row["q"]) == 300_000


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=80) | st.text(alphabet='q,a"\n\r x\x00', max_size=60).map(str.encode))
def test_csv_reader_never_raises_on_bad_bytes(tmp_path, data):
    path = tmp_path / "fuzz.csv"
    path.write_bytes(data)
    try:
        rows = _rows(read_csv_rows, path)
    except InputError:
        return
    assert all((r.row is None) != (r.error is None) for r in rows)


# --- Parquet -------------------------------------------------------------------------------


def test_parquet_rows_in_batches(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "a.parquet"
    table = pa.table({"messages": [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]
                                   for i in range(10)], "n": list(range(10))})
    pq.write_table(table, path, row_group_size=3)
    rows = list(read_parquet_rows(path, "a.parquet", batch_size=4))
    assert [r.line for r in rows] == list(range(1, 11))
    assert rows[9].row["messages"][0] == {"role": "user", "content": "q9"}


def test_corrupt_parquet_is_a_clear_input_error(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        list(read_parquet_rows(path, "bad.parquet"))


# --- Files ---------------------------------------------------------------------------------


def test_directory_is_walked_sorted_and_other_files_ignored():
    files, ignored = list_input_files(BAD / "mixed_dir")
    assert [f.relative_to(BAD / "mixed_dir").as_posix() for f in files] == ["a.jsonl", "b.csv", "nested/c.json"]
    assert [f.name for f in ignored] == ["README.txt"]


def test_missing_path_empty_directory_and_unsupported_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        list_input_files(tmp_path / "nope.jsonl", tmp_path)
    with pytest.raises(InputError, match="no .jsonl/.json/.csv/.parquet files"):
        list_input_files(tmp_path, tmp_path)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(InputError, match="unsupported file type"):
        list_input_files(tmp_path / "x.txt", tmp_path)


def test_empty_file_has_no_rows():
    assert list(read_rows(BAD / "empty.jsonl", "empty.jsonl")) == []


# --- Formats -------------------------------------------------------------------------------


@pytest.mark.parametrize("row, expected", [
    ({"messages": []}, "messages"),
    ({"conversations": []}, "sharegpt"),
    ({"instruction": "x", "input": "", "output": "y"}, "alpaca"),
    ({"prompt": "x", "completion": "y"}, "prompt_completion"),
    ({"question": "x", "answer": "y"}, None),
])
def test_detect_format(row, expected):
    assert detect_format([row], NO_FIELDS) == expected


def test_detect_format_majority_and_explicit_fields():
    rows = [{"prompt": "p", "completion": "c"}] * 3 + [{"messages": []}]
    assert detect_format(rows, NO_FIELDS) == "prompt_completion"
    assert detect_format([{"messages": []}], FieldMapping(prompt="q", response="a")) == "columns"


def test_messages_with_openai_content_parts_and_developer_role():
    row = {"messages": [{"role": "developer", "content": "Be brief."},
                        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
                        {"role": "assistant", "content": "Hello"}]}
    assert to_messages(row, "messages", NO_FIELDS) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere"},
        {"role": "assistant", "content": "Hello"}]


def test_sharegpt_roles_are_mapped():
    row = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    assert [m["role"] for m in to_messages(row, "sharegpt", NO_FIELDS)] == ["system", "user", "assistant"]


def test_alpaca_input_is_appended_to_the_instruction():
    row = {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"}
    assert to_messages(row, "alpaca", NO_FIELDS) == [
        {"role": "user", "content": "Translate.\n\nBonjour"}, {"role": "assistant", "content": "Hello"}]
    assert to_messages({"instruction": "Say hi.", "input": None, "output": "Hi"}, "alpaca", NO_FIELDS)[0]["content"] == "Say hi."


def test_prompt_completion_plain_and_conversational():
    assert to_messages({"prompt": "Q", "completion": "A"}, "prompt_completion", NO_FIELDS) == [
        {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    row = {"prompt": [{"role": "user", "content": "Q"}], "completion": [{"role": "assistant", "content": "A"}]}
    assert [m["role"] for m in to_messages(row, "prompt_completion", NO_FIELDS)] == ["user", "assistant"]


def test_columns_with_system_column():
    fields = FieldMapping(prompt="question", response="answer", system="persona")
    row = {"question": "Q", "answer": "A", "persona": "Be kind."}
    assert to_messages(row, "columns", fields) == [
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert len(to_messages({"question": "Q", "answer": "A", "persona": ""}, "columns", fields)) == 2


@pytest.mark.parametrize("row, fmt, kind, reason", [
    ({"question": "Q"}, "columns", "missing_field", "field 'answer' is missing"),
    ({"question": "Q", "answer": None}, "columns", "null_value", "field 'answer' is null"),
    ({"question": "Q", "answer": 42}, "columns", "wrong_type", "field 'answer' is a number, expected text"),
    ({"question": True, "answer": "A"}, "columns", "wrong_type", "field 'question' is true/false, expected text"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages", "unknown_role", "turn 1 has unknown role 'tool'"),
    ({"conversations": [{"from": "human"}]}, "sharegpt", "missing_field", "turn 1 (user) has no 'content'"),
    ({"instruction": "I"}, "alpaca", "missing_field", "field 'output' is missing"),
    ({"prompt": ["x"], "completion": "y"}, "prompt_completion", "wrong_type", "turn 1 is text, expected an object"),
])
def test_conversion_errors_are_readable(row, fmt, kind, reason):
    with pytest.raises(RowError) as info:
        to_messages(row, fmt, FieldMapping(prompt="question", response="answer"))
    assert info.value.kind == kind and reason in str(info.value)


def test_kept_columns_are_json_safe():
    import datetime

    row = {"ticket": "T-1", "when": datetime.date(2024, 1, 2), "n": 3}
    assert kept_columns(row, ["ticket", "when", "missing"]) == {"ticket": "T-1", "when": "2024-01-02"}


def test_fast_json_loads_keeps_big_integers_exact():
    from stages.lib.io import fast_json_loads

    for text in ['{"n": 12345678901234567890123}', '{"n": -9223372036854775809}', '{"n": 1234567890123456789}']:
        assert fast_json_loads(text) == json.loads(text)
        assert fast_json_loads(text.encode()) == json.loads(text)
        assert type(fast_json_loads(text)["n"]) is int
