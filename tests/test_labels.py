"""Per-label precision/recall/F1 and confusion matrices of JSON label fields."""
import pytest

from stages.lib.labels import NO_ANSWER, confusion, confusion_plot_rows, label_columns, label_report, per_label

SCHEMA = {"type": "object", "properties": {
    "category": {"type": "string", "enum": ["billing", "bug", "account"]},
    "summary": {"type": "string"}}}
REFS = ['{"category": "billing", "summary": "a"}', '{"category": "bug", "summary": "b"}',
        '{"category": "bug", "summary": "c"}', '{"category": "account", "summary": "d"}',
        '{"summary": "no category"}', "not json"]
PREDS = ['{"category": "billing"}', '{"category": "billing"}', 'Sure! {"category": "bug"}',
         '{"category": "account "}', '{"category": "bug"}', '{"category": "bug"}']


def test_columns_keep_no_answer_and_skip_rows_without_a_reference_label():
    columns = label_columns(PREDS, REFS, ["category"], SCHEMA)["category"]
    assert columns["actual"] == ["billing", "bug", "bug", "account"]
    # Row 3 is not a JSON object as a whole: no answer. "account " is normalised like field_accuracy.
    assert columns["predicted"] == ["billing", "billing", NO_ANSWER, "account"]
    assert columns["labels"] == ["billing", "bug", "account", NO_ANSWER]


def test_per_label_scores_against_hand_counts():
    columns = label_columns(PREDS, REFS, ["category"], SCHEMA)["category"]
    scores = per_label(columns["actual"], columns["predicted"], columns["labels"])
    billing, bug, account = (scores["labels"][k] for k in ("billing", "bug", "account"))
    assert billing == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(0.6667, abs=1e-4), "support": 1}
    assert bug == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert account == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert NO_ANSWER not in scores["labels"]
    assert scores["accuracy"] == 0.5 and scores["no_answer"] == 1 and scores["n"] == 4
    assert scores["macro_f1"] == pytest.approx((0.6667 + 0 + 1) / 3, abs=1e-4)


def test_confusion_matrix_rows_are_actual_columns_predicted():
    columns = label_columns(PREDS, REFS, ["category"], SCHEMA)["category"]
    matrix = confusion(columns["actual"], columns["predicted"], columns["labels"])
    assert matrix == [[1, 0, 0, 0],   # billing -> billing
                      [1, 0, 0, 1],   # bug -> billing, bug -> no answer
                      [0, 0, 1, 0],   # account -> account
                      [0, 0, 0, 0]]   # no answer is never a true label
    assert confusion_plot_rows(PREDS, REFS, "category", SCHEMA)[1] == {"actual": "bug", "predicted": "billing"}


def test_free_text_fields_are_not_label_fields():
    refs = [f'{{"summary": "text {i}"}}' for i in range(40)]
    assert label_columns(refs, refs, ["summary"]) == {}
    report = label_report(PREDS, REFS, ["category", "summary"], SCHEMA)
    assert set(report) == {"category", "summary"}  # 4 distinct summaries: few enough to look like labels
    assert report["category"]["confusion"]["labels"][-1] == NO_ANSWER
