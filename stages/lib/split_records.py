"""The split stage's work: assign whole groups of similar records to train/validation/test, write
each side's file, and audit the result for leaks.

Streaming passes, holding a few hundred bytes per record in memory:
1. the deduplicated records, parsed once (in batches, by worker processes): ids, byte offsets,
   prompt/answer keys and word counts; each record's word hashes go to a temporary file. The
   MinHash fingerprints are the ones dedup computed (read, not recomputed). Then groups and sides
   (stages/lib/splitting.py) and the exact and near-duplicate audit checks (stages/lib/audit.py);
2. the word-hash file, twice per role: test rows' n-grams, then the other rows' (the n-gram audit);
3. every record, in id order (read at its byte offset with `os.pread`), copied byte for byte to
   its side's file.
Above `split.max_leakage` leaked pairs the split fails and names them; its files are still
written, to inspect.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from stages.lib import audit, minhash, splitting
from stages.lib.io import atomic_file, scratch_dir
from stages.lib.progress import progress_bar
from stages.lib.records import turns_text
from stages.lib.stage import StageError


@dataclass
class SplitResult:
    report: dict                                       # reports/split.json
    warnings: list[str] = field(default_factory=list)  # worth a line on stderr, not a failure
    failure: Optional[str] = None                      # why the split must not be used, if it must not


def _read_at(handle, offset: int) -> dict:
    handle.seek(offset)
    return json.loads(handle.readline())


def _snippet(record: dict, role: str, chars: int = 120) -> str:
    text = " ".join(turns_text(record, role).split())
    return text if len(text) <= chars else text[:chars] + "…"


def _index(records: Path, signatures_path: Path, params, scratch: Path, word_counts: dict):
    """Pass 1, and the fingerprints dedup computed (with its params) for the rows it kept and removed."""
    try:
        n_hint = minhash.count_lines(records)
    except FileNotFoundError:
        raise StageError(f"{records}: not found (run the dedup stage first: dvc repro dedup)") from None
    signatures = minhash.read_signatures(signatures_path)
    layout = splitting.group_layout(n_hint, params.group_threshold, signatures.num_perm)
    with progress_bar("split: index", n_hint) as progress:
        index = splitting.build_index(records, None, layout, params.group_by, splitting.TokenStore(scratch),
                                      progress, observers=word_counts, expected_rows=n_hint)
    splitting.attach_signatures(index, signatures, layout, str(signatures_path))
    if len(index.ids) == 0:
        raise StageError(f"{records} has no records")
    if params.group_by and all(v is None for v in index.group_values):
        raise StageError(f"split.group_by is {params.group_by!r} but no record has meta.{params.group_by}; "
                         "add the column to data.keep_columns so clean copies it")
    return index, layout


def _write_sides(records: Path, index, sides, outputs: dict) -> dict:
    """Pass 3: every record, in id order, to its side's file; the rows per side."""
    import numpy as np

    n = len(index.ids)
    order = np.argsort(index.ids, kind="stable")
    counts = {side: 0 for side in outputs}
    with contextlib.ExitStack() as stack:
        files = {side: stack.enter_context(atomic_file(path, "wb")) for side, path in outputs.items()}
        handle = stack.enter_context(open(records, "rb"))
        progress = stack.enter_context(progress_bar("split: write", n))
        # Rows are in file order, so a record's bytes run to the next record's offset (blank
        # lines included); one positioned read each, without seeking or a read-ahead buffer.
        offsets = index.offsets.tolist()
        spans = np.diff(np.append(index.offsets, os.fstat(handle.fileno()).st_size)).tolist()
        row_sides = sides.tolist()
        for row in order.tolist():
            chunk = os.pread(handle.fileno(), spans[row], offsets[row])
            end = chunk.find(b"\n")
            side = row_sides[row]
            files[side].write((chunk if end < 0 else chunk[:end]).rstrip(b"\r") + b"\n")
            counts[side] += 1
        progress.update(n)
    return counts


def _audit_report(records: Path, index, sides, checks: dict, ngram_checks: dict, max_examples: int) -> dict:
    """Per check, the pair count and a few examples with their prompts (and shared text)."""
    report = {}
    with open(records, "rb") as handle:
        for name, check in checks.items():
            examples = []
            for other, test in check.pairs[:max_examples].tolist():
                a, b = _read_at(handle, int(index.offsets[other])), _read_at(handle, int(index.offsets[test]))
                example = {"test_id": b["id"], "other_id": a["id"], "other_side": splitting.SIDE_NAMES[sides[other]],
                           "test_prompt": _snippet(b, "user"), "other_prompt": _snippet(a, "user")}
                if name.startswith("ngram_"):
                    example["shared"] = ngram_checks[name.removeprefix("ngram_")].shared_text(a, b)
                examples.append(example)
            report[name] = {"pairs": int(len(check.pairs)), "examples": examples,
                            **({"truncated": True} if check.truncated else {}), **(check.detail or {})}
    return report


def _leak_message(leaked: int, checks: dict, index, sides, params, report_name: str) -> str:
    names = []
    for name, check in checks.items():
        for other, test in check.pairs[:10].tolist():
            names.append(f"{name}: test {minhash.uint64_to_id(index.ids[test])} ~ "
                         f"{splitting.SIDE_NAMES[sides[other]]} {minhash.uint64_to_id(index.ids[other])}")
    return (f"{leaked} leaked train/test pair(s), more than split.max_leakage={params.max_leakage}:\n  "
            + "\n  ".join(names[:20]) + (f"\n  … and more, see {report_name}" if leaked > 20 else "")
            + "\nTo fix: lower split.group_threshold (groups more similar rows together), set split.group_by, "
            "raise split.ngram_max_df if the shared text is boilerplate, or raise split.max_leakage.")


def split_records(records: Path, signatures: Path, params, outputs: dict, report_name: str) -> SplitResult:
    """Split `records` (params: the `split` section) into `outputs` ({splitting.TRAIN: path, ...}),
    with `signatures` as dedup wrote them. The word-hash store (tens of MB on large inputs) lives
    beside the outputs, is removed on the way out, and is swept by the next run if this one is
    SIGKILLed. `report_name` is where the caller writes the report (messages point at it)."""
    word_counts = {role: audit.WordFrequency() for role in splitting.COMPARED_ROLES}
    with scratch_dir(outputs[splitting.TRAIN].parent / "tokens") as scratch:
        index, layout = _index(records, signatures, params, scratch, word_counts)
        n = len(index.ids)
        grouping = splitting.split_groups(index, params, word_counts)
        sides = grouping.sides
        cutoff = splitting.common_cutoff(n, params.ngram_max_df)
        checks = {
            "exact_prompt": audit.exact_check(index.prompt_keys, sides),
            "exact_answer": audit.exact_check(index.answer_keys, sides, cutoff),
            "near_duplicate": audit.near_duplicate_check(index, sides, params.group_threshold, grouping.similar),
            "near_duplicate_via_removed": audit.removed_link_check(index, sides, params.group_threshold,
                                                                   grouping.removed_pairs),
            "prefix": audit.prefix_check(index, sides, cutoff),
        }
        # Pass 2: word n-grams of test rows, then of the others, from the token store.
        ngram_checks = audit.ngram_checks(index, sides, params.ngram, params.ngram_max_df, word_counts,
                                          minhash.WordHasher())
        for role, check in ngram_checks.items():
            checks[f"ngram_{role}"] = check.result(n, params.ngram_max_df)
        counts = _write_sides(records, index, sides, outputs)
    return _result(records, index, layout, grouping, checks, ngram_checks, counts, params, report_name)


def _result(records, index, layout, grouping, checks, ngram_checks, counts, params, report_name) -> SplitResult:
    import numpy as np

    n = len(index.ids)
    sides = grouping.sides
    all_pairs = np.unique(np.concatenate([c.pairs for c in checks.values()]), axis=0)
    leaked = len(all_pairs)
    group_sizes = np.unique(grouping.group_keys, return_counts=True)[1]
    report = {
        "rows_in": n,
        "train": counts[splitting.TRAIN], "validation": counts[splitting.VALIDATION], "test": counts[splitting.TEST],
        "accounting_ok": n == sum(counts.values()),
        "groups": int(len(group_sizes)),
        "groups_with_several_rows": int(np.sum(group_sizes > 1)),
        "largest_group": int(group_sizes.max()),
        "largest_group_links": grouping.largest,
        "grouping": {"method": grouping.method, "similar_pairs": grouping.near_pairs, "joined_by": grouping.joined,
                     "pairs_compared": int(grouping.candidates), "group_threshold": params.group_threshold,
                     "group_by": params.group_by,
                     **({"lsh_bands": layout.bands, "lsh_rows": layout.rows} if layout else {})},
        "audit": _audit_report(records, index, sides, checks, ngram_checks, params.max_examples),
        "leaked_pairs": leaked,
        "max_leakage": params.max_leakage,
        "passed": leaked <= params.max_leakage,
    }
    if params.group_by:
        report["grouping"]["rows_without_group_by"] = sum(v is None for v in index.group_values)
    # A side whose fraction is > 0 must get rows: an empty test split measures nothing, and an
    # empty validation split silently turns off evaluation during training.
    wanted = {splitting.TEST: params.test_fraction, splitting.VALIDATION: params.validation_fraction}
    empty = [side for side, fraction in wanted.items() if fraction > 0 and counts[side] == 0]
    report["empty_sides"] = [splitting.SIDE_NAMES[side] for side in empty]
    report["passed"] = report["passed"] and not empty

    result = SplitResult(report)
    largest = grouping.largest
    giant_note = (f"the largest group holds {largest['rows']} of {n} rows ({largest['share']:.0%}), joined by "
                  + ", ".join(f"{reason} ({count} links)" for reason, count in
                              sorted(largest["links"].items(), key=lambda item: -item[1]))
                  + f"; see largest_group_links in {report_name}")
    if largest["giant"]:
        result.warnings.append(f"one group swallows most of the data: {giant_note}")
    if empty:
        result.failure = (f"the {' and '.join(report['empty_sides'])} split is empty ({n} rows in "
                          f"{report['groups']} groups; "
                          + ", ".join(f"split.{splitting.SIDE_NAMES[side]}_fraction={wanted[side]}" for side in empty)
                          + f"); {giant_note}. Add rows, raise the fraction, or set it to 0 (validation only)")
    elif leaked > params.max_leakage:
        result.failure = _leak_message(leaked, checks, index, sides, params, report_name)
    return result
