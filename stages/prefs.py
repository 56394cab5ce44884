"""Stage `prefs`: blind human judgements (from `qlora-dvc prefs`) -> win rates with intervals.

    python -m stages.prefs

Reads `evaluate.prefs.file` (one JSON judgement per line, appended by `qlora-dvc prefs`) and the
current base and tuned predictions, and writes reports/prefs.json: tuned vs base win / tie /
loss with 95 % Wilson intervals over the judgements of the current answers, plus how many were
skipped, stale (about answers a previous adapter gave) or malformed. No judgements yet: the
counts are 0 and the rates null.
"""
from __future__ import annotations

import sys
from pathlib import Path

from stages.lib.io import read_jsonl, write_json
from stages.lib.params import load_params

BASE = Path("data/eval/base/predictions.jsonl")
TUNED = Path("data/eval/tuned/predictions.jsonl")
REPORT = Path("reports/prefs.json")


def main(argv: list[str] | None = None) -> int:
    from stages.lib.pairing import pair_rows
    from stages.lib.prefs import read_judgements, summarize_prefs

    path = Path(load_params(stage="prefs").evaluate.prefs.file)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (evaluate.prefs.file): create it empty, or judge "
                                "some answers with `qlora-dvc prefs`")
    with open(path, encoding="utf-8") as handle:
        judgements = read_judgements(handle)
    pairs = pair_rows(read_jsonl(BASE), read_jsonl(TUNED))
    report = summarize_prefs(judgements, pairs)
    write_json(REPORT, report)
    win = report["win"]
    rates = (f"win {win['rate']:.2f} [{win['lower']:.2f}, {win['upper']:.2f}], tie {report['tie']['rate']:.2f}, "
             f"loss {report['loss']['rate']:.2f}") if report["judgements"] else "no judgements yet"
    print(f"prefs: {report['judgements']} blind judgement(s) of {report['rows']} rows: {rates}; "
          f"{report['skipped']} skipped, {report['stale']} stale, {report['malformed']} malformed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from stages.lib.stage import run_stage

    sys.exit(run_stage("prefs", main))
