"""What a change did to the data: rows added, removed, changed and moved per split, by record id,
and the clean/dedup reasons counted on both sides. Pure functions over JSONL lines, so the PR
report can feed them the base revision's files (through dvc.api) and the workspace's alike.

A record's id is derived from its content, so an edited row shows up as one id removed and one
added; "changed" is the same id with other bytes (its source line or meta moved). "Moved" rows
left one split for another: with a seeded group hash that only happens when the split params or
the groups (near-duplicate clusters) changed.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any, Iterable, Mapping

from stages.lib.io import fast_json_loads, parse_jsonl_lines

SPLITS = ("train", "validation", "test")
PREVIEW_CHARS = 80


def _preview(record: Mapping[str, Any]) -> str:
    messages = record.get("messages") or []
    users = [m.get("content", "") for m in messages if isinstance(m, Mapping) and m.get("role") == "user"]
    text = " ".join((users[0] if users else "").split())
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "…"


def index_records(lines: Iterable[bytes]) -> dict[str, tuple[str, str]]:
    """{id: (hash of the line, preview of its first user turn)} for a JSONL file of records."""
    index = {}
    for line in lines:
        line = line.strip()
        if not line:
            continue
        record = fast_json_loads(line)
        index[str(record["id"])] = (hashlib.blake2b(line, digest_size=12).hexdigest(), _preview(record))
    return index


def diff_splits(old: Mapping[str, Mapping[str, tuple[str, str]]],
                new: Mapping[str, Mapping[str, tuple[str, str]]], examples: int = 3) -> list[dict[str, Any]]:
    """Per split: counts before/after, added, removed, changed, moved in/out, and a few examples.

    `old`/`new` map a split name to index_records(...) of that split's file; a split missing on
    one side counts as empty there.
    """
    where_old = {rid: split for split, rows in old.items() for rid in rows}
    where_new = {rid: split for split, rows in new.items() for rid in rows}
    result = []
    for split in [s for s in SPLITS if s in old or s in new] + sorted((set(old) | set(new)) - set(SPLITS)):
        before, after = old.get(split) or {}, new.get(split) or {}
        added = sorted(set(after) - set(before))
        removed = sorted(set(before) - set(after))
        changed = sorted(rid for rid in set(before) & set(after) if before[rid][0] != after[rid][0])
        moved_in = [rid for rid in added if rid in where_old]
        moved_out = [rid for rid in removed if rid in where_new]
        samples = ([("added", rid, after[rid][1], where_old.get(rid)) for rid in added[:examples]]
                   + [("removed", rid, before[rid][1], where_new.get(rid)) for rid in removed[:examples]]
                   + [("changed", rid, after[rid][1], None) for rid in changed[:examples]])
        result.append({"split": split, "before": len(before), "after": len(after), "added": len(added),
                       "removed": len(removed), "changed": len(changed), "moved_in": len(moved_in),
                       "moved_out": len(moved_out),
                       "examples": [{"change": change, "id": rid, "preview": preview, "other_split": other}
                                    for change, rid, preview, other in samples]})
    return result


def reason_counts(lines: Iterable[bytes], key: str = "kind") -> Counter:
    """How many rows of a rejected/removed JSONL file carry each reason (its `key` field)."""
    return Counter(str(row.get(key, "?")) for row in parse_jsonl_lines(lines))


def diff_reasons(old: Counter | None, new: Counter | None) -> list[dict[str, Any]]:
    """[{reason, before, after, change}] for every reason on either side, largest change first."""
    old, new = old or Counter(), new or Counter()
    rows = [{"reason": r, "before": old.get(r, 0), "after": new.get(r, 0), "change": new.get(r, 0) - old.get(r, 0)}
            for r in set(old) | set(new)]
    rows.sort(key=lambda r: (-abs(r["change"]), r["reason"]))
    return rows


def has_changes(splits: list[dict[str, Any]], reasons: Mapping[str, list[dict[str, Any]]]) -> bool:
    return (any(s["added"] or s["removed"] or s["changed"] for s in splits)
            or any(r["change"] for rows in reasons.values() for r in rows))
