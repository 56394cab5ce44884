"""Stage `dedup`: remove exact and near-duplicate records, keeping the first of each cluster.

    python -m stages.dedup        (from the project root; reads params `dedup`)

The work is stages/lib/deduplicate.py: two streaming passes over data/clean/records.jsonl (an
index of a few hundred bytes per record, then a copy), writing the kept records byte for byte to
data/dedup/records.jsonl, one row per removed record to data/dedup/removed.jsonl, and every clean
record's fingerprint with dedup's decision to data/dedup/signatures.npy (split groups with them
instead of hashing again). reports/dedup.json counts them and, when the clean report is there,
checks the whole accounting: rows_in(clean) = kept + rejected + removed.
"""
from __future__ import annotations

import sys
from pathlib import Path

CLEAN_RECORDS = Path("data/clean/records.jsonl")
CLEAN_REPORT = Path("reports/clean.json")
RECORDS = Path("data/dedup/records.jsonl")
REMOVED = Path("data/dedup/removed.jsonl")
SIGNATURES = Path("data/dedup/signatures.npy")
REPORT = Path("reports/dedup.json")


def main() -> int:
    from stages.lib.deduplicate import DedupOutputs, deduplicate
    from stages.lib.io import read_json, write_json
    from stages.lib.params import load_params

    # Failures (params, input, output) raise; run_stage turns them into one line and exit 1.
    params = load_params(stage="dedup").dedup
    clean_report = read_json(CLEAN_REPORT) if CLEAN_REPORT.exists() else None
    report = deduplicate(CLEAN_RECORDS, params, DedupOutputs(kept=RECORDS, removed=REMOVED, signatures=SIGNATURES),
                         clean_report)
    write_json(REPORT, report)
    print(f"dedup: {report['rows_in']} rows in, {report['kept']} kept, {report['removed_exact']} exact and "
          f"{report['removed_near']} near duplicates removed")
    return 0


if __name__ == "__main__":
    from stages.lib.stage import run_stage

    sys.exit(run_stage("dedup", main))
