"""Leakage-aware train/validation/test assignment: whole groups, by a seeded hash of the group.

A group is a connected component (scipy's connected_components) of records joined by any of:
- near-duplicate similarity: estimated Jaccard of word shingles >= split.group_threshold
  (lower than dedup.threshold: rows dedup kept as distinct but still alike go to one side),
- the same user prompt (case- and space-insensitive): one question with two answers is one item,
- the same answer (assistant turns, case- and space-insensitive), unless that answer is common
  (in more than max(2, split.ngram_max_df * rows) records, e.g. a bare label "positive"): one
  answer given to two rephrasings of a question is one item (the shipped sample has 23 such
  answers that would otherwise straddle train and test),
- the same value of meta[split.group_by] (conversation id, source document), when set.

The group key is the smallest record id in the group. Ids are derived from content, so the key,
and the side `side_of(key)` = a seeded sha256 of it mapped to [0, 1), do not depend on row order.

Append-stability: adding rows never moves an existing group unless a new row *joins* it to
another group; then the merged group takes the smaller of the keys, so at most the members of the
group whose key changed can move. Rows of groups that no new row touches keep their side.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from stages.lib import minhash

TRAIN, VALIDATION, TEST = 0, 1, 2
SIDE_NAMES = ("train", "validation", "test")
# Below this many records every pair is compared (no LSH miss is possible, and the audit can
# compare train x test exhaustively with the same result); above it, banded LSH.
EXHAUSTIVE_MAX_ROWS = 3000


def side_of(group_key: str, seed: int, test_fraction: float, validation_fraction: float) -> int:
    """TRAIN, VALIDATION or TEST for a group: a pure function of the key, seed and fractions."""
    digest = hashlib.sha256(f"{seed}:{group_key}".encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return TEST
    if u < test_fraction + validation_fraction:
        return VALIDATION
    return TRAIN


# The roles whose text the leakage audit compares train against test (records.ROLES is every role).
COMPARED_ROLES = ("user", "assistant")
_ROLE_NUMBER = {role: number for number, role in enumerate(COMPARED_ROLES)}


class TokenStore:
    """Word hashes of each record's user turns and assistant turns (each role's turns joined),
    spilled to temporary files during the first pass, so that the later passes need neither
    JSON parsing nor tokenising, and memory does not grow with the length of the texts."""

    def __init__(self, directory) -> None:
        from pathlib import Path

        self.paths = {role: Path(directory) / f"{role}.u64" for role in COMPARED_ROLES}
        self._files = {role: open(path, "wb") for role, path in self.paths.items()}
        self._lengths = {role: minhash.GrowingArray(None, np.int64) for role in COMPARED_ROLES}

    def append(self, role: str, hashes: np.ndarray, lengths: np.ndarray) -> None:
        self._files[role].write(hashes.astype(np.uint64).tobytes())
        self._lengths[role].extend(lengths)

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()

    def batches(self, role: str, batch: int = 8192):
        """Yield (first row, word hashes, lengths) for consecutive rows of `role`."""
        lengths = self._lengths[role].array()
        ends = np.cumsum(lengths)
        with open(self.paths[role], "rb") as handle:
            for lo in range(0, len(lengths), batch):
                hi = min(lo + batch, len(lengths))
                count = int(ends[hi - 1] - (ends[lo - 1] if lo else 0))
                yield lo, np.fromfile(handle, dtype=np.uint64, count=count), lengths[lo:hi]


def select_texts(hashes: np.ndarray, lengths: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The word hashes and lengths of the texts where `keep` is True."""
    return hashes[np.repeat(keep, lengths)], lengths[keep]


def distinct_per_text(hashes: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hashes, text index) with each hash once per text (in no particular order)."""
    owner = np.repeat(np.arange(len(lengths)), lengths)
    if len(hashes) == 0:
        return hashes, owner
    # Sort by one 64-bit key of the pair instead of lexsort on two keys (9x faster): equal pairs
    # get equal keys, so they end up side by side; comparing hash and text then keeps exactly one
    # of each (two different pairs sharing a key, p ~ 2^-64, would at worst keep a pair twice).
    with np.errstate(over="ignore"):
        key = hashes ^ (owner.astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9))
    order = np.argsort(key)
    hashes, owner = hashes[order], owner[order]
    first = np.r_[True, (hashes[1:] != hashes[:-1]) | (owner[1:] != owner[:-1])]
    return hashes[first], owner[first]


def unique_counts(values: np.ndarray, weights: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct values, how many times each occurs, or the sum of its `weights`): what
    np.unique(values, return_counts=True) gives, through one plain sort (faster for uint64)."""
    order = np.argsort(values)
    ordered = values[order]
    first = np.r_[True, ordered[1:] != ordered[:-1]] if len(ordered) else np.zeros(0, dtype=bool)
    group = np.cumsum(first) - 1
    counts = np.bincount(group, weights=None if weights is None else weights[order], minlength=int(first.sum()))
    return ordered[first], counts.astype(np.int64)


def batch_document_counts(hashes: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct words, how many of the texts contain each) of a batch of texts."""
    return unique_counts(distinct_per_text(hashes, lengths)[0])


def sequence_keys(hashes: np.ndarray, lengths: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """A 64-bit key per text from its word hashes in order: equal for texts with the same words
    (so up to case, spacing and punctuation). Texts without words get `fallback` (their id), so
    that empty texts are never 'equal' to each other."""
    keys = fallback.astype(np.uint64).copy()
    if len(hashes):
        starts = np.cumsum(lengths) - lengths
        position = (np.arange(len(hashes)) - np.repeat(starts, lengths)).astype(np.uint64)
        with np.errstate(over="ignore"):
            mixed = minhash._mix64(hashes + position * np.uint64(0x9E3779B97F4A7C15))
        nonempty = lengths > 0
        keys[nonempty] = np.add.reduceat(mixed, starts[nonempty], dtype=np.uint64)
    return keys


@dataclass
class SplitIndex:
    """Per-record facts from one streaming pass: a few hundred bytes per record."""

    ids: np.ndarray              # uint64 record ids
    offsets: np.ndarray          # int64 byte offset of each record in the input file
    prompt_keys: np.ndarray      # uint64 key of the user turns' words (sequence_keys)
    answer_keys: np.ndarray      # uint64 key of the assistant turns' words
    fingerprints: np.ndarray     # (n, num_perm) uint16 MinHash fingerprints
    band_keys: Optional[np.ndarray]  # (n, bands) LSH keys, None when comparing exhaustively
    group_values: list = field(default_factory=list)  # meta[group_by] (JSON text) or None, per record
    tokens: Optional[TokenStore] = None


@dataclass
class _BatchFacts:
    """What one batch of records contributes to a SplitIndex (computed in a worker thread)."""

    ids: np.ndarray
    offsets: np.ndarray
    keys: dict                   # role -> uint64 sequence keys
    fingerprints: np.ndarray
    band_keys: Optional[np.ndarray]
    role_hashes: dict            # role -> word hashes of that role's turns, record after record
    role_lengths: dict           # role -> words per record
    role_vocabulary: dict        # role -> batch_document_counts(role_hashes, role_lengths)
    group_values: list


def _batch_facts(batch: minhash.LineBatch, hasher: minhash.MinHasher, layout: Optional[minhash.Bands],
                 group_by: Optional[str]) -> _BatchFacts:
    records = minhash.parse_batch(batch)
    batch_offsets = batch.offsets
    batch_ids = minhash.ids_to_uint64([r["id"] for r in records])
    # Tokenise every user/assistant turn once; similarity, keys and n-grams all reuse it.
    contents, message_role, message_owner = [], [], []
    for position, record in enumerate(records):
        for message in record["messages"]:
            role = _ROLE_NUMBER.get(message["role"])
            if role is not None:
                contents.append(message["content"])
                message_role.append(role)
                message_owner.append(position)
    word_hashes, message_length = hasher.words.hash_texts(contents)
    message_role, message_owner = np.array(message_role, dtype=np.int64), np.array(message_owner, dtype=np.int64)
    record_length = np.bincount(message_owner, weights=message_length, minlength=len(records)).astype(np.int64)
    signatures = hasher.signatures_from_word_hashes(word_hashes, record_length)
    token_role = np.repeat(message_role, message_length)
    keys, role_hashes, role_lengths, role_vocabulary = {}, {}, {}, {}
    for number, role in enumerate(COMPARED_ROLES):
        mine = message_role == number
        role_lengths[role] = np.bincount(message_owner[mine], weights=message_length[mine],
                                         minlength=len(records)).astype(np.int64)
        role_hashes[role] = word_hashes[token_role == number]
        keys[role] = sequence_keys(role_hashes[role], role_lengths[role], batch_ids)
        role_vocabulary[role] = batch_document_counts(role_hashes[role], role_lengths[role])
    group_values = []
    if group_by:
        for r in records:
            value = r.get("meta", {}).get(group_by)
            group_values.append(None if value is None else json.dumps(value, sort_keys=True))
    return _BatchFacts(batch_ids, np.array(batch_offsets, dtype=np.int64), keys, minhash.fingerprint(signatures),
                       minhash.band_keys(signatures, layout) if layout is not None else None,
                       role_hashes, role_lengths, role_vocabulary, group_values)


def build_index(path, hasher: minhash.MinHasher, layout: Optional[minhash.Bands], group_by: Optional[str],
                tokens: TokenStore, progress=None, observers=None, expected_rows: int = 1024,
                workers: Optional[int] = None) -> SplitIndex:
    """One pass over a records file. Word hashes of each role go to `tokens`, and each batch's
    document counts of words to the `observers` (per role, objects with `add_counts(words,
    counts, records)`, e.g. the audit's word counts).
    Batches are parsed, tokenised and hashed by `workers` processes (default:
    parallel.default_workers) while this one reads the next lines; results are taken in file order."""
    import functools

    from stages.lib.parallel import ordered_map

    rows = expected_rows
    ids = minhash.GrowingArray(None, np.uint64, rows)
    offsets = minhash.GrowingArray(None, np.int64, rows)
    keys = {role: minhash.GrowingArray(None, np.uint64, rows) for role in COMPARED_ROLES}
    fingerprints = minhash.GrowingArray(hasher.num_perm, np.uint16, rows)
    band_keys = minhash.GrowingArray(layout.bands, np.uint32, rows) if layout else None
    group_values = []
    facts_of = functools.partial(_batch_facts, hasher=hasher, layout=layout, group_by=group_by)
    for facts in ordered_map(facts_of, minhash.read_batches(path), workers):
        ids.extend(facts.ids)
        offsets.extend(facts.offsets)
        fingerprints.extend(facts.fingerprints)
        if band_keys is not None:
            band_keys.extend(facts.band_keys)
        for role in COMPARED_ROLES:
            keys[role].extend(facts.keys[role])
            tokens.append(role, facts.role_hashes[role], facts.role_lengths[role])
            if observers:
                observers[role].add_counts(*facts.role_vocabulary[role], len(facts.ids))
        group_values.extend(facts.group_values)
        if progress is not None:
            progress.update(len(facts.ids))
    tokens.close()
    return SplitIndex(ids.array(), offsets.array(), keys["user"].array(), keys["assistant"].array(),
                      fingerprints.array(), band_keys.array() if band_keys is not None else None,
                      group_values, tokens)


def all_pairs_above(fingerprints: np.ndarray, threshold: float, left: Optional[np.ndarray] = None,
                    right: Optional[np.ndarray] = None, block: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (i, j) with estimated Jaccard >= threshold, compared exhaustively.

    Without `left`/`right`: all pairs i < j of all rows. With them: pairs of a row in `left` and
    a row in `right` (as (left_row, right_row)). Cost: len(left) * len(right) * num_perm bytes
    compared, in blocks so the temporary array stays small."""
    n = len(fingerprints)
    within = left is None
    left = np.arange(n) if left is None else left
    right = np.arange(n) if right is None else right
    found, sims = [], []
    need = int(np.ceil(threshold * fingerprints.shape[1] - 1e-9))
    right_prints = fingerprints[right]
    for lo in range(0, len(left), block):
        rows = left[lo:lo + block]
        equal = (fingerprints[rows][:, None, :] == right_prints[None, :, :]).sum(axis=2, dtype=np.int32)
        hit_rows, hit_cols = np.nonzero(equal >= need)
        a, b = rows[hit_rows], right[hit_cols]
        keep = a < b if within else np.ones(len(a), dtype=bool)
        found.append(np.stack([a[keep], b[keep]], axis=1))
        sims.append(equal[hit_rows, hit_cols][keep] / fingerprints.shape[1])
    if not found:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0)
    return np.concatenate(found).astype(np.int64), np.concatenate(sims)


def similar_pairs(index: SplitIndex, threshold: float) -> tuple[np.ndarray, np.ndarray, int]:
    """(pairs, similarities, number of pairs compared) of records at least `threshold` alike."""
    if index.band_keys is None:
        pairs, sims = all_pairs_above(index.fingerprints, threshold)
        n = len(index.ids)
        return pairs, sims, n * (n - 1) // 2
    return minhash.verified_pairs(index.band_keys, index.fingerprints, threshold)


def equal_value_edges(values) -> np.ndarray:
    """Edges joining every row to the first row with the same value (None joins nothing)."""
    first: dict = {}
    edges = []
    for row, value in enumerate(values):
        if value is None:
            continue
        head = first.setdefault(value, row)
        if head != row:
            edges.append((head, row))
    return np.array(edges, dtype=np.int64).reshape(-1, 2)


def common_cutoff(n_rows: int, max_df: float) -> int:
    """Text in more than this many records is common (boilerplate), not a sign of one item."""
    return max(2, int(max_df * n_rows))


def equal_key_edges(keys: np.ndarray, max_count: Optional[int] = None) -> np.ndarray:
    """Edges joining every row to the first row with the same uint64 key (vectorised); keys
    shared by more than `max_count` rows join nothing."""
    _, first, inverse, counts = np.unique(keys, return_index=True, return_inverse=True, return_counts=True)
    heads = first[inverse]
    joined = heads != np.arange(len(keys))
    if max_count is not None:
        joined &= counts[inverse] <= max_count
    rows = np.nonzero(joined)[0]
    return np.stack([heads[rows], rows], axis=1).astype(np.int64)


def connected_groups(n: int, edges: np.ndarray) -> np.ndarray:
    """Component label per row: the smallest row index of its connected component under `edges`
    (pairs of row indices), by scipy's connected components (linear in rows + edges)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rows = np.arange(n, dtype=np.int64)
    if len(edges) == 0:
        return rows
    graph = coo_matrix((np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    smallest = np.full(component.max() + 1, n, dtype=np.int64)
    np.minimum.at(smallest, component, rows)
    return smallest[component]


def group_key_per_row(ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The smallest record id of each row's group (uint64)."""
    smallest = np.full(labels.max() + 1 if len(labels) else 0, np.iinfo(np.uint64).max, dtype=np.uint64)
    np.minimum.at(smallest, labels, ids)
    return smallest[labels]


def assign_sides(group_keys: np.ndarray, seed: int, test_fraction: float, validation_fraction: float) -> np.ndarray:
    """side_of for every row's group key (uint64), the hashing done once per group and the
    thresholds compared in numpy (tests/test_splitting.py checks it against side_of)."""
    unique_keys, inverse = np.unique(group_keys, return_inverse=True)
    sha256 = hashlib.sha256
    prefixes = b"".join([sha256(b"%d:%016x" % (seed, key)).digest()[:8] for key in unique_keys.tolist()])
    u = np.frombuffer(prefixes, dtype=">u8").astype(np.float64) / 2**64
    sides = np.where(u < test_fraction, TEST, np.where(u < test_fraction + validation_fraction, VALIDATION, TRAIN))
    return sides.astype(np.int8)[inverse]


@dataclass
class Grouping:
    sides: np.ndarray          # int8 TRAIN/VALIDATION/TEST per row
    group_keys: np.ndarray     # uint64 group key per row
    near_pairs: int            # similar pairs joined
    candidates: int            # pairs compared to find them
    method: str                # "exhaustive" or "lsh"
    similar: Optional[np.ndarray] = None          # the similar pairs joined (the audit reuses them)
    joined: Optional[dict] = None                 # edges per reason


def split_groups(index: SplitIndex, params) -> Grouping:
    """Group the records and assign each group a side (params: the `split` section)."""
    pairs, _, compared = similar_pairs(index, params.group_threshold)
    common = common_cutoff(len(index.ids), params.ngram_max_df)
    edges = {"near_duplicate": pairs, "same_prompt": equal_key_edges(index.prompt_keys),
             "same_answer": equal_key_edges(index.answer_keys, common)}
    if index.group_values:
        edges["group_by"] = equal_value_edges(index.group_values)
    labels = connected_groups(len(index.ids), np.concatenate(list(edges.values())))
    group_keys = group_key_per_row(index.ids, labels)
    sides = assign_sides(group_keys, params.seed, params.test_fraction, params.validation_fraction)
    return Grouping(sides, group_keys, len(pairs), compared, "exhaustive" if index.band_keys is None else "lsh",
                    pairs, {reason: int(len(e)) for reason, e in edges.items()})


def group_layout(n_rows_hint: Optional[int], threshold: float, num_perm: int) -> Optional[minhash.Bands]:
    """None (compare every pair) for small inputs, else a recall-leaning LSH layout."""
    if n_rows_hint is not None and n_rows_hint <= EXHAUSTIVE_MAX_ROWS:
        return None
    return minhash.optimal_bands(threshold, num_perm, *minhash.RECALL_WEIGHTS)
