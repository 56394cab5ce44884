"""Stages `evaluate_base` and `evaluate`: generate on the test split and the probe set, score.

    python -m stages.evaluate --model base    # base model only: cached apart from training
    python -m stages.evaluate --model tuned   # base + adapter, then base vs tuned report and gates

Both load the base model exactly as training did (same quantisation and compute dtype), so the
two differ by the adapter alone.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stages.lib.io import (OutputError, ProbeError, atomic_dir, read_json, read_jsonl, read_probes, write_json,
                           write_jsonl, write_text)
from stages.lib.params import ParamsError, load_params

TEST = Path("data/split/test.jsonl")
ADAPTER = Path("models/adapter")
EVAL_DIR = Path("data/eval")
BASE_REPORT = Path("reports/eval_base.json")
REPORT = Path("reports/eval.json")
PLOT = Path("reports/plots/eval_metrics.json")
SAMPLES = Path("reports/samples.md")
LABELS = Path("reports/labels.json")
CONFUSION_DIR = Path("reports/plots/confusion")
LOSS_MAX_TOKENS = 4096  # truncation for the reference-answer loss; long enough for any sample row


class EvalError(RuntimeError):
    pass


def _check_references(test: list[dict]) -> list[str]:
    """Every test row must end with the answer it is scored against; a row without one would
    score 0 on every metric and pull the averages down without a word."""
    from stages.lib.records import reference_answer

    missing = [r.get("id", "?") for r in test if not reference_answer(r).strip()]
    if missing:
        raise EvalError(f"{len(missing)} of {len(test)} test rows have no reference answer (no final assistant "
                        f"turn), e.g. {', '.join(missing[:3])}: with clean.require_assistant_last: true the clean "
                        f"stage rejects such rows; re-run `dvc repro` or fix {TEST}")
    return [reference_answer(r) for r in test]


def _check_sizes(settings, model, tokenizer, test: list[dict]) -> None:
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


def evaluate_model(params, which: str) -> tuple[dict, list[dict], list[dict]]:
    """Generate and score one model; return (per-row scores, prediction rows, probe rows).

    The scores ({"test", "probes", "text"}: one dict per test row, probe and probe-text block) are
    what every metric and its interval is computed from (stages/lib/uncertainty.py)."""
    from stages.lib.generation import answer_loss_rows, generate, load_for_inference, text_nll_blocks
    from stages.lib.metrics import probe_row_scores, row_scores
    from stages.lib.records import prompt_messages

    settings = params.evaluate
    test = list(read_jsonl(TEST))[: settings.max_samples]
    if not test:
        raise EvalError(f"{TEST} is empty: nothing to evaluate on")
    references = _check_references(test)
    try:
        probes, probe_text = read_probes(settings.probes)
    except ProbeError as exc:
        raise EvalError(str(exc)) from None
    if which == "tuned" and not (ADAPTER / "adapter_config.json").exists():
        raise EvalError(f"{ADAPTER}/adapter_config.json not found: run the train stage first")

    model, tokenizer = load_for_inference(params, ADAPTER if which == "tuned" else None)
    _check_sizes(settings, model, tokenizer, test)
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


def _save(which: str, scores: dict, metrics: dict, rows: list[dict], probe_rows: list[dict]) -> None:
    with atomic_dir(EVAL_DIR / which) as folder:
        write_jsonl(folder / "predictions.jsonl", rows)
        write_jsonl(folder / "probes.jsonl", probe_rows)
        write_json(folder / "scores.json", scores)
        write_json(folder / "metrics.json", metrics)


def eval_report(base_scores: dict, tuned_scores: dict) -> dict:
    """The reports/eval.json layout: base, tuned and delta (tuned − base), every metric
    {"value", "lower", "upper"}; n (rows per unit) and the interval settings."""
    from stages.lib.uncertainty import CONFIDENCE, RESAMPLES, SEED, compare_scores

    compared = compare_scores(base_scores, tuned_scores)
    n = {("text_blocks" if unit == "text" else unit): count for unit, count in compared["n"].items()}
    return {"base": compared["old"], "tuned": compared["new"], "delta": compared["delta"], "n": n,
            "interval": {"confidence": CONFIDENCE, "resamples": RESAMPLES, "seed": SEED}}


def report_tuned(params, tuned_scores: dict, rows: list[dict], probe_rows: list[dict]) -> list[str]:
    """Write the base vs tuned report, plot and samples; return failed gates."""
    from stages.lib.gates import check_gates
    from stages.lib.report import eval_plot_rows, samples_markdown

    base_dir = EVAL_DIR / "base"
    if not (base_dir / "scores.json").exists():
        raise EvalError(f"{base_dir}/scores.json not found: run `dvc repro evaluate_base` first")
    base_scores = read_json(base_dir / "scores.json")
    base_rows = {r["id"]: r for r in read_jsonl(base_dir / "predictions.jsonl")}
    report = eval_report(base_scores, tuned_scores)
    from stages.lib.stage import peak_rss_mib

    report["peak_rss_mib"] = peak_rss_mib()  # this stage's (evaluate_base reports its own)
    write_json(REPORT, report)
    write_json(PLOT, eval_plot_rows(report))
    side_by_side = [{"id": r["id"], "prompt": r["prompt"], "reference": r["reference"],
                     "base": base_rows.get(r["id"], {}).get("prediction", ""), "tuned": r["prediction"]}
                    for r in rows]
    write_text(SAMPLES, samples_markdown(side_by_side, params.evaluate.n_samples,
                                         extract=params.evaluate.extract))
    write_label_analysis(params, side_by_side)
    return check_gates(params.evaluate.gates, report)


def write_label_analysis(params, side_by_side: list[dict]) -> None:
    """Per-label precision/recall/F1 of both models (reports/labels.json) and the tuned model's
    confusion matrix per classification-like field (reports/plots/confusion/<field>.json)."""
    from stages.lib.labels import confusion_plot_rows, label_report

    settings = params.evaluate
    refs = [r["reference"] for r in side_by_side]
    report = {model: label_report([r[model] for r in side_by_side], refs, settings.json_fields,
                                  settings.json_schema) for model in ("base", "tuned")}
    write_json(LABELS, report)
    with atomic_dir(CONFUSION_DIR) as folder:
        for field in report["tuned"]:
            write_json(folder / f"{field}.json", confusion_plot_rows(
                [r["tuned"] for r in side_by_side], refs, field, settings.json_schema))


def finite_or_reason(metrics: dict, which: str, scores: dict | None = None) -> dict:
    """A model whose outputs are not numbers (NaN weights) gives NaN losses. The per-row scores
    keep them out of every metric (a metric of NaN rows is not computed); the metrics say why
    under "non_finite", with a warning, and no JSON file ever holds NaN."""
    import math
    from collections import Counter

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
        print(f"evaluate ({which}): warning: non-finite {', '.join(sorted(reasons))} (see non_finite in the "
              "metrics)", file=sys.stderr)
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("base", "tuned"), required=True)
    args = parser.parse_args(argv)
    try:
        params = load_params(stage="evaluate_base" if args.model == "base" else "evaluate")
    except ParamsError as exc:
        print(exc, file=sys.stderr)
        return 1

    from stages.lib.adapter import AdapterError
    from stages.lib.modeling import ModelError

    try:
        from stages.lib.uncertainty import summarise

        scores, rows, probe_rows = evaluate_model(params, args.model)
        metrics = finite_or_reason(summarise(scores), args.model, scores)
        _save(args.model, scores, metrics, rows, probe_rows)
        if args.model == "base":
            from stages.lib.stage import peak_rss_mib

            write_json(BASE_REPORT, {**metrics, "peak_rss_mib": peak_rss_mib()})
            failures = []
        else:
            failures = report_tuned(params, scores, rows, probe_rows)
    except (AdapterError, EvalError, ModelError, OutputError, ValueError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 1
    summary = ", ".join(f"{k}={v['value']:.3f} [{v['lower']:.3f}, {v['upper']:.3f}]"
                        for k, v in metrics.items() if isinstance(v, dict)
                        and all(isinstance(v.get(b), (int, float)) for b in ("value", "lower", "upper")))
    print(f"evaluate ({args.model}): {summary}", file=sys.stderr)
    if failures:
        print("evaluation gates failed:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from stages.lib.stage import run_stage

    sys.exit(run_stage("evaluate", main))
