"""Evaluation of one model on the test split and the probe set, and the base vs tuned report.

The evaluate stages (stages/evaluate.py) read the inputs and write the outputs; what is measured
and how is here: per-row scores from greedy generations, the reference-answer loss and the probe
text, the metrics with their intervals (stages/lib/uncertainty.py), the base vs tuned report and
the per-label analysis.
"""
from __future__ import annotations

import math
from collections import Counter

LOSS_MAX_TOKENS = 4096  # truncation for the reference-answer loss; long enough for any sample row


class EvalError(RuntimeError):
    pass


def check_references(test: list[dict], source: str) -> list[str]:
    """Every test row must end with the answer it is scored against; a row without one would
    score 0 on every metric and pull the averages down without a word."""
    from stages.lib.records import reference_answer

    missing = [r.get("id", "?") for r in test if not reference_answer(r).strip()]
    if missing:
        raise EvalError(f"{len(missing)} of {len(test)} test rows have no reference answer (no final assistant "
                        f"turn), e.g. {', '.join(missing[:3])}: with clean.require_assistant_last: true the clean "
                        f"stage rejects such rows; re-run `dvc repro` or fix {source}")
    return [reference_answer(r) for r in test]


def check_sizes(settings, model, tokenizer, test: list[dict]) -> None:
    """max_new_tokens within the model's positions; a batch whose output fits in memory."""
    import torch

    from stages.lib.chat import render_conversation
    from stages.lib.limits import available_memory_bytes, check_batch_memory, check_new_tokens, context_length

    context = context_length(model)
    check_new_tokens(settings.max_new_tokens, context, "evaluate.max_new_tokens")
    # Rendered as training renders it (a template without a system role gets it folded in).
    longest = max(len(tokenizer(render_conversation(tokenizer, r["messages"]),
                                add_special_tokens=False)["input_ids"]) for r in test)
    length = min(longest, context or longest, LOSS_MAX_TOKENS)  # what the loss pass reads at most
    check_batch_memory(rows=min(settings.batch_size, len(test)), length=length,
                       vocab_size=getattr(model.config, "vocab_size", 0),
                       available=available_memory_bytes(torch.cuda.is_available()), key="evaluate.batch_size",
                       advice="lower evaluate.batch_size")


def evaluate_model(params, test: list[dict], references: list[str], probes: list[dict], probe_text: str,
                   adapter_dir=None) -> tuple[dict, list[dict], list[dict]]:
    """Generate and score one model (the base, plus the adapter in `adapter_dir` when given);
    return (per-row scores, prediction rows, probe rows).

    The scores ({"test", "probes", "text"}: one dict per test row, probe and probe-text block) are
    what every metric and its interval is computed from (stages/lib/uncertainty.py)."""
    from stages.lib.generation import answer_loss_rows, generate, load_for_inference, text_nll_blocks
    from stages.lib.metrics import probe_row_scores, row_scores
    from stages.lib.records import prompt_messages

    settings = params.evaluate
    which = "base" if adapter_dir is None else "tuned"
    model, tokenizer = load_for_inference(params, adapter_dir)
    check_sizes(settings, model, tokenizer, test)
    predictions = generate(model, tokenizer, [prompt_messages(r) for r in test],
                           max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size,
                           desc=f"{which}: test split")
    probe_outputs = generate(model, tokenizer, [[{"role": "user", "content": p["prompt"]}] for p in probes],
                             max_new_tokens=min(settings.max_new_tokens, 48),
                             batch_size=settings.batch_size, desc=f"{which}: general probes")
    losses = answer_loss_rows(model, tokenizer, [r["messages"] for r in test],
                              max_length=LOSS_MAX_TOKENS, batch_size=settings.batch_size)
    test_scores = row_scores(predictions, references, settings, ids=[r["id"] for r in test])
    for row, (loss_sum, loss_tokens) in zip(test_scores, losses):
        row["loss_sum"], row["loss_tokens"] = loss_sum, loss_tokens
    scores = {"test": test_scores, "probes": probe_row_scores(probe_outputs, probes),
              "text": text_nll_blocks(model, tokenizer, probe_text) if probe_text else []}
    rows = [{"id": r["id"], "prompt": prompt_messages(r), "reference": ref, "prediction": pred}
            for r, ref, pred in zip(test, references, predictions)]
    probe_rows = [{"id": p["id"], "prompt": p["prompt"], "output": out} for p, out in zip(probes, probe_outputs)]
    return scores, rows, probe_rows


def finite_metrics(metrics: dict, scores: dict | None = None) -> tuple[dict, dict]:
    """A model whose outputs are not numbers (NaN weights) gives NaN losses. The per-row scores
    keep them out of every metric (a metric of NaN rows is not computed); the metrics say why
    under "non_finite", and no JSON file ever holds NaN. Returns (metrics, reasons)."""
    from stages.lib.io import nonfinite_json_values

    metrics, found = nonfinite_json_values(metrics)
    reasons = {k: f"{v}: not a finite number, written as null" for k, v in found.items()}
    bad, total = Counter(), Counter()
    for unit, rows in (scores or {}).items():
        for row in rows if isinstance(rows, list) else []:
            for field, value in row.items():
                if isinstance(value, float):
                    total[f"{unit}.{field}"] += 1
                    bad[f"{unit}.{field}"] += not math.isfinite(value)
    for key, count in bad.items():
        if count:
            reasons[key] = (f"{count} of {total[key]} rows not finite (NaN or infinity): the metrics computed "
                            "from it are left out")
    if reasons:
        metrics["non_finite"] = reasons
    return metrics, reasons


def eval_report(base_scores: dict, tuned_scores: dict) -> dict:
    """The reports/eval.json layout: base, tuned and delta (tuned − base), every metric
    {"value", "lower", "upper"}; n (rows per unit) and the interval settings."""
    from stages.lib.uncertainty import CONFIDENCE, RESAMPLES, SEED, compare_scores

    compared = compare_scores(base_scores, tuned_scores)
    n = {("text_blocks" if unit == "text" else unit): count for unit, count in compared["n"].items()}
    return {"base": compared["old"], "tuned": compared["new"], "delta": compared["delta"], "n": n,
            "interval": {"confidence": CONFIDENCE, "resamples": RESAMPLES, "seed": SEED}}


def side_by_side(rows: list[dict], base_rows: list[dict]) -> list[dict]:
    """The tuned model's prediction rows with the base model's answer to the same test row."""
    base = {r["id"]: r for r in base_rows}
    return [{"id": r["id"], "prompt": r["prompt"], "reference": r["reference"],
             "base": base.get(r["id"], {}).get("prediction", ""), "tuned": r["prediction"]} for r in rows]


def label_analysis(settings, pairs: list[dict]) -> tuple[dict, dict]:
    """Per-label precision/recall/F1 of both models ({"base", "tuned"}) and the tuned model's
    confusion-matrix plot rows per classification-like field ({field: rows})."""
    from stages.lib.labels import confusion_plot_rows, label_report

    refs = [r["reference"] for r in pairs]
    report = {model: label_report([r[model] for r in pairs], refs, settings.json_fields, settings.json_schema)
              for model in ("base", "tuned")}
    confusion = {field: confusion_plot_rows([r["tuned"] for r in pairs], refs, field, settings.json_schema)
                 for field in report["tuned"]}
    return report, confusion


def summary_line(metrics: dict) -> str:
    """`metric=value [lower, upper]` for every metric with an interval, for the stage's last line."""
    return ", ".join(f"{k}={v['value']:.3f} [{v['lower']:.3f}, {v['upper']:.3f}]"
                     for k, v in metrics.items() if isinstance(v, dict)
                     and all(isinstance(v.get(b), (int, float)) for b in ("value", "lower", "upper")))
