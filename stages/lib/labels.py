"""Per-label analysis of classification-like JSON fields (scikit-learn).

field_accuracy says how often a field is right; a reviewer also needs to know which labels the
model confuses ("category": "api" where "api" is a product). For every configured JSON field whose
values are labels (the schema gives an `enum`, or the references hold few distinct strings), this
module computes precision, recall and F1 per label and the rows of a confusion matrix.

An output that is not a JSON object, or lacks the field, or holds something that is not a label,
is predicted as NO_ANSWER: it counts against recall of the true label and is a column of the
confusion matrix, never silently dropped.
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from stages.lib.metrics import NDIGITS, collapse_whitespace, parse_json_output

NO_ANSWER = "(no answer)"
MAX_LABELS = 30  # a field with more distinct reference values is free text, not a label


def _label(value: Any) -> str | None:
    if isinstance(value, str):
        return collapse_whitespace(value)
    if isinstance(value, bool) or isinstance(value, int):
        return json.dumps(value)
    return None


def _enum(schema: Mapping[str, Any] | None, field: str) -> list[str]:
    prop = ((schema or {}).get("properties") or {}).get(field) or {}
    values = prop.get("enum") if isinstance(prop, Mapping) else None
    return [lab for lab in (_label(v) for v in values or []) if lab is not None]


def label_columns(preds: Sequence[str], refs: Sequence[str], fields: Sequence[str],
                  schema: Mapping[str, Any] | None = None) -> dict[str, dict[str, list[str]]]:
    """For each classification-like field: {"actual": [...], "predicted": [...], "labels": [...]}.

    Rows whose reference has no label for the field are left out. `labels` lists the schema's
    enum first (so a label the model never produced still gets a row), then any other reference
    or predicted label, then NO_ANSWER when it occurs.
    """
    parsed = [parse_json_output(p) for p in preds]
    ref_parsed = [parse_json_output(r) for r in refs]
    result = {}
    for field in fields:
        actual, predicted = [], []
        for obj, ref in zip(parsed, ref_parsed):
            truth = _label(ref.get(field)) if ref is not None else None
            if truth is None:
                continue
            guess = _label(obj.get(field)) if obj is not None and field in obj else None
            actual.append(truth)
            predicted.append(guess if guess is not None else NO_ANSWER)
        enum = _enum(schema, field)
        if not actual or (not enum and len(set(actual)) > MAX_LABELS):
            continue
        seen = sorted((set(actual) | set(predicted)) - {NO_ANSWER} - set(enum))
        labels = enum + seen + ([NO_ANSWER] if NO_ANSWER in predicted else [])
        result[field] = {"actual": actual, "predicted": predicted, "labels": labels}
    return result


def per_label(actual: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Precision, recall, F1 and support per label, plus accuracy and macro F1 over the labels
    that occur in the references (NO_ANSWER is never a true label, so it has no row)."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    true_labels = [lab for lab in labels if lab != NO_ANSWER]
    precision, recall, f1, support = precision_recall_fscore_support(
        actual, predicted, labels=true_labels, zero_division=0)
    rows = {lab: {"precision": round(float(p), NDIGITS), "recall": round(float(r), NDIGITS),
                  "f1": round(float(f), NDIGITS), "support": int(s)}
            for lab, p, r, f, s in zip(true_labels, precision, recall, f1, support)}
    occurring = [lab for lab in true_labels if rows[lab]["support"] > 0]
    macro = sum(rows[lab]["f1"] for lab in occurring) / len(occurring) if occurring else 0.0
    return {"accuracy": round(float(accuracy_score(actual, predicted)), NDIGITS),
            "macro_f1": round(macro, NDIGITS), "n": len(actual),
            "no_answer": sum(p == NO_ANSWER for p in predicted), "labels": rows}


def confusion(actual: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> list[list[int]]:
    """Confusion matrix, rows = actual label, columns = predicted label, both in `labels` order."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(actual, predicted, labels=list(labels)).tolist()


def label_report(preds: Sequence[str], refs: Sequence[str], fields: Sequence[str],
                 schema: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """{field: per_label(...) + "confusion": {"labels", "matrix"}} for every classification-like field."""
    report = {}
    for field, columns in label_columns(preds, refs, fields, schema).items():
        entry = per_label(columns["actual"], columns["predicted"], columns["labels"])
        entry["confusion"] = {"labels": columns["labels"],
                              "matrix": confusion(columns["actual"], columns["predicted"], columns["labels"])}
        report[field] = entry
    return report


def confusion_plot_rows(preds: Sequence[str], refs: Sequence[str], field: str,
                        schema: Mapping[str, Any] | None = None) -> list[dict[str, str]]:
    """[{"actual", "predicted"}] per scored row: the data of DVC's `confusion` plot template."""
    columns = label_columns(preds, refs, [field], schema).get(field)
    if columns is None:
        return []
    return [{"actual": a, "predicted": p} for a, p in zip(columns["actual"], columns["predicted"])]
