import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.lib.io import (OutputError, atomic_dir, atomic_file, dumps_record, parse_jsonl_lines, read_jsonl,
                           resolve_data_path, write_json, write_jsonl)


def test_write_jsonl_is_deterministic_and_readable(tmp_path):
    rows = [{"b": 1, "a": "é"}, {"a": [1, 2]}]
    path = tmp_path / "out.jsonl"
    assert write_jsonl(path, rows) == 2
    first = path.read_bytes()
    write_jsonl(path, rows)
    assert path.read_bytes() == first == '{"a":"é","b":1}\n{"a":[1,2]}\n'.encode()
    assert list(read_jsonl(path)) == rows


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "report.json"
    write_json(path, {"ok": 1})
    with pytest.raises(RuntimeError):
        with atomic_file(path) as handle:
            handle.write("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text().startswith("{")
    assert os.listdir(tmp_path) == ["report.json"]


def test_outputs_get_normal_permissions(tmp_path):
    write_json(tmp_path / "r.json", {})
    assert (tmp_path / "r.json").stat().st_mode & 0o044  # group/other readable under a usual umask


def test_unwritable_target_is_a_clear_error(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory should be")
    with pytest.raises(OutputError, match="cannot write"):
        write_json(blocker / "x.json", {})


def test_read_only_directory_is_a_clear_error(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    with pytest.raises(OutputError, match="cannot write"):
        write_json(locked / "x.json", {})


def test_atomic_dir_replaces_whole_folder(tmp_path):
    target = tmp_path / "adapter"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(ValueError):
        with atomic_dir(target) as tmp:
            (tmp / "b").write_text("2")
            raise ValueError
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_data_paths_cannot_escape_the_project(tmp_path):
    assert resolve_data_path("data/raw/x.jsonl", tmp_path) == tmp_path.resolve() / "data/raw/x.jsonl"
    with pytest.raises(ValueError, match="outside the project"):
        resolve_data_path("../../etc/passwd", tmp_path)
    # An absolute path outside the project is read only from a directory named in data.allowed_roots.
    with pytest.raises(ValueError, match="outside the project and data.allowed_roots"):
        resolve_data_path("/etc/hosts", tmp_path)
    assert str(resolve_data_path("/etc/hosts", tmp_path, allowed_roots=["/etc"])) == "/etc/hosts"
    (tmp_path / "link.jsonl").symlink_to("/etc/hosts")   # a symlink is judged by where it leads
    with pytest.raises(ValueError, match="resolves to /etc/hosts"):
        resolve_data_path("link.jsonl", tmp_path)


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**63, max_value=2**64 - 1) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(_JSON_VALUES)
def test_dumps_record_is_json_dumps_byte_for_byte(value):
    # orjson writes what json.dumps writes for everything a record holds except floats, including
    # control characters, quotes, backslashes, U+2028 and non-ASCII text.
    assert dumps_record(value) == json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def test_dumps_record_falls_back_to_json_for_what_orjson_refuses():
    huge = {"n": 2**70, "s": "caf\u00e9"}   # beyond 64 bits
    assert dumps_record(huge) == json.dumps(huge, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    # A lone surrogate (json.loads makes them) cannot go into a UTF-8 file: it is written as its
    # escape, and reads back as the same string.
    lone = {"n": 2**70, "s": "\ud800 caf\u00e9"}
    line = dumps_record(lone)
    assert line == json.dumps(lone, ensure_ascii=True, sort_keys=True, separators=(",", ":"))
    line.encode("utf-8")
    assert json.loads(line) == lone
    assert json.loads(dumps_record({"x": 0.8125, "y": 1.0})) == {"x": 0.8125, "y": 1.0}


def test_parse_jsonl_lines_reads_str_and_bytes_alike_and_skips_blank_lines():
    lines = ['{"id": "a", "n": 1}\n', "\n", "  \r\n", '{"id": "b", "big": %d}\r\n' % 2**70]
    expected = [{"id": "a", "n": 1}, {"id": "b", "big": 2**70}]   # beyond 64 bits, exact
    assert list(parse_jsonl_lines(lines)) == expected
    assert list(parse_jsonl_lines([line.encode() for line in lines])) == expected


def test_parse_jsonl_lines_raises_on_a_malformed_line_unless_asked_to_keep_it_as_none():
    lines = ['{"id": "a"}\n', '{"id": "cut sh\n', '{"id": "c"}\n']
    with pytest.raises(ValueError):
        list(parse_jsonl_lines(lines))
    assert list(parse_jsonl_lines(lines, malformed_as_none=True)) == [{"id": "a"}, None, {"id": "c"}]


def test_read_probes_reports_every_bad_row_with_its_line(tmp_path, monkeypatch):
    from stages.lib.io import ProbeError, read_probes

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "probes"
    folder.mkdir()
    (folder / "general.jsonl").write_text(
        '{"id": "a", "prompt": "2+2?", "accept": ["4"]}\n'
        'not json\n'
        '{"id": "b", "prompt": "x", "accept": []}\n', encoding="utf-8")
    with pytest.raises(ProbeError) as caught:
        read_probes("probes")
    message = str(caught.value)
    assert "2 bad probe row(s)" in message and "line 2: not JSON" in message and "line 3 (b)" in message


def test_read_probes_returns_rows_and_text(tmp_path, monkeypatch):
    from stages.lib.io import read_probes

    monkeypatch.chdir(tmp_path)
    (tmp_path / "probes").mkdir()
    (tmp_path / "probes" / "general.jsonl").write_text('{"id": "a", "prompt": "2+2?", "accept": ["4"]}\n')
    (tmp_path / "probes" / "general_text.txt").write_text("Some text.")
    probes, text = read_probes("probes")
    assert [p["id"] for p in probes] == ["a"] and text == "Some text."


def test_read_probes_missing_folder_is_an_error_unless_missing_ok(tmp_path, monkeypatch):
    from stages.lib.io import ProbeError, read_probes

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ProbeError, match="general.jsonl not found"):
        read_probes("probes")
    assert read_probes("probes", missing_ok=True) == ([], "")
    (tmp_path / "probes").mkdir()
    (tmp_path / "probes" / "general.jsonl").write_text("not json\n")
    with pytest.raises(ProbeError, match="not JSON"):  # present but broken: still an error
        read_probes("probes", missing_ok=True)
