"""Stages `evaluate_base` and `evaluate`: generate on the test split and the probe set, score.

    python -m stages.evaluate --model base    # base model only: cached apart from training
    python -m stages.evaluate --model tuned   # base + adapter, then base vs tuned report and gates

Both load the base model exactly as training did (same quantisation and compute dtype), so the
two differ by the adapter alone. What is measured and how: stages/lib/evaluation.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stages.lib.evaluation import (EvalError, check_references, eval_report, evaluate_model, finite_metrics,
                                   label_analysis, side_by_side, summary_line)
from stages.lib.io import (ProbeError, atomic_dir, read_json, read_jsonl, read_probes, write_json,
                           write_jsonl, write_text)
from stages.lib.params import load_params

TEST = Path("data/split/test.jsonl")
ADAPTER = Path("models/adapter")
EVAL_DIR = Path("data/eval")
BASE_REPORT = Path("reports/eval_base.json")
REPORT = Path("reports/eval.json")
PLOT = Path("reports/plots/eval_metrics.json")
SAMPLES = Path("reports/samples.md")
LABELS = Path("reports/labels.json")
CONFUSION_DIR = Path("reports/plots/confusion")


def _inputs(params, which: str) -> tuple[list[dict], list[str], list[dict], str]:
    test = list(read_jsonl(TEST))[: params.evaluate.max_samples]
    if not test:
        raise EvalError(f"{TEST} is empty: nothing to evaluate on")
    references = check_references(test, str(TEST))
    try:
        probes, probe_text = read_probes(params.evaluate.probes)
    except ProbeError as exc:
        raise EvalError(str(exc)) from None
    if which == "tuned" and not (ADAPTER / "adapter_config.json").exists():
        raise EvalError(f"{ADAPTER}/adapter_config.json not found: run the train stage first")
    return test, references, probes, probe_text


def _save(which: str, scores: dict, metrics: dict, rows: list[dict], probe_rows: list[dict]) -> None:
    with atomic_dir(EVAL_DIR / which) as folder:
        write_jsonl(folder / "predictions.jsonl", rows)
        write_jsonl(folder / "probes.jsonl", probe_rows)
        write_json(folder / "scores.json", scores)
        write_json(folder / "metrics.json", metrics)


def _report_tuned(params, tuned_scores: dict, rows: list[dict]) -> list[str]:
    """Write the base vs tuned report, plot, samples and label analysis; return failed gates."""
    from stages.lib.gates import check_gates
    from stages.lib.report import eval_plot_rows, samples_markdown
    from stages.lib.stage import peak_rss_mib

    base_dir = EVAL_DIR / "base"
    if not (base_dir / "scores.json").exists():
        raise EvalError(f"{base_dir}/scores.json not found: run `dvc repro evaluate_base` first")
    report = eval_report(read_json(base_dir / "scores.json"), tuned_scores)
    report["peak_rss_mib"] = peak_rss_mib()  # this stage's (evaluate_base reports its own)
    write_json(REPORT, report)
    write_json(PLOT, eval_plot_rows(report))
    pairs = side_by_side(rows, list(read_jsonl(base_dir / "predictions.jsonl")))
    write_text(SAMPLES, samples_markdown(pairs, params.evaluate.n_samples, extract=params.evaluate.extract))
    labels, confusion = label_analysis(params.evaluate, pairs)
    write_json(LABELS, labels)
    with atomic_dir(CONFUSION_DIR) as folder:
        for field, plot_rows in confusion.items():
            write_json(folder / f"{field}.json", plot_rows)
    return check_gates(params.evaluate.gates, report)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("base", "tuned"), required=True)
    args = parser.parse_args(argv)
    params = load_params(stage="evaluate_base" if args.model == "base" else "evaluate")

    from stages.lib.uncertainty import summarise

    test, references, probes, probe_text = _inputs(params, args.model)
    scores, rows, probe_rows = evaluate_model(params, test, references, probes, probe_text,
                                              ADAPTER if args.model == "tuned" else None)
    metrics, non_finite = finite_metrics(summarise(scores), scores)
    if non_finite:
        print(f"evaluate ({args.model}): warning: non-finite {', '.join(sorted(non_finite))} (see non_finite "
              "in the metrics)", file=sys.stderr)
    _save(args.model, scores, metrics, rows, probe_rows)
    if args.model == "base":
        from stages.lib.stage import peak_rss_mib

        write_json(BASE_REPORT, {**metrics, "peak_rss_mib": peak_rss_mib()})
        failures = []
    else:
        failures = _report_tuned(params, scores, rows)
    print(f"evaluate ({args.model}): {summary_line(metrics)}", file=sys.stderr)
    if failures:
        print("evaluation gates failed:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from stages.lib.modeling import run_model_stage

    sys.exit(run_model_stage("evaluate", main))
