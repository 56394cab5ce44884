"""Streaming readers for the input data and conversion of each row to canonical messages.

Readers yield one `RawRow` per input row, in file order, and never raise for a bad row: a row
that cannot be read becomes a `RawRow` with a `RowError` (a reason kind for the report and a
message a person understands, e.g. "invalid JSON: Expecting ',' delimiter (column 17)"). Only
a problem with a whole file (missing, unreadable Parquet, no data files in a directory) raises
`InputError`, which the stage turns into one clear message.

Memory stays bounded: JSONL and CSV are read line by line, Parquet in record batches, and a JSON
array element by element, so a 1M-row input never sits in memory at once.
"""
from __future__ import annotations

import csv
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from stages.lib.io import fast_json_loads, has_long_number

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "columns")
DETECT_ROWS = 100          # rows of each file that auto-detection looks at
RAW_EXCERPT_CHARS = 500    # characters of a rejected row kept in rejected.jsonl
_BOM = b"\xef\xbb\xbf"
_JSON_SPACE = re.compile(r"[ \t\n\r]*")


class InputError(Exception):
    """The input as a whole cannot be read (not a per-row problem)."""


class RowError(Exception):
    """One row is rejected. `kind` groups reasons in the report; str(self) is the reason."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):   # pickles (rows travel to clean's worker processes with their errors)
        return type(self), (self.kind, str(self))


@dataclass(slots=True)
class RawRow:
    file: str                 # path as shown to the user (relative to the project when inside it)
    line: int                 # 1-based line where the row starts (Parquet: 1-based row number)
    row: Optional[dict]       # the parsed row, or None when it could not be parsed
    error: Optional[RowError] = None
    raw: Optional[str] = None  # the raw text, when the reader has it (JSONL line, bad JSON ...)
    blank: bool = False       # an empty line: not a row, counted apart

    def excerpt(self) -> str:
        """At most RAW_EXCERPT_CHARS of the raw row, for a person to recognise it."""
        text = self.raw
        if text is None:
            text = json.dumps(self.row, ensure_ascii=False, default=str, sort_keys=True)
        if len(text) > RAW_EXCERPT_CHARS:
            return text[:RAW_EXCERPT_CHARS] + f"… ({len(text)} characters)"
        return text


# --------------------------------------------------------------------------------------------
# Files


def _checked_kind(path: Path, project: Path, allowed_roots) -> str:
    """'file' or 'dir' for an input path that may be read: after symlinks are resolved it lies
    inside the project or under data.allowed_roots, and it is a regular file or a directory.
    InputError otherwise, before anything is opened: a FIFO would block the stage, a device or
    /proc file (through a symlink in a data folder) could copy secrets into the outputs."""
    import stat

    from stages.lib.io import is_allowed_path

    try:
        info = os.stat(path)   # follows symlinks
    except FileNotFoundError:
        if os.path.islink(path):
            raise InputError(f"{path}: a symlink to {os.readlink(path)}, which does not exist") from None
        raise InputError(f"{path}: not found (check data.raw; a `dvc add`-ed file may need `dvc pull`)") from None
    except OSError as exc:
        raise InputError(f"{path}: unreadable input: {exc.strerror or exc}") from None
    resolved = Path(os.path.realpath(path))
    if not is_allowed_path(resolved, project, allowed_roots):
        raise InputError(f"{path}: resolves to {resolved}, outside the project and data.allowed_roots; refused "
                         "(add the directory to data.allowed_roots if you mean to read it)")
    if stat.S_ISDIR(info.st_mode):
        return "dir"
    if not stat.S_ISREG(info.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(info.st_mode) else "a socket" if stat.S_ISSOCK(info.st_mode)
                else "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else "not a regular file")
        raise InputError(f"{path}: {kind}, not a data file; refused")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: unreadable input: permission denied")
    return "file"


def list_input_files(path: Path, project: Path | None = None, allowed_roots=()) -> tuple[list[Path], list[Path]]:
    """(data files, ignored files). A directory is walked recursively in sorted order so the
    row order, and so every output, does not depend on the file system. Every data file and
    folder, symlinks resolved, must lie inside `project` (default: the working directory) or
    under `allowed_roots`, and be a regular file or a directory (_checked_kind): InputError
    names the first that is not. Symlinked folders are followed once (a loop is not)."""
    project = Path(project or Path.cwd()).resolve()
    if _checked_kind(path, project, allowed_roots) == "file":
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise InputError(f"{path}: unsupported file type {path.suffix!r}; expected one of "
                             + ", ".join(SUPPORTED_SUFFIXES))
        return [path], []
    files, ignored = [], []
    seen_dirs = {os.path.realpath(path)}
    for root, dirs, names in os.walk(path, followlinks=True):
        kept_dirs = []
        for name in sorted(d for d in dirs if not d.startswith(".")):
            folder = Path(root) / name
            _checked_kind(folder, project, allowed_roots)
            real = os.path.realpath(folder)
            if real not in seen_dirs:   # a symlink loop, or a folder reached twice, is walked once
                seen_dirs.add(real)
                kept_dirs.append(name)
        dirs[:] = kept_dirs
        for name in sorted(names):
            candidate = Path(root) / name
            if name.startswith(".") or candidate.suffix.lower() not in SUPPORTED_SUFFIXES:
                ignored.append(candidate)   # never opened: only its name is reported
            elif _checked_kind(candidate, project, allowed_roots) == "file":
                files.append(candidate)
            else:
                raise InputError(f"{candidate}: a folder named like a data file; refused")
    files.sort(key=lambda p: p.relative_to(path).as_posix())
    if not files:
        raise InputError(f"{path}: no {'/'.join(SUPPORTED_SUFFIXES)} files in this directory")
    return files, ignored


def display_name(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def read_rows(path: Path, name: str) -> Iterator[RawRow]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl_rows(path, name)
    if suffix == ".json":
        return read_json_rows(path, name)
    if suffix == ".csv":
        return read_csv_rows(path, name)
    if suffix == ".parquet":
        return read_parquet_rows(path, name)
    raise InputError(f"{name}: unsupported file type {suffix!r}")


# --------------------------------------------------------------------------------------------
# JSON Lines


def parse_json_object(text: str, may_have_long_numbers: bool = True) -> dict:
    """json.loads for one row; every failure becomes a RowError with a readable reason."""
    try:
        value = fast_json_loads(text, may_have_long_numbers)  # strict=False: raw tabs/newlines inside strings are common
    except json.JSONDecodeError as exc:
        raise RowError("invalid_json", f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise RowError("invalid_json", "invalid JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise RowError("invalid_json", f"invalid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise RowError("not_an_object", f"expected a JSON object, got {type_name(value)}")
    return value


def read_jsonl_rows(path: Path, name: str) -> Iterator[RawRow]:
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            yield jsonl_row(name, number, line)


def jsonl_row(name: str, number: int, line: bytes, may_have_long_numbers: bool = True) -> RawRow:
    """The RawRow of line `number` of a JSONL file (`line` as read, newline included)."""
    complete = line.endswith(b"\n")
    if number == 1 and line.startswith(_BOM):
        line = line[len(_BOM):]
    line = line.rstrip(b"\r\n")
    if not line.strip():
        return RawRow(name, number, None, blank=True)
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return RawRow(name, number, None, RowError("not_utf8", f"not UTF-8 at byte {exc.start + 1}"),
                      raw=line.decode("utf-8", "backslashreplace"))
    try:
        row = parse_json_object(text, may_have_long_numbers)
    except RowError as exc:
        if not complete and exc.kind == "invalid_json":
            exc = RowError("truncated", "the last line looks truncated (no newline at the end "
                                        f"of the file): {exc}")
        return RawRow(name, number, None, exc, raw=text)
    return RawRow(name, number, row, raw=text)


@dataclass
class JsonlLines:
    """Consecutive lines of a JSONL file, read but not parsed yet: `rows()` parses them (in a
    worker process, so that the reading process only moves bytes)."""

    name: str
    first: int               # line number of lines[0]
    lines: list

    def rows(self) -> list[RawRow]:
        unchecked = has_long_number(b"".join(self.lines))   # one scan for the batch, not one per line
        return [jsonl_row(self.name, number, line, unchecked) for number, line in enumerate(self.lines, self.first)]


def read_jsonl_lines(path: Path, name: str, batch_lines: int) -> Iterator[JsonlLines]:
    with open(path, "rb") as handle:
        first, lines = 1, []
        for line in handle:
            lines.append(line)
            if len(lines) == batch_lines:
                yield JsonlLines(name, first, lines)
                first, lines = first + len(lines), []
        if lines:
            yield JsonlLines(name, first, lines)


# --------------------------------------------------------------------------------------------
# JSON (an array of rows, one object, or JSON values one after another)


class _JsonStream:
    """Decode JSON values one at a time from a text file without reading it whole."""

    CHUNK = 1 << 20

    def __init__(self, handle) -> None:
        self.handle = handle
        self.buffer = ""
        self.pos = 0
        self.line = 1          # line number at self.pos
        self.eof = False
        self.decoder = json.JSONDecoder(strict=False)

    def _fill(self, at_least: int) -> bool:
        if self.eof:
            return False
        chunk = self.handle.read(max(self.CHUNK, at_least))
        if not chunk:
            self.eof = True
            return False
        # Drop what was consumed, keeping the line count right.
        self.buffer = self.buffer[self.pos:] + chunk
        self.pos = 0
        return True

    def _advance(self, new_pos: int) -> None:
        self.line += self.buffer.count("\n", self.pos, new_pos)
        self.pos = new_pos

    def peek(self) -> str:
        """Skip whitespace; the next character ('' at the end of the file)."""
        while True:
            self._advance(_JSON_SPACE.match(self.buffer, self.pos).end())
            if self.pos < len(self.buffer):
                return self.buffer[self.pos]
            if not self._fill(0):
                return ""

    def take(self, char: str) -> None:
        self._advance(self.pos + len(char))

    def value(self) -> Any:
        """Decode the next value; RowError if it is not valid JSON (after reading to EOF)."""
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buffer, self.pos)
            except json.JSONDecodeError as exc:
                # An error may only mean the value continues past the buffer: read more first.
                if self._fill(len(self.buffer)):
                    continue
                line = self.line + self.buffer.count("\n", self.pos, exc.pos)
                raise RowError("invalid_json", f"invalid JSON at line {line}: {exc.msg}") from None
            except RecursionError:
                raise RowError("invalid_json", "invalid JSON: nested too deeply") from None
            # A number at the very end of the buffer may be cut ("12" of "123"): make sure.
            if end == len(self.buffer) and self._fill(0):
                continue
            self._advance(end)
            return value


def read_json_rows(path: Path, name: str) -> Iterator[RawRow]:
    """A JSON array of objects (streamed element by element), JSON Lines saved as .json, or
    one object: a single row, or a wrapper such as {"data": [...]} holding the rows."""
    try:
        handle = open(path, encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise InputError(f"{name}: cannot read: {exc.strerror}") from None
    with handle:
        stream = _JsonStream(handle)
        try:
            first = stream.peek()
        except UnicodeDecodeError as exc:
            raise InputError(f"{name}: not UTF-8 ({exc.reason} at byte {exc.start + 1} of a read block)") from None
        if first == "":
            return
        try:
            if first == "[":
                yield from _json_array(stream, name)
            else:
                yield from _json_values(stream, name)
        except UnicodeDecodeError:
            line = stream.line
            yield RawRow(name, line, None, RowError(
                "not_utf8", f"not UTF-8 after line {line}; the rest of the file could not be read"))


def _json_array(stream: _JsonStream, name: str) -> Iterator[RawRow]:
    stream.take("[")
    expect_value = True
    while True:
        char = stream.peek()
        if char == "]":
            return
        if char == "":
            yield RawRow(name, stream.line, None, RowError(
                "truncated", "the file ends inside the JSON array (truncated?)"))
            return
        if not expect_value:
            if char != ",":
                yield RawRow(name, stream.line, None, RowError(
                    "invalid_json", f"invalid JSON at line {stream.line}: expected ',' or ']' between "
                                    "array elements; the rest of the file could not be read"))
                return
            stream.take(",")
            expect_value = True
            continue
        line = stream.line
        try:
            value = stream.value()
        except RowError as exc:
            yield _unreadable_rest(stream, name, line, exc)
            return
        expect_value = False
        yield _object_row(value, name, line)


def _unreadable_rest(stream: _JsonStream, name: str, line: int, exc: RowError) -> RawRow:
    """A parse error inside a multi-value .json file: the stream cannot resync, so the row that
    failed is reported and, with it, that nothing after it could be read."""
    return RawRow(name, line, None, RowError(exc.kind, f"{exc}; the rest of the file could not be read"),
                  raw=stream.buffer[stream.pos:stream.pos + RAW_EXCERPT_CHARS])


def _json_values(stream: _JsonStream, name: str) -> Iterator[RawRow]:
    line = stream.line
    try:
        first = stream.value()
    except RowError as exc:
        yield RawRow(name, line, None, exc, raw=stream.buffer[stream.pos:stream.pos + RAW_EXCERPT_CHARS])
        return
    if stream.peek() == "":
        rows = _wrapped_rows(first)
        if rows is None:
            yield _object_row(first, name, line)
        else:
            # A wrapper object was read whole by json; its elements have no line numbers of their
            # own, so they are numbered by position (1-based) in the list.
            for index, value in enumerate(rows, 1):
                yield _object_row(value, name, index)
        return
    # More values follow: JSON Lines (or concatenated JSON) in a .json file.
    yield _object_row(first, name, line)
    while stream.peek() != "":
        line = stream.line
        try:
            value = stream.value()
        except RowError as exc:
            yield _unreadable_rest(stream, name, line, exc)
            return
        yield _object_row(value, name, line)


def _wrapped_rows(value: Any) -> Optional[list]:
    """{"data": [{...}, ...]}: the one list of objects inside a top-level object, else None."""
    if not isinstance(value, dict) or any(key in value for key in _RECORD_KEYS):
        return None
    lists = [v for v in value.values() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
    return lists[0] if len(lists) == 1 else None


def _object_row(value: Any, name: str, line: int) -> RawRow:
    if isinstance(value, dict):
        return RawRow(name, line, value)
    return RawRow(name, line, None, RowError("not_an_object", f"expected a JSON object, got {type_name(value)}"),
                  raw=json.dumps(value, ensure_ascii=False)[:RAW_EXCERPT_CHARS + 1])


# --------------------------------------------------------------------------------------------
# CSV


def read_csv_rows(path: Path, name: str) -> Iterator[RawRow]:
    # Fields of several MB are legitimate (long documents); the csv default limit is 128 kB.
    csv.field_size_limit(2**31 - 1)
    bad_bytes: dict[int, int] = {}   # physical line -> 1-based byte of the first bad byte

    def decoded_lines() -> Iterator[str]:
        # Decode line by line ourselves so that a bad byte costs one row, not the whole file.
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, 1):
                if number == 1 and raw.startswith(_BOM):
                    raw = raw[len(_BOM):]
                try:
                    yield raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    bad_bytes[number] = exc.start + 1
                    yield raw.decode("utf-8", "replace")

    reader = csv.reader(decoded_lines())
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        raise InputError(f"{name}: the CSV header cannot be read: {exc}") from None
    header = [column.strip() for column in header]
    duplicates = sorted(column for column, count in Counter(header).items() if count > 1)
    if duplicates:
        raise InputError(f"{name}: the CSV header repeats column(s) {', '.join(map(repr, duplicates))}")
    if 1 in bad_bytes:
        raise InputError(f"{name}: the CSV header is not UTF-8 (byte {bad_bytes[1]})")
    previous_end = reader.line_num
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            start, previous_end = previous_end + 1, reader.line_num
            yield RawRow(name, start, None, RowError("invalid_csv", f"invalid CSV: {exc}"))
            continue
        start, previous_end = previous_end + 1, reader.line_num
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            yield RawRow(name, start, None, blank=True)
            continue
        raw = ",".join(fields)
        bad = [line for line in range(start, previous_end + 1) if line in bad_bytes]
        if bad:
            yield RawRow(name, start, None, RowError("not_utf8", f"not UTF-8 at byte {bad_bytes[bad[0]]}"
                                                     + (f" of line {bad[0]}" if bad[0] != start else "")), raw=raw)
            continue
        if len(fields) != len(header):
            yield RawRow(name, start, None, RowError(
                "ragged_csv", f"has {len(fields)} field{'s' if len(fields) != 1 else ''}, the header has "
                              f"{len(header)}"), raw=raw)
            continue
        yield RawRow(name, start, dict(zip(header, fields)))


# --------------------------------------------------------------------------------------------
# Parquet


def read_parquet_rows(path: Path, name: str, batch_size: int = 4096) -> Iterator[RawRow]:
    import pyarrow.parquet as pq  # heavy: only when a Parquet file is read

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt or non-Parquet file
        raise InputError(f"{name}: not a readable Parquet file ({exc})") from None
    number = 0
    try:
        for batch in parquet.iter_batches(batch_size=batch_size):
            for row in batch.to_pylist():
                number += 1
                yield RawRow(name, number, row)
    except Exception as exc:
        raise InputError(f"{name}: Parquet data unreadable after row {number} ({exc})") from None


# --------------------------------------------------------------------------------------------
# Formats


_RECORD_KEYS = ("messages", "conversations", "instruction", "prompt")
# Keys that identify each format, tried in this order (the order also breaks ties).
_SIGNATURES = (
    ("messages", ("messages",)),
    ("sharegpt", ("conversations",)),
    ("alpaca", ("instruction", "output")),
    ("prompt_completion", ("prompt", "completion")),
)
ROLE_ALIASES = {
    "system": "system", "developer": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant", "chatgpt": "assistant",
    "bot": "assistant",
}


def detect_format(rows: list[dict], fields) -> Optional[str]:
    """The format most of `rows` match, or None if none match any.

    A field mapping in params (data.fields.prompt + response) means `columns` whatever the keys:
    it is the user's explicit word.
    """
    if fields.prompt and fields.response:
        return "columns"
    votes: Counter = Counter()
    for row in rows:
        for fmt, keys in _SIGNATURES:
            if all(key in row for key in keys):
                votes[fmt] += 1
                break
    if not votes:
        return None
    best = max(votes.values())
    return next(fmt for fmt, _ in _SIGNATURES if votes[fmt] == best)


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _field(row: dict, key: str, expected: type, what: str, optional: bool = False) -> Any:
    if key not in row:
        if optional:
            return None
        raise RowError("missing_field", f"field '{key}' is missing")
    value = row[key]
    if value is None:
        if optional:
            return None
        raise RowError("null_value", f"field '{key}' is null")
    if not isinstance(value, expected) or isinstance(value, bool):
        raise RowError("wrong_type", f"field '{key}' is {type_name(value)}, expected {what}")
    return value


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        raise RowError("null_value", f"{where} content is null")
    if isinstance(content, list):
        # OpenAI content parts: [{"type": "text", "text": "..."}]; other parts (images) can't be used.
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type_name(part)
                raise RowError("wrong_type", f"{where} content has a non-text part ({kind})")
        return "\n".join(texts)
    raise RowError("wrong_type", f"{where} content is {type_name(content)}, expected text")


def _turns(turns: list, field: str) -> list[dict]:
    # Fast path for the shape nearly every row has, {"role": <a known role>, "content": <text>};
    # anything else goes through the checks below, which say what is wrong.
    messages = []
    for turn in turns:
        if type(turn) is dict:
            role, content = turn.get("role"), turn.get("content")
            if type(content) is str and type(role) is str and role in ROLE_ALIASES:
                messages.append({"role": ROLE_ALIASES[role], "content": content})
                continue
        return _checked_turns(turns, field)
    return messages


def _checked_turns(turns: list, field: str) -> list[dict]:
    messages = []
    for number, turn in enumerate(turns, 1):
        where = f"turn {number}"
        if not isinstance(turn, dict):
            raise RowError("wrong_type", f"{field}: {where} is {type_name(turn)}, expected an object with role and content")
        role_key = "role" if "role" in turn else "from" if "from" in turn else None
        if role_key is None:
            raise RowError("missing_field", f"{field}: {where} has no 'role'")
        role = turn[role_key]
        if role is None:
            raise RowError("null_value", f"{field}: {where} role is null")
        if not isinstance(role, str):
            raise RowError("wrong_type", f"{field}: {where} role is {type_name(role)}, expected text")
        canonical = ROLE_ALIASES.get(role.strip().lower())
        if canonical is None:
            raise RowError("unknown_role", f"{field}: {where} has unknown role {role!r} "
                                           "(expected system, user or assistant)")
        content_key = "content" if "content" in turn else "value" if "value" in turn else None
        if content_key is None:
            raise RowError("missing_field", f"{field}: {where} ({canonical}) has no 'content'")
        messages.append({"role": canonical, "content": _content_text(turn[content_key], f"{field}: {where} ({canonical})")})
    return messages


def _text_or_turns(row: dict, key: str, role: str) -> list[dict]:
    value = row.get(key)
    if isinstance(value, list):  # TRL's conversational prompt/completion
        return _turns(value, key)
    return [{"role": role, "content": _field(row, key, str, "text")}]


def to_messages(row: dict, fmt: str, fields) -> list[dict]:
    """Canonical [{"role", "content"}] turns of one input row (content not yet normalised)."""
    if fmt == "messages":
        return _turns(_field(row, "messages", list, "a list of turns"), "messages")
    if fmt == "sharegpt":
        return _turns(_field(row, "conversations", list, "a list of turns"), "conversations")
    if fmt == "alpaca":
        instruction = _field(row, "instruction", str, "text")
        extra = _field(row, "input", str, "text", optional=True)
        output = _field(row, "output", str, "text")
        system = _field(row, "system", str, "text", optional=True)
        # Alpaca's `input` is context for the instruction: appended, separated by a blank line.
        prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        messages = [{"role": "system", "content": system}] if system else []
        return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    if fmt == "prompt_completion":
        return _text_or_turns(row, "prompt", "user") + _text_or_turns(row, "completion", "assistant")
    if fmt == "columns":
        messages = []
        if fields.system:
            system = _field(row, fields.system, str, "text", optional=True)
            if system:
                messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": _field(row, fields.prompt, str, "text")})
        messages.append({"role": "assistant", "content": _field(row, fields.response, str, "text")})
        return messages
    raise ValueError(f"unknown format {fmt!r}")


def kept_columns(row: dict, columns: list[str]) -> dict:
    """data.keep_columns copied into meta (absent columns are left out, values made JSON-safe)."""
    meta = {}
    for column in columns:
        if column in row:
            value = row[column]
            if not isinstance(value, (str, int, float, bool, type(None), list, dict)):
                value = str(value)  # e.g. a Parquet timestamp
            meta[column] = value
    return meta
