import hashlib
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from stages.lib.records import conversation_text, make_record, record_id


def _reference_id(messages):
    # The definition of a record id: what every earlier version of the pipeline computed.
    canonical = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]), st.text()), min_size=1, max_size=4))
def test_record_id_is_the_documented_hash(turns):
    messages = [{"role": role, "content": content} for role, content in turns]
    assert record_id(messages) == _reference_id(messages)


def test_record_id_of_control_characters_quotes_and_non_ascii():
    messages = [{"role": "user", "content": 'a "b" \\ \t\n\x01 \u2028 é 漢字 \x7f'},
                {"role": "assistant", "content": "{\"k\": 1}"}]
    assert record_id(messages) == _reference_id(messages)


def test_record_id_depends_on_content_only():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    a = make_record(messages, {"file": "a.jsonl", "line": 1})
    b = make_record([dict(m) for m in messages], {"file": "b.jsonl", "line": 99}, {"x": 1})
    assert a["id"] == b["id"]
    assert conversation_text(a) == "user: hi\nassistant: hello"
