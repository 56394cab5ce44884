"""Normalise a conversation and apply the `clean` filters; every rejection says why in words.

Checks run in a fixed order and the first failure is the reason reported, so a row always gets
the same reason: structure (roles) before content (empty, short, long), because a conversation
in the wrong shape is wrong whatever its length.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterator, Optional

from stages.lib.formats import (DETECT_ROWS, InputError, RawRow, RowError, detect_format, kept_columns,
                                to_messages)
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


def rejection_row(raw: RawRow, error: RowError) -> dict:
    return {"file": raw.file, "line": raw.line, "kind": error.kind,
            "reason": f"line {raw.line}: {error}", "raw": raw.excerpt()}


def clean_file_rows(rows: Iterator[RawRow], data, clean, summary: CleanSummary
                    ) -> Iterator[tuple[bool, dict]]:
    """(True, record) or (False, rejection) for every row of one file, in order.

    The format is data.format, or detected from the file's first DETECT_ROWS parsed rows (read
    ahead and then replayed, so the file is still read once)."""
    head: list[RawRow] = []
    fmt = data.format
    if fmt == "auto":
        parsed = []
        for raw in rows:
            head.append(raw)
            if raw.row is not None:
                parsed.append(raw.row)
            # Enough rows to vote, or a file that starts with a long run of unreadable rows: the
            # read-ahead stays bounded either way.
            if len(parsed) >= DETECT_ROWS or len(head) >= 100 * DETECT_ROWS:
                break
        fmt = _detect(parsed, head[0].file if head else "", data.fields)
    for raw in _chain(head, rows):
        if fmt is None and raw.row is not None:   # the first readable row came after the read-ahead
            fmt = _detect([raw.row], raw.file, data.fields)
        summary.formats_by_file[raw.file] = fmt
        if raw.blank:
            summary.blank_lines += 1
            continue
        summary.rows_in += 1
        error = raw.error
        if error is None:
            try:
                messages = to_messages(raw.row, fmt, data.fields)
                messages = clean_messages(messages, clean.min_chars, clean.max_chars, clean.require_assistant_last)
            except RowError as exc:
                error = exc
        if error is not None:
            summary.rejected += 1
            summary.rejected_by_reason[error.kind] += 1
            yield False, rejection_row(raw, error)
            continue
        summary.kept += 1
        source = {"file": raw.file, "line": raw.line}
        yield True, make_record(messages, source, kept_columns(raw.row, data.keep_columns))


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


def _chain(head, rest):
    yield from head
    yield from rest
