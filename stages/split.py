"""Stage `split`: assign whole groups of similar records to train/validation/test, then audit.

    python -m stages.split        (from the project root; reads params `split`)

The work is stages/lib/split_records.py: streaming passes over data/dedup/records.jsonl that
hold a few hundred bytes per record, with the MinHash fingerprints dedup wrote
(data/dedup/signatures.npy) read, not recomputed. Each record goes byte for byte to its side's
file in data/split/. reports/split.json holds the counts and the leakage audit; above
split.max_leakage leaked pairs, or with an empty test or validation side, the stage fails and
says why (the outputs are still written, to inspect).
"""
from __future__ import annotations

import sys
from pathlib import Path

DEDUP_RECORDS = Path("data/dedup/records.jsonl")
DEDUP_SIGNATURES = Path("data/dedup/signatures.npy")
OUTPUTS = {0: Path("data/split/train.jsonl"), 1: Path("data/split/validation.jsonl"), 2: Path("data/split/test.jsonl")}
REPORT = Path("reports/split.json")


def main() -> int:
    from stages.lib.io import write_json
    from stages.lib.params import load_params
    from stages.lib.split_records import split_records
    from stages.lib.stage import StageError

    # Failures (params, input, output) raise; run_stage turns them into one line and exit 1.
    params = load_params(stage="split").split
    result = split_records(DEDUP_RECORDS, DEDUP_SIGNATURES, params, OUTPUTS, str(REPORT))
    report = result.report
    write_json(REPORT, report)
    print(f"split: {report['rows_in']} rows -> train {report['train']}, validation {report['validation']}, "
          f"test {report['test']} ({report['groups']} groups); leakage audit: "
          + ", ".join(f"{name} {entry['pairs']}" for name, entry in report["audit"].items()))
    for warning in result.warnings:
        print(f"split: warning: {warning}", file=sys.stderr)
    if result.failure:
        raise StageError(result.failure)
    return 0


if __name__ == "__main__":
    from stages.lib.stage import run_stage

    sys.exit(run_stage("split", main))
