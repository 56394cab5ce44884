"""Normalise a conversation and apply the `clean` filters; every rejection says why in words.

Checks run in a fixed order and the first failure is the reason reported, so a row always gets
the same reason: structure (roles) before content (empty, short, long), because a conversation
in the wrong shape is wrong whatever its length.
"""
from __future__ import annotations

import functools
import itertools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from stages.lib.formats import (DETECT_ROWS, InputError, JsonlLines, RawRow, RowError, detect_format, kept_columns,
                                read_jsonl_lines, read_rows, to_messages)
from stages.lib.io import dumps_record
from stages.lib.parallel import ordered_map
from stages.lib.records import make_record
from stages.lib.text import normalize_text


def clean_messages(messages: list[dict], min_chars: int, max_chars: int,
                   require_assistant_last: bool) -> list[dict]:
    """Normalised messages, or RowError. An empty system prompt is dropped, not a rejection:
    it carries no information and the conversation is still usable."""
    cleaned, numbers = [], []   # numbers: each kept message's 1-based turn in the input row
    for number, message in enumerate(messages, 1):
        content = normalize_text(message["content"])
        if message["role"] == "system" and not content:
            continue
        cleaned.append({"role": message["role"], "content": content})
        numbers.append(number)
    check_roles(cleaned, numbers, require_assistant_last)
    total = 0
    for number, message in zip(numbers, cleaned):
        role, content = message["role"], message["content"]
        if not content:
            raise RowError("empty_turn", f"turn {number} ({role}) is empty or only whitespace")
        if role != "system" and len(content) < min_chars:
            raise RowError("too_short", f"turn {number} ({role}) has {len(content)} character(s), "
                                        f"fewer than clean.min_chars={min_chars}")
        total += len(content)
    if total > max_chars:
        raise RowError("too_long", f"conversation has {total} characters, more than clean.max_chars={max_chars}")
    return cleaned


def check_roles(messages: list[dict], numbers: list[int], require_assistant_last: bool) -> None:
    """An optional system turn first, then user and assistant turns alternating from a user turn.
    `numbers`: each message's turn number in the input row, for the reasons."""
    if not messages:
        raise RowError("no_turns", "conversation has no turns")
    expected = "user"
    for index, message in enumerate(messages):
        number, role = numbers[index], message["role"]
        if role == "system":
            if index == 0:
                continue
            raise RowError("role_order", f"turn {number} is a system turn; only the first turn may be a system prompt")
        if role != expected:
            if index == 0 or messages[index - 1]["role"] == "system":
                raise RowError("role_order", f"turn {number} is an assistant turn; a conversation must "
                                             "start with a user turn (after an optional system prompt)")
            raise RowError("role_order", f"turns {numbers[index - 1]} and {number} are both {role} turns")
        expected = "assistant" if role == "user" else "user"
    roles = [m["role"] for m in messages]
    if "user" not in roles:
        raise RowError("no_turns", "conversation has no user turn")
    if "assistant" not in roles:
        raise RowError("no_assistant", "conversation has no assistant turn")
    if require_assistant_last and roles[-1] != "assistant":
        raise RowError("not_assistant_last", f"the last turn ({numbers[-1]}) is a {roles[-1]} turn; "
                                             "clean.require_assistant_last wants an assistant turn")


class CleanSummary:
    """Counts the report needs, filled while rows stream past."""

    def __init__(self) -> None:
        self.rows_in = 0
        self.kept = 0
        self.rejected = 0
        self.blank_lines = 0
        self.rejected_by_reason: Counter = Counter()
        self.formats_by_file: dict[str, Optional[str]] = {}

    def count(self, kept: bool, row: dict) -> None:
        self.rows_in += 1
        if kept:
            self.kept += 1
        else:
            self.rejected += 1
            self.rejected_by_reason[row["kind"]] += 1

    def merge(self, other: "CleanSummary") -> None:
        self.rows_in += other.rows_in
        self.kept += other.kept
        self.rejected += other.rejected
        self.blank_lines += other.blank_lines
        self.rejected_by_reason.update(other.rejected_by_reason)
        self.formats_by_file.update(other.formats_by_file)


def rejection_row(raw: RawRow, error: RowError) -> dict:
    return {"file": raw.file, "line": raw.line, "kind": error.kind,
            "reason": f"line {raw.line}: {error}", "raw": raw.excerpt()}


def clean_file_rows(rows: Iterator[RawRow], data, clean, summary: CleanSummary
                    ) -> Iterator[tuple[bool, dict]]:
    """(True, record) or (False, rejection) for every row of one file, in order."""
    head, fmt = read_ahead_format(rows, data)
    yield from _clean_rows(itertools.chain(head, rows), fmt, data, clean, summary)


def _clean_rows(rows: Iterator[RawRow], fmt: Optional[str], data, clean, summary: CleanSummary
                ) -> Iterator[tuple[bool, dict]]:
    """clean_row for each row, counted in `summary`; blank lines are counted apart."""
    for raw in rows:
        if fmt is None and raw.row is not None:   # the first readable row came after the read-ahead
            fmt = _detect([raw.row], raw.file, data.fields)
        summary.formats_by_file[raw.file] = fmt
        result = clean_row(raw, fmt, data, clean)
        if result is None:
            summary.blank_lines += 1
            continue
        summary.count(*result)
        yield result


def read_ahead_format(rows: Iterator[RawRow], data, keep_all: bool = False) -> tuple[list[RawRow], Optional[str]]:
    """(rows read ahead, format): data.format, or detected from the file's first DETECT_ROWS
    parsed rows (read ahead and then replayed, so the file is still read once). The format is
    None when no row of the read-ahead could be parsed. keep_all: `rows` is a list already read
    ahead; return all of it, whatever part the detection looked at."""
    head: list[RawRow] = []
    if data.format != "auto":
        return (list(rows) if keep_all else head), data.format
    parsed = []
    for raw in rows:
        head.append(raw)
        if raw.row is not None:
            parsed.append(raw.row)
        if _enough_to_detect(len(parsed), len(head)):
            break
    if keep_all:
        head.extend(rows)
    return head, _detect(parsed, head[0].file if head else "", data.fields)


def clean_row(raw: RawRow, fmt: Optional[str], data, clean) -> Optional[tuple[bool, dict]]:
    """(True, record) or (False, rejection) for one row; None for a blank line."""
    if raw.blank:
        return None
    error = raw.error
    if error is None:
        try:
            messages = to_messages(raw.row, fmt, data.fields)
            messages = clean_messages(messages, clean.min_chars, clean.max_chars, clean.require_assistant_last)
            meta = kept_columns(raw.row, data.keep_columns)
            check_encodable(messages, meta)
        except RowError as exc:
            error = exc
    if error is not None:
        return False, rejection_row(raw, error)
    source = {"file": raw.file, "line": raw.line}
    return True, make_record(messages, source, meta)


def _unencodable(text: str) -> Optional[int]:
    """Index of the first code point UTF-8 cannot encode (a lone surrogate, U+D800..U+DFFF, which
    valid JSON can spell as "\\ud800"), or None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def check_encodable(messages: list[dict], meta: dict) -> None:
    """RowError 'invalid_unicode' for a row whose text is not valid Unicode. Such rows are
    rejected, not repaired: replacing the code point would train on text nobody wrote, and the
    later stages (tokenisers, hashing, UTF-8 files) cannot take it as it is."""
    for number, message in enumerate(messages, 1):
        at = _unencodable(message["content"])
        if at is not None:
            raise RowError("invalid_unicode", f"message {number} ({message['role']}) has a lone surrogate "
                                              f"U+{ord(message['content'][at]):04X} at character {at + 1}: "
                                              "not valid Unicode")
    for column, value in meta.items():
        texts = [value] if isinstance(value, str) else []
        if isinstance(value, (list, dict)):
            import json

            texts = [json.dumps(value, ensure_ascii=False)]
        for text in texts:
            at = _unencodable(text)
            if at is not None:
                raise RowError("invalid_unicode", f"column {column!r} has a lone surrogate "
                                                  f"U+{ord(text[at]):04X}: not valid Unicode")


@dataclass
class CleanedBatch:
    """A batch of rows cleaned in a worker: output lines ready to write, and the counts."""

    kept: str                   # JSON lines of the records
    rejected: str               # JSON lines of the rejections
    summary: "CleanSummary"


def clean_batch(rows, fmt: str, data, clean) -> CleanedBatch:
    """clean_row for every row of a batch (RawRows, or JsonlLines parsed here), serialised:
    runs in a worker process."""
    if isinstance(rows, JsonlLines):
        rows = rows.rows()
    kept, rejected, summary = [], [], CleanSummary()
    for is_kept, row in _clean_rows(rows, fmt, data, clean, summary):
        (kept if is_kept else rejected).append(dumps_record(row) + "\n")
    return CleanedBatch("".join(kept), "".join(rejected), summary)


def clean_file(path, name: str, data, clean, summary: CleanSummary, batch_rows: int = 2048,
               workers: Optional[int] = None) -> Iterator[tuple[str, str]]:
    """(kept JSON lines, rejected JSON lines) for consecutive batches of one input file, in order:
    the same bytes as clean_file_rows serialised row by row (tests/test_cleaning.py).

    Batches are converted and cleaned by worker processes (parallel.ordered_map). A JSONL file is
    handed out as raw lines, parsed by the workers; other formats are parsed by their reader here.
    An error reading the file (EACCES, EIO, ...) is an InputError naming it as an unreadable
    input, not an OSError that the caller's output handling would report as a failed write."""
    items = _clean_file(path, name, data, clean, summary, batch_rows, workers)
    while True:
        try:
            item = next(items)
        except StopIteration:
            return
        except OSError as exc:
            raise InputError(f"{name}: unreadable input: {exc.strerror or exc}") from None
        yield item


def _clean_file(path, name: str, data, clean, summary: CleanSummary, batch_rows: int,
                workers: Optional[int]) -> Iterator[tuple[str, str]]:
    if Path(path).suffix.lower() == ".jsonl":
        batches = read_jsonl_lines(Path(path), name, batch_rows)
        head: list[RawRow] = []
        if data.format == "auto":   # parse just enough batches here to detect the format
            for batch in batches:
                head.extend(batch.rows())
                if _read_ahead_done(head):
                    break
        head, fmt = read_ahead_format(iter(head), data, keep_all=True)
    else:
        rows = read_rows(Path(path), name)
        head, fmt = read_ahead_format(rows, data)
        batches = _batches(rows, batch_rows)
    if fmt is None:   # nothing readable yet: the format comes from a later row, row by row
        rest = (raw for batch in batches for raw in (batch.rows() if isinstance(batch, JsonlLines) else batch))
        for kept, row in clean_file_rows(itertools.chain(head, rest), data, clean, summary):
            yield (dumps_record(row) + "\n", "") if kept else ("", dumps_record(row) + "\n")
        return
    items = itertools.chain([head] if head else [], batches)
    for cleaned in ordered_map(functools.partial(clean_batch, fmt=fmt, data=data, clean=clean), items, workers):
        summary.merge(cleaned.summary)
        yield cleaned.kept, cleaned.rejected


def _enough_to_detect(parsed: int, seen: int) -> bool:
    """Enough parsed rows to vote on the format, or a file that starts with a long run of
    unreadable rows: the read-ahead stays bounded either way."""
    return parsed >= DETECT_ROWS or seen >= 100 * DETECT_ROWS


def _read_ahead_done(rows: list[RawRow]) -> bool:
    parsed = 0
    for seen, raw in enumerate(rows, 1):
        parsed += raw.row is not None
        if _enough_to_detect(parsed, seen):
            return True
    return False


def _batches(rows: Iterator[RawRow], size: int) -> Iterator[list[RawRow]]:
    batch = []
    for raw in rows:
        batch.append(raw)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _detect(rows: list[dict], name: str, fields) -> str | None:
    """The detected format; None when there is nothing to look at yet; InputError when rows
    were read but match no format."""
    if not rows:
        return None
    fmt = detect_format(rows, fields)
    if fmt is None:
        seen = sorted({key for row in rows for key in row})[:20]
        raise InputError(f"{name}: cannot detect the data format from its first rows (columns seen: "
                         f"{', '.join(seen)}). Set data.format, or data.fields.prompt and "
                         "data.fields.response for question/answer columns")
    return fmt
