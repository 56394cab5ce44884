"""Stage `dedup`: remove exact and near-duplicate records, keeping the first of each cluster.

    python -m stages.dedup        (from the project root; reads params `dedup`)

Two passes over data/clean/records.jsonl: the first builds a compact index (an exact key, a
MinHash fingerprint and LSH band keys per record: a few hundred bytes, whatever the text length;
batches are parsed and hashed by worker processes, stages/lib/parallel.py), the second copies
kept records byte for byte to data/dedup/records.jsonl and writes one row per removed record to
data/dedup/removed.jsonl. data/dedup/signatures.npy keeps every clean record's fingerprint and
dedup's decision for split (which groups with them, removed rows included, instead of hashing
again). reports/dedup.json counts them and, when the clean
report is there, checks the whole accounting: rows_in(clean) = kept + rejected + removed.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

CLEAN_RECORDS = Path("data/clean/records.jsonl")
CLEAN_REPORT = Path("reports/clean.json")
RECORDS = Path("data/dedup/records.jsonl")
REMOVED = Path("data/dedup/removed.jsonl")
SIGNATURES = Path("data/dedup/signatures.npy")
REPORT = Path("reports/dedup.json")


def main() -> int:
    import functools

    import numpy as np

    from stages.lib import minhash
    from stages.lib.io import atomic_file, dumps_record, read_json, write_json
    from stages.lib.params import load_params
    from stages.lib.parallel import ordered_map
    from stages.lib.progress import progress_bar

    # Failures (params, input, output) raise; run_stage turns them into one line and exit 1.
    params = load_params(stage="dedup").dedup
    hasher = minhash.MinHasher(params.num_perm, params.shingle_size, params.seed)
    layout = minhash.optimal_bands(params.threshold, params.num_perm, *minhash.RECALL_WEIGHTS)
    try:
        rows = minhash.count_lines(CLEAN_RECORDS)   # sizes the index exactly
    except FileNotFoundError:
        rows = 0   # read_batches reports the missing file below
    ids = minhash.GrowingArray(None, np.uint64, rows)   # 8 bytes per record, not a Python string
    exact_keys = minhash.GrowingArray(None, np.uint64, rows)
    fingerprints = minhash.GrowingArray(params.num_perm, np.uint16, rows)
    band_keys = minhash.GrowingArray(layout.bands, np.uint32, rows if params.near else 1)
    with progress_bar("dedup: index") as progress:
        # Worker processes parse and hash batches; this one reads lines and gathers results.
        index_batch = functools.partial(minhash.dedup_index, hasher=hasher, layout=layout if params.near else None)
        for batch in ordered_map(index_batch, minhash.read_batches(CLEAN_RECORDS)):
            ids.extend(batch.ids)
            exact_keys.extend(batch.exact_keys)
            fingerprints.extend(batch.fingerprints)   # always: split reads them (SIGNATURES)
            if params.near:
                band_keys.extend(batch.band_keys)
            progress.update(len(batch.ids))
    ids = ids.array()
    if len(ids) == 0:
        print(f"dedup: {CLEAN_RECORDS} has no records", file=sys.stderr)
        return 1

    dups = minhash.find_duplicates(exact_keys.array(), fingerprints.array() if params.near else None,
                                   band_keys.array() if params.near else None, params.threshold)
    kinds = {minhash.EXACT: "exact", minhash.NEAR: "near"}
    with atomic_file(SIGNATURES, "wb") as signatures_out:
        minhash.write_signatures(signatures_out, ids, dups, fingerprints.array(), params.shingle_size, params.seed)
    with atomic_file(RECORDS, "wb") as kept_out, atomic_file(REMOVED) as removed_out:
        row = 0
        kind = dups.kind.tolist()
        for batch in minhash.read_batches(CLEAN_RECORDS):
            kept = [line for line, k in zip(batch.lines, kind[row:row + len(batch.lines)]) if k == 0]
            # Kept lines byte for byte (UTF-8 was checked when they were parsed), each ending in
            # one LF: one write per batch when they already do, as clean writes them.
            block = b"".join(kept)
            if block.count(b"\n") != len(kept) or b"\r" in block:
                block = b"".join(line.rstrip(b"\r\n") + b"\n" for line in kept)
            kept_out.write(block)
            for line in batch.lines:
                if kind[row] != 0:
                    record = json.loads(line)
                    removed_out.write(dumps_record({
                        "id": record["id"], "duplicate_of": minhash.uint64_to_id(ids[dups.duplicate_of[row]]),
                        "kind": kinds[kind[row]],
                        "similarity": round(float(dups.similarity[row]), 4), "source": record["source"],
                    }) + "\n")
                row += 1

    removed_exact = int(np.sum(dups.kind == minhash.EXACT))
    removed_near = int(np.sum(dups.kind == minhash.NEAR))
    kept = len(ids) - removed_exact - removed_near
    report = {
        "rows_in": len(ids), "kept": kept, "removed_exact": removed_exact, "removed_near": removed_near,
        "near": params.near, "threshold": params.threshold,
        "lsh": {"bands": layout.bands, "rows": layout.rows, "candidate_pairs": dups.candidate_pairs},
        **minhash.cluster_report(ids, dups),
    }
    if CLEAN_REPORT.exists():
        # The whole pipeline's accounting so far, in one place.
        clean = read_json(CLEAN_REPORT)
        if clean.get("kept") == len(ids):
            report["accounting"] = {
                "raw_rows": clean["rows_in"], "rejected": clean["rejected"],
                "removed": removed_exact + removed_near, "kept": kept,
                "ok": clean["rows_in"] == kept + clean["rejected"] + removed_exact + removed_near,
            }
    write_json(REPORT, report)
    print(f"dedup: {len(ids)} rows in, {kept} kept, {removed_exact} exact and {removed_near} near duplicates removed")
    return 0


if __name__ == "__main__":
    from stages.lib.stage import run_stage

    sys.exit(run_stage("dedup", main))
