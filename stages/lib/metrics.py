"""Scoring for the evaluate stage: pure functions from strings to numbers.

Every function takes predictions and references as lists of strings (the model's raw output and
the reference answer) and returns a share in 0..1, or None when there is nothing to score (no
rows, or the metric is not configured): a missing number is honest, a made-up 0 or 1 is not.
Malformed or empty outputs count as wrong; they never raise.

Heavy imports (rouge_score, sacrebleu, jsonschema) live inside the functions so that importing
this module, e.g. for a params check, costs nothing.
"""
from __future__ import annotations

import json
import math
import re
import unicodedata
from decimal import Decimal, InvalidOperation
from typing import Any, Iterable, Mapping, Sequence

NDIGITS = 4  # floats in reports are rounded to this many decimals: stable diffs, no float noise

# Metrics that are shares (0..1, higher or lower is better but always on that scale). Only these
# go into the bar plot; loss and perplexity live on other scales.
SHARE_METRICS = ("exact_match", "rouge_l", "chrf", "json_valid", "schema_valid",
                 "field_accuracy_mean", "general_accuracy", "empty_output_rate")
LOWER_IS_BETTER = ("loss", "perplexity", "general_perplexity", "empty_output_rate")


# --- text normalisation and answer extraction ------------------------------------------------

def collapse_whitespace(text: str | None) -> str:
    """Strip and collapse every run of whitespace to one space; None becomes "" (answers compare
    equal regardless of spacing; `text.normalize_text` is the stored-text normalisation)."""
    return " ".join((text or "").split())


_NUMBER = re.compile(r"[-+]?[\d,]*\.?\d*\.?")


def _normalize_number(text: str) -> str:
    # "1,234." -> "1234"; "18.00" -> "18"; "0.50" -> "0.5": the same quantity, the same string.
    stripped = text.replace(",", "").rstrip(".")
    try:
        value = Decimal(stripped)
    except InvalidOperation:
        return stripped
    if not value.is_finite():
        return stripped
    if value == value.to_integral_value():
        return str(value.quantize(Decimal(1)))
    return format(value.normalize(), "f")


# evaluate.extract runs on model output, which can be anything: a pattern that backtracks
# exponentially on some output would hang the stage. The `regex` engine cuts off the classic
# nested-quantifier cases itself (measured: "(a+)+$" on 40 a's, 0.6 ms) and takes a time limit for
# the rest; past it the stage stops with a message naming the parameter.
EXTRACT_TIMEOUT_S = 1.0


class ExtractTimeout(ValueError):
    """evaluate.extract took longer than EXTRACT_TIMEOUT_S on one text."""


def compile_extract(pattern):
    """evaluate.extract compiled by the `regex` engine (a pattern already compiled by it is kept;
    one compiled by Python's re is recompiled, since re has no time limit)."""
    import regex

    if isinstance(pattern, regex.Pattern):
        return pattern
    return regex.compile(pattern.pattern if isinstance(pattern, re.Pattern) else pattern)


def extract_answer(text: str | None, pattern) -> str | None:
    """The first group of the first match of `pattern` in `text`, normalised; None if no match.

    Numbers lose thousands separators and a trailing full stop, and equal quantities compare
    equal ("1,234." -> "1234", "18.00" -> "18"); anything else is whitespace-normalised.
    Applied to predictions and references alike. Raises ExtractTimeout past EXTRACT_TIMEOUT_S.
    """
    if not text:
        return None
    compiled = compile_extract(pattern)
    try:
        match = compiled.search(text, timeout=EXTRACT_TIMEOUT_S)
    except TimeoutError:
        raise ExtractTimeout(f"evaluate.extract: {compiled.pattern!r} ran for more than {EXTRACT_TIMEOUT_S:g} s "
                             f"on one {len(text)}-character text (exponential backtracking, e.g. "
                             "alternatives that overlap under a repeat such as (a|aa)+); simplify it") from None
    if match is None or match.group(1) is None:
        return None
    answer = collapse_whitespace(match.group(1))
    if answer and _NUMBER.fullmatch(answer) and any(ch.isdigit() for ch in answer):
        return _normalize_number(answer)
    return answer or None


# --- JSON -------------------------------------------------------------------------------------

def _reject_constant(name: str):
    # json.loads accepts NaN/Infinity, which are not JSON: a consumer's strict parser would fail.
    raise ValueError(f"{name} is not valid JSON")


def _loads_strict(text: str) -> Any:
    return json.loads(text, parse_constant=_reject_constant)


def parse_json_output(text: str | None) -> dict | None:
    """The output as a JSON object, or None: the whole output, stripped, must be one JSON object.

    Strict on purpose. `json_valid` measures format adherence: whether a program could take the
    output as it is and `json.loads` it. Fishing an object out of a ```json fence or out of
    surrounding prose would credit the base model for chatty answers that a real consumer would
    reject, and hide exactly the difference fine-tuning is meant to make. (Arrays, strings and
    numbers are valid JSON but not a record of fields, so they do not count either.)
    """
    if not text:
        return None
    try:
        obj = _loads_strict(text.strip())
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def _canonical(obj: Any) -> str:
    # Key order and spacing do not matter; types do (true != 1, "1" != 1).
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _as_json_structure(text: str) -> Any:
    try:
        obj = _loads_strict(text.strip())
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, (dict, list)) else None


# --- exact match, ROUGE-L, chrF -----------------------------------------------------------------

def _check_lengths(preds: Sequence, refs: Sequence) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")


def is_exact_match(pred: str | None, ref: str | None, extract=None) -> bool:
    """One row of `exact_match` (the samples report marks rows with it)."""
    if extract is not None:
        # The reference first and always: a pattern that cannot cope with the data fails on the
        # first run, not only once a prediction happens to match.
        wanted = extract_answer(ref, extract)
        answer = extract_answer(pred, extract)
        return answer is not None and answer == wanted
    pred, ref = pred or "", ref or ""
    pred_obj, ref_obj = _as_json_structure(pred), _as_json_structure(ref)
    if pred_obj is not None and ref_obj is not None:
        return _canonical(pred_obj) == _canonical(ref_obj)
    return collapse_whitespace(pred) == collapse_whitespace(ref)


def exact_match(preds: Sequence[str], refs: Sequence[str],
                extract=None) -> float | None:
    """Share of rows whose prediction equals the reference.

    Without `extract`: after stripping and collapsing whitespace (case-sensitive: a label with
    the wrong case is a wrong label for a program that consumes it); when both sides parse as
    JSON objects/arrays, the parsed values are compared, so key order and spacing do not matter.
    With `extract` (a regex whose first group is the answer), the extracted answers are compared;
    a row where the prediction or the reference has no match counts as wrong.
    """
    _check_lengths(preds, refs)
    if not preds:
        return None
    if extract is None:
        return sum(is_exact_match(p, r) for p, r in zip(preds, refs)) / len(preds)
    # Every text goes through the pattern (references too, even where the prediction has no
    # match), so a pattern that cannot cope with this data fails on the first run, not later.
    compiled = compile_extract(extract) if isinstance(extract, str) else extract
    wanted = [extract_answer(r, compiled) for r in refs]
    got = [extract_answer(p, compiled) for p in preds]
    return sum(a is not None and a == b for a, b in zip(got, wanted)) / len(preds)


# Han, kana and other scripts written without spaces: each character is a token, as in
# multilingual ROUGE implementations; otherwise a whole Chinese sentence would be one "word".
_CJK = "\u3040-\u30ff\u3100-\u312f\u31a0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+", re.UNICODE)


def rouge_tokenize(text: str) -> list[str]:
    """Lower-cased unicode words (CJK per character) plus emoji and other symbols.

    rouge_score's default tokenizer keeps only [a-z0-9] and silently drops everything else:
    "café" becomes "caf" and Chinese text scores nothing at all.
    """
    text = unicodedata.normalize("NFKC", text or "").casefold()
    tokens = []
    position = 0
    for match in _TOKEN.finditer(text):
        # Symbols between words (emoji, ©, ...) are content; punctuation is not (as in rouge_score).
        tokens += [ch for ch in text[position:match.start()] if unicodedata.category(ch) == "So"]
        tokens.append(match.group())
        position = match.end()
    tokens += [ch for ch in text[position:] if unicodedata.category(ch) == "So"]
    return tokens


class _UnicodeTokenizer:
    def tokenize(self, text: str) -> list[str]:
        return rouge_tokenize(text)


def rouge_l(preds: Sequence[str], refs: Sequence[str]) -> float | None:
    """Mean ROUGE-L F1 over rows (rouge_score, unicode-aware tokenizer, no stemming).

    A row where both sides have no tokens scores 1 (nothing was asked, nothing was said); one
    empty side scores 0.
    """
    from rouge_score import rouge_scorer

    _check_lengths(preds, refs)
    if not preds:
        return None
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_UnicodeTokenizer())
    total = 0.0
    for pred, ref in zip(preds, refs):
        if not rouge_tokenize(pred) and not rouge_tokenize(ref):
            total += 1.0
        else:
            total += scorer.score(ref or "", pred or "")["rougeL"].fmeasure
    return total / len(preds)


def chrf(preds: Sequence[str], refs: Sequence[str]) -> float | None:
    """sacrebleu's corpus-level chrF (character 6-grams, beta 2), on a 0..1 scale."""
    import sacrebleu

    _check_lengths(preds, refs)
    if not preds:
        return None
    score = sacrebleu.corpus_chrf([p or "" for p in preds], [[r or "" for r in refs]])
    return score.score / 100.0


def empty_output_rate(preds: Sequence[str]) -> float | None:
    """Share of outputs that are empty or whitespace only."""
    if not preds:
        return None
    return sum(not (p or "").strip() for p in preds) / len(preds)


# --- format adherence -------------------------------------------------------------------------

class SchemaError(ValueError):
    """evaluate.json_schema is not a valid JSON Schema."""


def schema_validator(schema: Mapping[str, Any]):
    """A Draft 2020-12 validator for `schema`; SchemaError naming the problem if it is invalid."""
    import jsonschema

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise SchemaError(f"evaluate.json_schema is not a valid JSON Schema (Draft 2020-12) at "
                          f"{where}: {exc.message}") from None
    return jsonschema.Draft202012Validator(schema)


def _field_equal(pred_value: Any, ref_value: Any) -> bool:
    if isinstance(pred_value, str) and isinstance(ref_value, str):
        return collapse_whitespace(pred_value) == collapse_whitespace(ref_value)
    return _canonical(pred_value) == _canonical(ref_value)


def json_metrics(preds: Sequence[str], refs: Sequence[str], schema: Mapping[str, Any] | None = None,
                 fields: Iterable[str] = ()) -> dict[str, Any]:
    """Format adherence of the outputs.

    json_valid: share of outputs that are, as a whole, one JSON object (see parse_json_output).
    schema_valid: share of outputs that are valid JSON *and* validate against `schema`
        (None without a schema).
    field_accuracy[f]: among rows whose reference is a JSON object with field f, the share whose
        output is a JSON object with an equal value for f (strings compared after whitespace
        normalisation, case-sensitive; other values compared as JSON). None if no reference has f.
    field_accuracy_mean: the mean of the fields that have a value (None without fields).
    """
    _check_lengths(preds, refs)
    fields = list(fields)
    validator = schema_validator(schema) if schema is not None else None
    if not preds:
        return {"json_valid": None, "schema_valid": None,
                "field_accuracy": {f: None for f in fields}, "field_accuracy_mean": None}

    parsed = [parse_json_output(p) for p in preds]
    ref_parsed = [parse_json_output(r) for r in refs]
    json_valid = sum(obj is not None for obj in parsed) / len(preds)

    schema_valid = None
    if validator is not None:
        schema_valid = sum(obj is not None and validator.is_valid(obj) for obj in parsed) / len(preds)

    field_accuracy: dict[str, float | None] = {}
    for field in fields:
        scored = correct = 0
        for obj, ref in zip(parsed, ref_parsed):
            if ref is None or field not in ref:
                continue
            scored += 1
            correct += obj is not None and field in obj and _field_equal(obj[field], ref[field])
        field_accuracy[field] = correct / scored if scored else None
    present = [v for v in field_accuracy.values() if v is not None]
    return {"json_valid": json_valid, "schema_valid": schema_valid, "field_accuracy": field_accuracy,
            "field_accuracy_mean": sum(present) / len(present) if present else None}


# --- general-capability probes ----------------------------------------------------------------

def _fold(text: str) -> str:
    # NFKC: full-width digits and composed/decomposed accents compare equal; casefold: "ß" ~ "SS".
    return unicodedata.normalize("NFKC", text).casefold()


def probe_passes(output: str | None, accept: Iterable[str]) -> bool:
    """True if any accepted answer occurs in `output` as a whole word, case-insensitively."""
    text = _fold(output or "")
    for answer in accept:
        answer = _fold(str(answer)).strip()
        if answer and re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", text):
            return True
    return False


def probe_accuracy(outputs: Sequence[str] | Mapping[str, str], probes: Sequence[Mapping]) -> float | None:
    """Share of probes ({"id", "prompt", "accept": [...]}) whose output contains an accepted answer.

    `outputs` is a list aligned with `probes`, or a mapping from probe id to output (a probe
    without an output fails).
    """
    if not probes:
        return None
    if isinstance(outputs, Mapping):
        texts = [outputs.get(p["id"]) for p in probes]
    else:
        _check_lengths(outputs, probes)
        texts = list(outputs)
    return sum(probe_passes(t, p["accept"]) for t, p in zip(texts, probes)) / len(probes)


# --- putting it together ------------------------------------------------------------------------

def _param(params: Any, name: str, default: Any = None) -> Any:
    if isinstance(params, Mapping):
        return params.get(name, default)
    return getattr(params, name, default)


def round_metrics(metrics: Any, ndigits: int = NDIGITS) -> Any:
    """Round floats (recursively); NaN and infinity become None (they are not valid JSON)."""
    if isinstance(metrics, Mapping):
        return {k: round_metrics(v, ndigits) for k, v in metrics.items()}
    if isinstance(metrics, bool) or not isinstance(metrics, float):
        return metrics
    return round(metrics, ndigits) if math.isfinite(metrics) else None


def task_metrics(preds: Sequence[str], refs: Sequence[str], params_evaluate: Any, *,
                 probe_outputs: Sequence[str] | Mapping[str, str] | None = None,
                 probes: Sequence[Mapping] | None = None) -> dict[str, Any]:
    """The task metrics of one model, flat, rounded; None for what is not configured.

    `params_evaluate` is EvaluateParams (or a mapping with the same keys): `extract` switches
    exact match to extracted answers; `json_schema` / `json_fields` switch on the JSON metrics.
    Loss and perplexities come from the model and are merged in by the caller.
    """
    extract = _param(params_evaluate, "extract")
    schema = _param(params_evaluate, "json_schema")
    fields = list(_param(params_evaluate, "json_fields", []) or [])
    result: dict[str, Any] = {
        "exact_match": exact_match(preds, refs, extract),
        "rouge_l": rouge_l(preds, refs),
        "chrf": chrf(preds, refs),
        "empty_output_rate": empty_output_rate(preds),
        "json_valid": None,
        "schema_valid": None,
        "field_accuracy": None,
        "field_accuracy_mean": None,
    }
    if schema is not None or fields:
        result.update(json_metrics(preds, refs, schema, fields))
        if not fields:
            result["field_accuracy"] = None
    if probes is not None and probe_outputs is not None:
        result["general_accuracy"] = probe_accuracy(probe_outputs, probes)
    return round_metrics(result)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _drop_none(metrics: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            value = _drop_none(value)
            if not value:
                continue
        if value is not None:
            out[key] = value
    return out


def _delta(base: Mapping[str, Any], tuned: Mapping[str, Any]) -> dict[str, Any]:
    delta = {}
    for key, tuned_value in tuned.items():
        base_value = base.get(key)
        if isinstance(tuned_value, Mapping) and isinstance(base_value, Mapping):
            nested = _delta(base_value, tuned_value)
            if nested:
                delta[key] = nested
        elif _is_number(tuned_value) and _is_number(base_value):
            delta[key] = round(tuned_value - base_value, NDIGITS)
    return delta


def compare(base: Mapping[str, Any], tuned: Mapping[str, Any],
            n: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The reports/eval.json layout: {"base": {...}, "tuned": {...}, "delta": {...}[, "n": {...}]}.

    Metrics that are None (not configured, or not finite) are left out, so `dvc metrics diff`
    shows only real numbers; a delta exists only where both sides are numbers (nested dicts such
    as field_accuracy are followed). Values are rounded to NDIGITS decimals.
    """
    base, tuned = _drop_none(round_metrics(base)), _drop_none(round_metrics(tuned))
    report: dict[str, Any] = {"base": base, "tuned": tuned, "delta": _delta(base, tuned)}
    if n is not None:
        report["n"] = dict(n)
    return report


def flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: the dotted names gates and `dvc metrics diff` use."""
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


# --- per-row results: what the intervals are computed from ----------------------------------------

def chrf_row_stats(preds: Sequence[str], refs: Sequence[str]) -> list[list[int]]:
    """sacrebleu's per-row chrF statistics (character/word n-gram counts and matches).

    Corpus chrF is a function of these statistics summed over rows, so it can be recomputed on any
    resample of rows without re-reading the text (sacrebleu's own significance tests do the same).
    """
    from sacrebleu.metrics.chrf import CHRF

    _check_lengths(preds, refs)
    if not preds:
        return []
    metric = CHRF()
    stats = metric._extract_corpus_statistics([p or "" for p in preds], [[r or "" for r in refs]])
    return [[int(x) for x in row] for row in stats]


def chrf_from_stats(summed: Sequence[float]) -> float:
    """Corpus chrF (0..1) from per-row statistics summed over the rows."""
    from sacrebleu.metrics.chrf import CHRF

    return CHRF()._compute_score_from_stats(list(summed)).score / 100.0


def row_scores(preds: Sequence[str], refs: Sequence[str], params_evaluate: Any,
               ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One dict of scores per test row, the unit the intervals resample.

    Keys: id, exact_match / empty_output (0 or 1), rouge_l (0..1), chrf_stats (see
    chrf_row_stats); with JSON configured json_valid (0/1), schema_valid (0/1, with a schema) and
    fields {name: 1 | 0 | None (the reference has no such field)}. Every metric of task_metrics
    is an aggregate of these (stages/lib/uncertainty.py computes them, with intervals).
    """
    from rouge_score import rouge_scorer

    _check_lengths(preds, refs)
    ids = list(ids) if ids is not None else [str(i) for i in range(len(preds))]
    _check_lengths(ids, preds)
    extract = _param(params_evaluate, "extract")
    schema = _param(params_evaluate, "json_schema")
    fields = list(_param(params_evaluate, "json_fields", []) or [])
    validator = schema_validator(schema) if schema is not None else None
    regex = compile_extract(extract) if extract is not None else None
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_UnicodeTokenizer())
    chrf_stats = chrf_row_stats(preds, refs)
    rows = []
    for row_id, pred, ref, stats in zip(ids, preds, refs, chrf_stats):
        if not rouge_tokenize(pred) and not rouge_tokenize(ref):
            rouge = 1.0  # as rouge_l: nothing asked, nothing said
        else:
            rouge = scorer.score(ref or "", pred or "")["rougeL"].fmeasure
        row: dict[str, Any] = {"id": row_id, "exact_match": int(is_exact_match(pred, ref, regex)),
                               "empty_output": int(not (pred or "").strip()), "rouge_l": rouge,
                               "chrf_stats": stats}
        if validator is not None or fields:
            obj, ref_obj = parse_json_output(pred), parse_json_output(ref)
            row["json_valid"] = int(obj is not None)
            if validator is not None:
                row["schema_valid"] = int(obj is not None and validator.is_valid(obj))
            row["fields"] = {
                f: None if ref_obj is None or f not in ref_obj
                else int(obj is not None and f in obj and _field_equal(obj[f], ref_obj[f]))
                for f in fields}
        rows.append(row)
    return rows


def probe_row_scores(outputs: Sequence[str], probes: Sequence[Mapping]) -> list[dict[str, Any]]:
    """{"id", "passed": 0 | 1} per probe (see probe_passes)."""
    _check_lengths(outputs, probes)
    return [{"id": p["id"], "passed": int(probe_passes(o, p["accept"]))} for o, p in zip(outputs, probes)]
