"""The dedup stage's work: drop exact and near-duplicate records, keeping the first of each cluster.

Two streaming passes over the clean records (stages/lib/minhash.py holds the engine):
1. a compact index, a few hundred bytes per record whatever the text length: an exact key, a
   MinHash fingerprint and LSH band keys, parsed and hashed in batches by worker processes
   (stages/lib/parallel.py); then the duplicate clusters;
2. the kept records copied byte for byte, and one row per removed record.

Every clean record's fingerprint, and dedup's decision about it, is written beside them for the
split stage, which groups with them (removed rows included) instead of hashing again.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from stages.lib import minhash
from stages.lib.io import atomic_file, dumps_record
from stages.lib.parallel import ordered_map
from stages.lib.progress import progress_bar
from stages.lib.stage import StageError

KIND_NAMES = {minhash.EXACT: "exact", minhash.NEAR: "near"}


@dataclass(frozen=True)
class DedupOutputs:
    kept: Path         # the kept records, byte for byte
    removed: Path      # one row per removed record: the kept record it duplicates, kind, similarity
    signatures: Path   # every input record's fingerprint and dedup's decision, for split


def _index(source: Path, params, layout: minhash.Bands):
    """Pass 1: ids, exact keys, fingerprints and (for near-duplicates) band keys of every record."""
    import numpy as np

    hasher = minhash.MinHasher(params.num_perm, params.shingle_size, params.seed)
    try:
        rows = minhash.count_lines(source)   # sizes the index exactly
    except FileNotFoundError:
        rows = 0   # read_batches reports the missing file below
    ids = minhash.GrowingArray(None, np.uint64, rows)   # 8 bytes per record, not a Python string
    exact_keys = minhash.GrowingArray(None, np.uint64, rows)
    fingerprints = minhash.GrowingArray(params.num_perm, np.uint16, rows)
    band_keys = minhash.GrowingArray(layout.bands, np.uint32, rows if params.near else 1)
    with progress_bar("dedup: index") as progress:
        # Worker processes parse and hash batches; this one reads lines and gathers results.
        index_batch = functools.partial(minhash.dedup_index, hasher=hasher, layout=layout if params.near else None)
        for batch in ordered_map(index_batch, minhash.read_batches(source)):
            ids.extend(batch.ids)
            exact_keys.extend(batch.exact_keys)
            fingerprints.extend(batch.fingerprints)   # always: split reads them
            if params.near:
                band_keys.extend(batch.band_keys)
            progress.update(len(batch.ids))
    return ids.array(), exact_keys.array(), fingerprints.array(), band_keys.array() if params.near else None


def _write_kept_and_removed(source: Path, ids, dups, outputs: DedupOutputs) -> None:
    """Pass 2: kept lines byte for byte, and a row naming the kept twin of each removed one."""
    with atomic_file(outputs.kept, "wb") as kept_out, atomic_file(outputs.removed) as removed_out:
        row = 0
        kind = dups.kind.tolist()
        for batch in minhash.read_batches(source):
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
                        "kind": KIND_NAMES[kind[row]],
                        "similarity": round(float(dups.similarity[row]), 4), "source": record["source"],
                    }) + "\n")
                row += 1


def deduplicate(source: Path, params, outputs: DedupOutputs, clean_report: Optional[dict] = None) -> dict:
    """Write `outputs` from the records in `source` (params: the `dedup` section) and return the
    report: counts, the LSH layout, the clusters and, given the clean stage's report, the whole
    pipeline's accounting so far (rows_in(clean) = kept + rejected + removed)."""
    import numpy as np

    layout = minhash.optimal_bands(params.threshold, params.num_perm, *minhash.RECALL_WEIGHTS)
    ids, exact_keys, fingerprints, band_keys = _index(source, params, layout)
    if len(ids) == 0:
        raise StageError(f"{source} has no records")
    dups = minhash.find_duplicates(exact_keys, fingerprints if params.near else None, band_keys, params.threshold)
    with atomic_file(outputs.signatures, "wb") as signatures_out:
        minhash.write_signatures(signatures_out, ids, dups, fingerprints, params.shingle_size, params.seed)
    _write_kept_and_removed(source, ids, dups, outputs)

    removed_exact = int(np.sum(dups.kind == minhash.EXACT))
    removed_near = int(np.sum(dups.kind == minhash.NEAR))
    kept = len(ids) - removed_exact - removed_near
    report = {
        "rows_in": len(ids), "kept": kept, "removed_exact": removed_exact, "removed_near": removed_near,
        "near": params.near, "threshold": params.threshold,
        "lsh": {"bands": layout.bands, "rows": layout.rows, "candidate_pairs": dups.candidate_pairs},
        **minhash.cluster_report(ids, dups),
    }
    if clean_report is not None and clean_report.get("kept") == len(ids):
        report["accounting"] = {
            "raw_rows": clean_report["rows_in"], "rejected": clean_report["rejected"],
            "removed": removed_exact + removed_near, "kept": kept,
            "ok": clean_report["rows_in"] == kept + clean_report["rejected"] + removed_exact + removed_near,
        }
    return report
