"""Metrics on hand-made predictions: malformed JSON, empty outputs, unicode, extracted answers."""
import json
import math

import pytest

from stages.lib.metrics import (
    SchemaError,
    chrf,
    compare,
    empty_output_rate,
    exact_match,
    extract_answer,
    flatten,
    json_metrics,
    parse_json_output,
    probe_accuracy,
    rouge_l,
    rouge_tokenize,
    round_metrics,
    task_metrics,
)
from stages.lib.params import EvaluateParams

GSM8K = r"####\s*(-?[\d,.]+)"


# --- extraction and exact match ---------------------------------------------------------------

@pytest.mark.parametrize("text, answer", [
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72"),
    ("The total is #### 1,234.", "1234"),
    ("#### -5", "-5"),
    ("#### 18.00", "18"),
    ("#### 0.50", "0.5"),
    ("no marker here: 72", None),
    ("", None),
    (None, None),
])
def test_extract_answer_gsm8k(text, answer):
    assert extract_answer(text, GSM8K) == answer


def test_extract_answer_takes_first_match_and_non_numeric_groups():
    assert extract_answer("#### 3 then #### 4", GSM8K) == "3"
    assert extract_answer("Answer:   Paris \n", r"Answer:\s*(.+)") == "Paris"
    assert extract_answer("x", r"(a)?x") is None  # the group did not take part in the match


def test_exact_match_on_extracted_answers():
    refs = ["She has 5 + 7 = 12.\n#### 12", "#### 1,000", "#### 3", "#### 8"]
    preds = ["Reasoning... #### 12", "so #### 1000.", "I think it's 3", ""]
    # 12 == 12; 1000 == 1,000; no marker in the third; empty fourth.
    assert exact_match(preds, refs, extract=GSM8K) == pytest.approx(0.5)
    # Without extraction the same rows are all wrong.
    assert exact_match(preds, refs) == 0.0


def test_exact_match_normalises_whitespace_and_json():
    preds = ["  Paris \n", "hello   world", '{"b": 2,   "a": 1}', '{"a": true}', "Paris", ""]
    refs = ["Paris", "hello world", '{"a":1,"b":2}', '{"a": 1}', "paris", ""]
    # key order/spacing ignored; true != 1; case counts; empty == empty.
    assert exact_match(preds, refs) == pytest.approx(4 / 6)


def test_exact_match_edge_cases():
    assert exact_match([], []) is None
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        exact_match(["a", "b"], ["a"])


# --- ROUGE-L and chrF -------------------------------------------------------------------------

def test_rouge_tokenizer_keeps_unicode():
    from rouge_score import tokenize

    # The library's default tokenizer drops non-ASCII: this is why we pass our own.
    assert tokenize.tokenize("café 中文", None) == ["caf"]
    assert rouge_tokenize("Café 中文 😀, Hello-World!") == ["café", "中", "文", "😀", "hello", "world"]


def test_rouge_l_values():
    assert rouge_l(["the cat sat"], ["the cat sat"]) == pytest.approx(1.0)
    # LCS 1 of 3 predicted and 2 reference tokens: P 1/3, R 1/2, F 0.4.
    assert rouge_l(["café au lait"], ["café noir"]) == pytest.approx(0.4)
    assert rouge_l(["中文很好"], ["中文不好"]) == pytest.approx(0.75)
    assert rouge_l(["🎉 done"], ["🎉 done"]) == pytest.approx(1.0)
    assert rouge_l(["", "x"], ["", "y"]) == pytest.approx(0.5)  # both empty: 1; disjoint: 0
    assert rouge_l(["something"], [""]) == 0.0
    assert rouge_l([], []) is None


def test_chrf_scale_and_unicode():
    assert chrf(["Größe 中文 😀"], ["Größe 中文 😀"]) == pytest.approx(1.0)
    assert chrf(["abc"], ["xyz"]) == pytest.approx(0.0)
    partial = chrf(["the quick brown fox"], ["the quick brown dog"])
    assert 0.5 < partial < 1.0
    assert chrf(["", ""], ["a", "b"]) == 0.0
    assert chrf([], []) is None


def test_empty_output_rate():
    assert empty_output_rate(["", "  \n", "x", None]) == pytest.approx(0.75)
    assert empty_output_rate([]) is None


# --- JSON ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, ok", [
    ('{"a": 1}', True),
    ('  {"a": 1}\n', True),
    ('{"note": "café 中文 😀"}', True),
    ('```json\n{"a": 1}\n```', False),        # fenced: not what a consumer can parse
    ('Sure! {"a": 1}', False),                # prose around it
    ('{"a": 1', False),                       # truncated
    ("{'a': 1}", False),                      # Python, not JSON
    ('{"a": NaN}', False),                    # not JSON either
    ('[1, 2]', False),                        # valid JSON, but not an object
    ('"text"', False),
    ("", False),
    (None, False),
    ("[" * 100000, False),                    # deep nesting must not crash
])
def test_parse_json_output_is_strict(text, ok):
    assert (parse_json_output(text) is not None) is ok


SCHEMA = {
    "type": "object",
    "required": ["category", "priority"],
    "properties": {"category": {"type": "string"}, "priority": {"enum": ["low", "high"]}},
}


def test_json_metrics_mixed_outputs():
    refs = [json.dumps({"category": "billing", "priority": "high", "note": "é"})] * 5
    preds = [
        '{"priority": "high", "category": "billing"}',   # valid, schema ok, both fields right
        '{"category": "login", "priority": "urgent"}',   # valid, schema fails (enum), both wrong
        '{"category": "billing"',                        # malformed
        "",                                              # empty
        '{"category": "  billing ", "priority": "HIGH"}',  # whitespace ok, case wrong, enum fails
    ]
    result = json_metrics(preds, refs, SCHEMA, ["category", "priority", "missing"])
    assert result["json_valid"] == pytest.approx(3 / 5)
    assert result["schema_valid"] == pytest.approx(1 / 5)
    assert result["field_accuracy"]["category"] == pytest.approx(2 / 5)
    assert result["field_accuracy"]["priority"] == pytest.approx(1 / 5)
    assert result["field_accuracy"]["missing"] is None  # no reference has it: not scored
    assert result["field_accuracy_mean"] == pytest.approx(3 / 10)


def test_json_metrics_without_schema_or_fields():
    result = json_metrics(['{"a": 1}', "nope"], ['{"a": 1}', '{"a": 2}'])
    assert result == {"json_valid": 0.5, "schema_valid": None, "field_accuracy": {},
                      "field_accuracy_mean": None}


def test_field_accuracy_ignores_rows_whose_reference_is_not_json():
    result = json_metrics(['{"a": 1}', '{"a": 1}'], ['{"a": 1}', "plain text"], fields=["a"])
    assert result["field_accuracy"]["a"] == 1.0


def test_bad_schema_is_a_clear_error():
    with pytest.raises(SchemaError, match="evaluate.json_schema is not a valid JSON Schema.*type"):
        json_metrics(['{"a": 1}'], ['{"a": 1}'], {"type": "objekt"})


# --- probes ---------------------------------------------------------------------------------------

PROBES = [
    {"id": "capital", "prompt": "Capital of France?", "accept": ["Paris"]},
    {"id": "math", "prompt": "7 * 6?", "accept": ["42", "forty-two"]},
    {"id": "cafe", "prompt": "French for coffee?", "accept": ["café"]},
    {"id": "zh", "prompt": "Chinese for China?", "accept": ["中国"]},
]


def test_probe_accuracy_whole_words_case_insensitive_unicode():
    outputs = ["The capital is PARIS.", "It is 420.", "Un CAFÉ, s'il vous plaît", "中国"]
    # "420" does not contain the whole word "42".
    assert probe_accuracy(outputs, PROBES) == pytest.approx(3 / 4)
    assert probe_accuracy(["Parisian food", "forty-two!", "cafés", ""], PROBES) == pytest.approx(1 / 4)
    # Decomposed accent (e + combining acute) matches the composed accepted answer.
    assert probe_accuracy({"cafe": "un cafe\u0301"}, PROBES) == pytest.approx(1 / 4)
    assert probe_accuracy([], []) is None


# --- assembling the report ------------------------------------------------------------------------

def test_task_metrics_follows_config():
    refs = ['{"category": "billing"}', '{"category": "login"}']
    preds = ['{"category": "billing"}', "I am not sure."]
    plain = task_metrics(preds, refs, EvaluateParams(json_schema=None, json_fields=[]))
    assert plain["json_valid"] is None and plain["field_accuracy"] is None
    assert plain["exact_match"] == 0.5 and plain["empty_output_rate"] == 0.0

    configured = task_metrics(preds, refs, {"json_schema": {"type": "object"}, "json_fields": ["category"]},
                              probe_outputs=["Paris", "", "", ""], probes=PROBES)
    assert configured["json_valid"] == 0.5 and configured["schema_valid"] == 0.5
    assert configured["field_accuracy"] == {"category": 0.5}
    assert configured["general_accuracy"] == 0.25
    assert all(len(repr(v).split(".")[-1]) <= 4 for v in flatten(configured).values() if isinstance(v, float))


def test_task_metrics_with_extract():
    params = EvaluateParams(extract=GSM8K)
    assert task_metrics(["#### 1,234."], ["… #### 1234"], params)["exact_match"] == 1.0


def test_compare_layout_delta_and_rounding():
    base = {"loss": 2.123456, "json_valid": 0.05, "general_accuracy": 0.8, "schema_valid": None,
            "field_accuracy": {"category": 0.1, "priority": None}, "perplexity": math.inf}
    tuned = {"loss": 1.0, "json_valid": 0.62, "general_accuracy": 0.75, "schema_valid": None,
             "field_accuracy": {"category": 0.9, "priority": 0.5}, "perplexity": 2.7182818}
    report = compare(base, tuned, n={"test": 60, "probes": 20})
    assert set(report) == {"base", "tuned", "delta", "n"}
    assert report["base"]["loss"] == 2.1235
    assert "schema_valid" not in report["tuned"]          # not configured: absent
    assert "perplexity" not in report["base"]             # inf is not JSON: absent
    assert "perplexity" not in report["delta"]            # no delta without both sides
    assert report["delta"]["json_valid"] == 0.57
    assert report["delta"]["general_accuracy"] == -0.05
    assert report["delta"]["field_accuracy"] == {"category": 0.8}
    json.dumps(report, allow_nan=False)  # valid JSON for DVC
    assert flatten(report)["delta.field_accuracy.category"] == 0.8


def test_round_metrics_leaves_ints_and_bools():
    assert round_metrics({"a": 1, "b": True, "c": 0.123456, "d": float("nan")}) == \
        {"a": 1, "b": True, "c": 0.1235, "d": None}
