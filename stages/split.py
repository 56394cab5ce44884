"""Stage `split`: assign whole groups of similar records to train/validation/test, then audit.

    python -m stages.split        (from the project root; reads params `split`)

Streaming passes, holding a few hundred bytes per record in memory:
1. data/dedup/records.jsonl, parsed once (in batches, by worker processes): ids, byte offsets,
   prompt/answer keys and word counts; each record's word hashes go to a temporary file. The
   MinHash fingerprints are the ones dedup computed (data/dedup/signatures.npy, read, not
   recomputed). Then groups and sides (stages/lib/splitting.py) and the exact and near-duplicate
   audit checks (stages/lib/audit.py);
2. the word-hash file, twice per role: test rows' n-grams, then the other rows' (the n-gram audit);
3. every record, in id order (read at its byte offset with `os.pread`), copied byte for byte to
   its side's file.
reports/split.json holds the counts and the audit; above split.max_leakage leaked pairs the
stage fails and names them (the outputs are still written, to inspect).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

DEDUP_RECORDS = Path("data/dedup/records.jsonl")
DEDUP_SIGNATURES = Path("data/dedup/signatures.npy")
OUTPUTS = {0: Path("data/split/train.jsonl"), 1: Path("data/split/validation.jsonl"), 2: Path("data/split/test.jsonl")}
REPORT = Path("reports/split.json")
BATCH = 4096


def _read_at(handle, offset: int) -> dict:
    handle.seek(offset)
    return json.loads(handle.readline())


def _snippet(record: dict, role: str, chars: int = 120) -> str:
    from stages.lib.records import turns_text

    text = " ".join(turns_text(record, role).split())
    return text if len(text) <= chars else text[:chars] + "…"


def main() -> int:
    import contextlib

    with contextlib.ExitStack() as stack:
        return _main(stack)


def _main(stack) -> int:
    import contextlib
    import os

    import numpy as np

    from stages.lib import audit, minhash, splitting
    from stages.lib.io import atomic_file, scratch_dir, write_json
    from stages.lib.params import load_params
    from stages.lib.progress import progress_bar

    # Failures (params, input, output) raise; run_stage turns them into one line and exit 1.
    all_params = load_params(stage="split")
    params = all_params.split

    def bar(desc, total):
        return progress_bar(desc, total)

    try:
        n_hint = minhash.count_lines(DEDUP_RECORDS)
    except FileNotFoundError:
        print(f"split: {DEDUP_RECORDS}: not found (run the dedup stage first: dvc repro dedup)", file=sys.stderr)
        return 1
    # Fingerprints as dedup computed them (with its params), and the rows it removed.
    signatures = minhash.read_signatures(DEDUP_SIGNATURES)
    layout = splitting.group_layout(n_hint, params.group_threshold, signatures.num_perm)
    word_counts = {role: audit.WordFrequency() for role in splitting.COMPARED_ROLES}
    # Word-hash store (tens of MB on large inputs): beside the outputs, removed on the way out,
    # swept by the next run if this one is SIGKILLed.
    scratch = stack.enter_context(scratch_dir(OUTPUTS[0].parent / "tokens"))
    with bar("split: index", n_hint) as progress:
        index = splitting.build_index(DEDUP_RECORDS, None, layout, params.group_by,
                                      splitting.TokenStore(scratch), progress, observers=word_counts,
                                      expected_rows=n_hint)
    splitting.attach_signatures(index, signatures, layout, str(DEDUP_SIGNATURES))
    del signatures
    n = len(index.ids)
    if n == 0:
        print(f"split: {DEDUP_RECORDS} has no records", file=sys.stderr)
        return 1
    if params.group_by and all(v is None for v in index.group_values):
        print(f"split: split.group_by is {params.group_by!r} but no record has meta.{params.group_by}; "
              "add the column to data.keep_columns so clean copies it", file=sys.stderr)
        return 1

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

    # Pass 3: copy every record to its side's file, in id order.
    order = np.argsort(index.ids, kind="stable")
    counts = {side: 0 for side in OUTPUTS}
    with contextlib.ExitStack() as outputs_stack:
        outputs = {side: outputs_stack.enter_context(atomic_file(path, "wb")) for side, path in OUTPUTS.items()}
        handle = outputs_stack.enter_context(open(DEDUP_RECORDS, "rb"))
        progress = outputs_stack.enter_context(bar("split: write", n))
        # Rows are in file order, so a record's bytes run to the next record's offset (blank
        # lines included); one positioned read each, without seeking or a read-ahead buffer.
        offsets = index.offsets.tolist()
        spans = np.diff(np.append(index.offsets, os.fstat(handle.fileno()).st_size)).tolist()
        row_sides = sides.tolist()
        for row in order.tolist():
            chunk = os.pread(handle.fileno(), spans[row], offsets[row])
            end = chunk.find(b"\n")
            side = row_sides[row]
            outputs[side].write((chunk if end < 0 else chunk[:end]).rstrip(b"\r") + b"\n")
            counts[side] += 1
        progress.update(n)

    # Report: counts, and per check the pair count and a few examples.
    all_pairs = np.unique(np.concatenate([c.pairs for c in checks.values()]), axis=0)
    leaked = len(all_pairs)
    audit_report = {}
    with open(DEDUP_RECORDS, "rb") as handle:
        for name, check in checks.items():
            examples = []
            for other, test in check.pairs[:params.max_examples].tolist():
                a, b = _read_at(handle, int(index.offsets[other])), _read_at(handle, int(index.offsets[test]))
                example = {"test_id": b["id"], "other_id": a["id"], "other_side": splitting.SIDE_NAMES[sides[other]],
                           "test_prompt": _snippet(b, "user"), "other_prompt": _snippet(a, "user")}
                if name.startswith("ngram_"):
                    example["shared"] = ngram_checks[name.removeprefix("ngram_")].shared_text(a, b)
                examples.append(example)
            audit_report[name] = {"pairs": int(len(check.pairs)), "examples": examples,
                                  **({"truncated": True} if check.truncated else {}), **(check.detail or {})}
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
        "audit": audit_report,
        "leaked_pairs": leaked,
        "max_leakage": params.max_leakage,
        "passed": leaked <= params.max_leakage,
    }
    if params.group_by:
        report["grouping"]["rows_without_group_by"] = sum(v is None for v in index.group_values)
    # A side whose fraction is > 0 must get rows: an empty test split measures nothing, and an
    # empty validation split silently turns off evaluation during training.
    wanted = {splitting.TEST: params.test_fraction, splitting.VALIDATION: params.validation_fraction}
    empty = [splitting.SIDE_NAMES[side] for side, fraction in wanted.items() if fraction > 0 and counts[side] == 0]
    report["empty_sides"] = empty
    report["passed"] = report["passed"] and not empty
    write_json(REPORT, report)
    print(f"split: {n} rows -> train {report['train']}, validation {report['validation']}, test {report['test']} "
          f"({report['groups']} groups); leakage audit: "
          + ", ".join(f"{name} {entry['pairs']}" for name, entry in audit_report.items()))
    largest = grouping.largest
    giant_note = (f"the largest group holds {largest['rows']} of {n} rows ({largest['share']:.0%}), joined by "
                  + ", ".join(f"{reason} ({count} links)" for reason, count in
                              sorted(largest["links"].items(), key=lambda item: -item[1]))
                  + f"; see largest_group_links in {REPORT}")
    if largest["giant"]:
        print(f"split: warning: one group swallows most of the data: {giant_note}", file=sys.stderr)
    if empty:
        print(f"split: the {' and '.join(empty)} split is empty ({n} rows in {report['groups']} groups; "
              + ", ".join(f"split.{side}_fraction={wanted[splitting.TEST if side == 'test' else splitting.VALIDATION]}"
                          for side in empty)
              + f"); {giant_note}. Add rows, raise the fraction, or set it to 0 (validation only)",
              file=sys.stderr)
        return 1
    if leaked > params.max_leakage:
        names = []
        for name, check in checks.items():
            for other, test in check.pairs[:10].tolist():
                names.append(f"{name}: test {minhash.uint64_to_id(index.ids[test])} ~ "
                             f"{splitting.SIDE_NAMES[sides[other]]} {minhash.uint64_to_id(index.ids[other])}")
        print(f"split: {leaked} leaked train/test pair(s), more than split.max_leakage={params.max_leakage}:\n  "
              + "\n  ".join(names[:20]) + (f"\n  … and more, see {REPORT}" if leaked > 20 else "")
              + "\nTo fix: lower split.group_threshold (groups more similar rows together), set split.group_by, "
              "raise split.ngram_max_df if the shared text is boilerplate, or raise split.max_leakage.",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from stages.lib.stage import run_stage

    sys.exit(run_stage("split", main))
