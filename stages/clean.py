"""Stage `clean`: raw data (any supported format) -> canonical records + rejected rows + report.

    python -m stages.clean        (from the project root; reads params `data` and `clean`)

Every input row ends up in exactly one of data/clean/records.jsonl and data/clean/rejected.jsonl
(with its line number and reason); reports/clean.json counts them. Rows are cleaned in batches by
worker processes (stages/lib/parallel.py), written in input order. Bad rows never stop the
stage; it fails only when too many are rejected or none survives.
"""
from __future__ import annotations

import sys
from pathlib import Path

RECORDS = Path("data/clean/records.jsonl")
REJECTED = Path("data/clean/rejected.jsonl")
REPORT = Path("reports/clean.json")


def main() -> int:
    from stages.lib.cleaning import CleanSummary, clean_file
    from stages.lib.formats import InputError, display_name, list_input_files
    from stages.lib.io import atomic_file, resolve_data_path, write_json
    from stages.lib.params import load_params
    from stages.lib.progress import progress_bar

    # Failures (params, input, output) raise; run_stage turns them into one line and exit 1.
    params = load_params(stage="clean")
    raw_path = resolve_data_path(params.data.raw, allowed_roots=params.data.allowed_roots)
    root = Path.cwd()
    summary = CleanSummary()
    files, ignored = list_input_files(raw_path, root, params.data.allowed_roots)
    with atomic_file(RECORDS) as kept_out, atomic_file(REJECTED) as rejected_out, \
            progress_bar("clean") as progress:
        for path in files:
            name = display_name(path, root)
            summary.formats_by_file.setdefault(name, None)
            for kept, rejected in clean_file(path, name, params.data, params.clean, summary):
                kept_out.write(kept)
                rejected_out.write(rejected)
                progress.update(summary.rows_in - progress.n)
        if summary.rows_in == 0:
            raise InputError(f"{params.data.raw}: no rows (the input is empty)")

    formats = sorted({fmt for fmt in summary.formats_by_file.values() if fmt})
    fraction = summary.rejected / summary.rows_in
    report = {
        "rows_in": summary.rows_in,
        "kept": summary.kept,
        "rejected": summary.rejected,
        "rejected_fraction": round(fraction, 6),
        "rejected_by_reason": dict(sorted(summary.rejected_by_reason.items())),
        "format": formats[0] if len(formats) == 1 else "mixed" if formats else None,
        "format_source": "data.format" if params.data.format != "auto" else "detected",
        "files": len(files),
        "ignored_files": [display_name(p, root) for p in ignored],
        "blank_lines": summary.blank_lines,
        "accounting_ok": summary.rows_in == summary.kept + summary.rejected,
    }
    if len(summary.formats_by_file) > 1:
        report["formats_by_file"] = dict(sorted(summary.formats_by_file.items()))
    write_json(REPORT, report)

    print(f"clean: format {report['format']} ({report['format_source']}); {summary.rows_in} rows in, "
          f"{summary.kept} kept, {summary.rejected} rejected ({fraction:.1%})")
    top = ", ".join(f"{kind} {count}" for kind, count in summary.rejected_by_reason.most_common(5))
    if summary.kept == 0:
        print(f"clean: no row survived cleaning (reasons: {top}); see {REJECTED}", file=sys.stderr)
        return 1
    if fraction > params.clean.max_rejected_fraction:
        print(f"clean: {fraction:.1%} of the rows were rejected, more than clean.max_rejected_fraction="
              f"{params.clean.max_rejected_fraction} (reasons: {top}); see {REJECTED} — is data.format "
              "or data.fields right?", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from stages.lib.stage import run_stage

    sys.exit(run_stage("clean", main))
