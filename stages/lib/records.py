"""The canonical record every stage after `clean` reads and writes.

    {"id": "…", "messages": [{"role": "system|user|assistant", "content": "…"}],
     "source": {"file": "…", "line": 17}, "meta": {}}
"""
from __future__ import annotations

import hashlib
import json

import orjson

ROLES = ("system", "user", "assistant")


def record_id(messages: list[dict]) -> str:
    """Derived from content only, so appending rows never changes an old record's id (or split).

    The hash of json.dumps([[role, content], ...], ensure_ascii=False, separators=(",", ":")),
    made by orjson when it can: for lists of strings its bytes are the same (tests/test_records.py)."""
    pairs = [[m["role"], m["content"]] for m in messages]
    try:
        canonical = orjson.dumps(pairs)
    except TypeError:   # a lone surrogate: json decides, as before
        canonical = json.dumps(pairs, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(canonical).hexdigest()[:16]


def make_record(messages: list[dict], source: dict, meta: dict | None = None) -> dict:
    return {"id": record_id(messages), "messages": messages, "source": source, "meta": meta or {}}


def conversation_text(record: dict) -> str:
    """All turns' text, one per line, roles included (what exact/near dedup compare)."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in record["messages"])


def prompt_messages(record: dict) -> list[dict]:
    """Messages before the final assistant turn: what the model is given at evaluation."""
    messages = record["messages"]
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1]
    return messages


def reference_answer(record: dict) -> str:
    """The final assistant turn: what the model should produce."""
    messages = record["messages"]
    return messages[-1]["content"] if messages and messages[-1]["role"] == "assistant" else ""


def turns_text(record: dict, role: str) -> str:
    return "\n".join(m["content"] for m in record["messages"] if m["role"] == role)
