"""Leakage-aware train/validation/test assignment: whole groups, by a seeded hash of the group.

A group is a connected component (scipy's connected_components) of records joined by any of the
relations the leakage audit (stages/lib/audit.py) checks, so that a split cannot leak what the
audit would find:
- near-duplicate similarity: estimated Jaccard of word shingles >= split.group_threshold
  (lower than dedup.threshold: rows dedup kept as distinct but still alike go to one side).
  Rows dedup *removed* as near duplicates take part too (their fingerprints come from dedup's
  signatures file): a removed row still joins the row it duplicates and any row it resembles,
  so two kept prompts one word apart, linked only through a removed row, stay together,
- the same user prompt (case- and space-insensitive): one question with two answers is one item,
- the same answer (assistant turns, case- and space-insensitive), unless that answer is common
  (in more than max(2, split.ngram_max_df * rows) records, e.g. a bare label "positive"): one
  answer given to two rephrasings of a question is one item (the shipped sample has 23 such
  answers that would otherwise straddle train and test),
- a shared run of split.ngram content words in the user turns, or in the assistant turns, with
  the audit's boilerplate rule (words and n-grams in more than the document-frequency cutoff
  are template text, not a link): found through an n-gram index, partitioned by hash so memory
  stays bounded, never by comparing all pairs,
- a conversation prefix: a chat whose user/assistant turns (case, spacing and punctuation
  aside) are the opening turns of another chat (a short chat that opens a longer one), unless
  that opening is common (same cutoff),
- the same value of meta[split.group_by] (conversation id, source document), when set, compared
  as normalised text (`group_value_text`: 1 from JSONL and "1" from CSV are one group).

A giant component (one group holding most of the rows) is reported with its size and the links
that made it (`Grouping.largest`), so that a user sees which relation chained the data together.

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


def group_value_text(value) -> Optional[str]:
    """meta[split.group_by] as the text that is compared: equal for 1 (JSONL), "1" and " 1 " (CSV),
    1.0 and "1.0"; None, "" and whitespace belong to no group. Numbers and number-like strings
    are written in one canonical decimal form; other strings are NFC-normalised and stripped;
    lists and objects are compared as sorted JSON. Grouping more than needed is the safe side:
    ids "007" and "7" become one group."""
    import decimal
    import unicodedata

    if value is None or isinstance(value, bool):
        return None if value is None else ("true" if value else "false")
    if isinstance(value, (int, float)):
        text = repr(value)
    elif isinstance(value, str):
        text = unicodedata.normalize("NFC", value).strip()
        if not text:
            return None
    else:
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    try:
        number = decimal.Decimal(text)
    except (decimal.InvalidOperation, ValueError):
        return text
    if not number.is_finite():
        return text
    canonical = format(number.normalize(), "f")
    return "0" if canonical in ("-0", "0") else canonical


@dataclass
class SplitIndex:
    """Per-record facts from one streaming pass: a few hundred bytes per record."""

    ids: np.ndarray              # uint64 record ids
    offsets: np.ndarray          # int64 byte offset of each record in the input file
    prompt_keys: np.ndarray      # uint64 key of the user turns' words (sequence_keys)
    answer_keys: np.ndarray      # uint64 key of the assistant turns' words
    fingerprints: np.ndarray     # (n, num_perm) uint16 MinHash fingerprints
    band_keys: Optional[np.ndarray]  # (n, bands) LSH keys, None when comparing exhaustively
    group_values: list = field(default_factory=list)  # group_value_text(meta[group_by]) or None, per record
    tokens: Optional[TokenStore] = None
    chat_keys: Optional[np.ndarray] = None      # uint64 key of all user/assistant turns, in order
    prefix_keys: Optional[np.ndarray] = None    # uint64 key of each proper opening (1..m-1 turns) ...
    prefix_rows: Optional[np.ndarray] = None    # ... and the row it opens
    removed: Optional["RemovedRows"] = None     # rows dedup removed as near duplicates


@dataclass
class RemovedRows:
    """Rows dedup removed as near duplicates, from its signatures file: they are not split, but
    they still link the rows they resemble."""

    ids: np.ndarray              # uint64
    fingerprints: np.ndarray     # (m, num_perm) uint16
    duplicates: np.ndarray       # int64 row (in the split index) of the kept row each duplicates


def widen_fingerprints(fingerprints: np.ndarray) -> np.ndarray:
    """uint16 fingerprints as the uint32 signatures band_keys takes: a text without words (all
    0xFFFF) keeps its 'no words' marker, so it collides with nothing."""
    wide = fingerprints.astype(np.uint32)
    wide[np.all(fingerprints == np.iinfo(np.uint16).max, axis=1)] = np.iinfo(np.uint32).max
    return wide


def fingerprint_band_keys(fingerprints: np.ndarray, layout: minhash.Bands, chunk: int = 8192) -> np.ndarray:
    """LSH band keys of uint16 fingerprints, a chunk of rows at a time (band_keys' temporaries
    are 16 bytes per signature value: whole-array, 1M rows would need GBs)."""
    keys = np.zeros((len(fingerprints), layout.bands), dtype=np.uint32)
    for lo in range(0, len(fingerprints), chunk):
        keys[lo:lo + chunk] = minhash.band_keys(widen_fingerprints(fingerprints[lo:lo + chunk]), layout)
    return keys


def attach_signatures(index: SplitIndex, signatures: "minhash.Signatures", layout: Optional[minhash.Bands],
                      path: str = "signatures") -> None:
    """Take the fingerprints (and removed rows) from dedup's signatures file into `index`.
    RecordFileError when the file does not describe the records that were indexed."""
    kept = signatures.duplicate_of < 0
    if int(kept.sum()) != len(index.ids) or not np.array_equal(signatures.ids[kept], index.ids):
        raise minhash.RecordFileError(f"{path} does not match the dedup records (the files come from different "
                                      "dedup runs); re-run dedup")
    index.fingerprints = signatures.fingerprints[kept]
    index.band_keys = fingerprint_band_keys(index.fingerprints, layout) if layout else None
    near = np.nonzero(signatures.kind == minhash.NEAR)[0]
    # Follow each removed row to the kept row at the end of its chain, then to its split row.
    target = signatures.duplicate_of.copy()
    rows = np.arange(len(target))
    target[kept] = rows[kept]
    for _ in range(64):
        following = target[target]
        if np.array_equal(following, target):
            break
        target = following
    split_row = np.cumsum(kept) - 1
    index.removed = RemovedRows(signatures.ids[near], signatures.fingerprints[near], split_row[target[near]])


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
    chat_keys: np.ndarray
    prefix_keys: np.ndarray
    prefix_rows: np.ndarray      # row within the batch


def turn_prefix_keys(word_hashes: np.ndarray, message_length: np.ndarray, message_role: np.ndarray,
                     message_owner: np.ndarray, record_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(chat key per record, proper opening keys, their record) from the compared turns in order.

    A turn's key is its role and words (case, spacing and punctuation aside, as sequence_keys);
    the key of the first k turns folds the turn keys in order, so record S's chat key equals one
    of record L's opening keys exactly when S's turns are L's first turns. A turn without words
    gets a key of its own (record id and position), so it matches nothing."""
    n_messages = len(message_length)
    position = np.arange(n_messages) - np.searchsorted(message_owner, message_owner)
    with np.errstate(over="ignore"):
        fallback = minhash._mix64(record_ids[message_owner] ^ minhash._mix64(position.astype(np.uint64) + np.uint64(1)))
        turn = sequence_keys(word_hashes, message_length, fallback)
        turn = minhash._mix64(turn ^ (message_role.astype(np.uint64) + np.uint64(1)) * np.uint64(0xD6E8FEB86659FD93))
    chat = minhash._mix64(record_ids.astype(np.uint64) ^ np.uint64(0xC0FFEE))   # no turns: a key of its own
    prefix = np.zeros(n_messages, dtype=np.uint64)
    running, owner_before = np.uint64(0), -1
    turn_list, owners = turn.tolist(), message_owner.tolist()
    values = [0] * n_messages
    mask = (1 << 64) - 1
    for i in range(n_messages):
        if owners[i] != owner_before:
            running, owner_before = 0x9E3779B97F4A7C15, owners[i]
        running = (running * 0xBF58476D1CE4E5B9 + turn_list[i]) & mask
        running ^= running >> 31
        values[i] = running
    prefix[:] = np.array(values, dtype=np.uint64) if n_messages else prefix
    last = np.r_[message_owner[1:] != message_owner[:-1], True] if n_messages else np.zeros(0, dtype=bool)
    chat[message_owner[last]] = prefix[last]
    return chat, prefix[~last], message_owner[~last]


def _batch_facts(batch: minhash.LineBatch, hasher: Optional[minhash.MinHasher], layout: Optional[minhash.Bands],
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
    word_hashes, message_length = minhash.WordHasher().hash_texts(contents)
    message_role, message_owner = np.array(message_role, dtype=np.int64), np.array(message_owner, dtype=np.int64)
    record_length = np.bincount(message_owner, weights=message_length, minlength=len(records)).astype(np.int64)
    # Fingerprints come from dedup's signatures file (attach_signatures); computed here only
    # when a hasher is given (library use without a dedup run).
    fingerprints = (minhash.fingerprint(hasher.signatures_from_word_hashes(word_hashes, record_length))
                    if hasher is not None else None)
    chat_keys, prefix_keys, prefix_rows = turn_prefix_keys(word_hashes, message_length, message_role,
                                                           message_owner, batch_ids)
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
            meta = r.get("meta")
            group_values.append(group_value_text(meta.get(group_by)) if isinstance(meta, dict) else None)
    return _BatchFacts(batch_ids, np.array(batch_offsets, dtype=np.int64), keys, fingerprints, None,
                       role_hashes, role_lengths, role_vocabulary, group_values, chat_keys, prefix_keys, prefix_rows)


def build_index(path, hasher: Optional[minhash.MinHasher], layout: Optional[minhash.Bands], group_by: Optional[str],
                tokens: TokenStore, progress=None, observers=None, expected_rows: int = 1024,
                workers: Optional[int] = None) -> SplitIndex:
    """One pass over a records file. Word hashes of each role go to `tokens`, and each batch's
    document counts of words to the `observers` (per role, objects with `add_counts(words,
    counts, records)`, e.g. the audit's word counts). `hasher` None: no fingerprints are
    computed; the split stage takes them from dedup's signatures file (attach_signatures).
    Batches are parsed, tokenised and hashed by `workers` processes (default:
    parallel.default_workers) while this one reads the next lines; results are taken in file order."""
    import functools

    from stages.lib.parallel import ordered_map

    rows = expected_rows
    ids = minhash.GrowingArray(None, np.uint64, rows)
    offsets = minhash.GrowingArray(None, np.int64, rows)
    keys = {role: minhash.GrowingArray(None, np.uint64, rows) for role in COMPARED_ROLES}
    fingerprints = minhash.GrowingArray(hasher.num_perm, np.uint16, rows) if hasher is not None else None
    chat_keys = minhash.GrowingArray(None, np.uint64, rows)
    prefix_keys = minhash.GrowingArray(None, np.uint64, rows)
    prefix_rows = minhash.GrowingArray(None, np.int64, rows)
    group_values = []
    facts_of = functools.partial(_batch_facts, hasher=hasher, layout=layout, group_by=group_by)
    for facts in ordered_map(facts_of, minhash.read_batches(path), workers):
        ids.extend(facts.ids)
        if fingerprints is not None:
            fingerprints.extend(facts.fingerprints)
        chat_keys.extend(facts.chat_keys)
        prefix_keys.extend(facts.prefix_keys)
        prefix_rows.extend(facts.prefix_rows + len(offsets.array()))
        offsets.extend(facts.offsets)
        for role in COMPARED_ROLES:
            keys[role].extend(facts.keys[role])
            tokens.append(role, facts.role_hashes[role], facts.role_lengths[role])
            if observers:
                observers[role].add_counts(*facts.role_vocabulary[role], len(facts.ids))
        group_values.extend(facts.group_values)
        if progress is not None:
            progress.update(len(facts.ids))
    tokens.close()
    prints = fingerprints.array() if fingerprints is not None else None
    band_keys = fingerprint_band_keys(prints, layout) if layout is not None and prints is not None else None
    return SplitIndex(ids.array(), offsets.array(), keys["user"].array(), keys["assistant"].array(),
                      prints, band_keys, group_values, tokens,
                      chat_keys.array(), prefix_keys.array(), prefix_rows.array())


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
    """(pairs, similarities, number of pairs compared) of records at least `threshold` alike,
    over the kept rows and then the removed ones (rows n.. of `all_fingerprints(index)`).
    Every pair is compared when the index was built without LSH and the removed rows do not
    more than double the count; else banded LSH over all of them."""
    prints = all_fingerprints(index)
    total = len(prints)
    if index.band_keys is None and total <= 2 * EXHAUSTIVE_MAX_ROWS:
        pairs, sims = all_pairs_above(prints, threshold)
        return pairs, sims, total * (total - 1) // 2
    if index.removed is None or len(index.removed.ids) == 0:
        keys = index.band_keys
        if keys is None:
            keys = fingerprint_band_keys(prints, group_layout(None, threshold, prints.shape[1]))
    else:
        layout = group_layout(None, threshold, prints.shape[1])
        keys = fingerprint_band_keys(prints, layout)
    return minhash.verified_pairs(keys, prints, threshold)


def all_fingerprints(index: SplitIndex) -> np.ndarray:
    if index.removed is None or len(index.removed.ids) == 0:
        return index.fingerprints
    return np.concatenate([index.fingerprints, index.removed.fingerprints])


def ngram_edges(index: SplitIndex, role: str, n: int, max_df: float, skip: np.ndarray,
                max_ngrams_in_memory: int = 1 << 21) -> np.ndarray:
    """Edges joining the rows that share a run of `n` content words in `role`'s turns, by the
    audit's boilerplate rule: words in `skip` (the role's frequent words, audit.WordFrequency)
    are dropped before n-grams are formed, and an n-gram in more than common_cutoff rows joins
    nothing. An n-gram index, not a comparison of pairs: (n-gram hash, row) pairs are sorted and
    each row is joined to the first row of its n-gram. The n-gram hashes are partitioned by
    value into passes over the token store, so at most about `max_ngrams_in_memory` pairs are
    held at once (about 50 bytes each with the sort, ~100 MB at the default) whatever the
    dataset size."""
    cutoff = common_cutoff(len(index.ids), max_df)
    lengths_total = int(sum(int(lengths.sum()) for _, _, lengths in index.tokens.batches(role, 1 << 20)))
    passes = max(1, -(-lengths_total // max_ngrams_in_memory))
    edges = []
    for part in range(passes):
        hashes_parts, rows_parts = [], []
        for lo, hashes, lengths in index.tokens.batches(role):
            if len(skip) and len(hashes):
                keep = ~np.isin(hashes, skip)
                owner = np.repeat(np.arange(len(lengths)), lengths)
                lengths = np.bincount(owner[keep], minlength=len(lengths)).astype(np.int64)
                hashes = hashes[keep]
            grams, counts = minhash.ngram_hashes(hashes, lengths, n, short=False)
            grams, owner = distinct_per_text(grams, counts)
            if passes > 1:
                mine = (grams % np.uint64(passes)) == np.uint64(part)
                grams, owner = grams[mine], owner[mine]
            hashes_parts.append(grams)
            rows_parts.append(owner + lo)
        if not hashes_parts:
            continue
        grams, rows = np.concatenate(hashes_parts), np.concatenate(rows_parts).astype(np.int64)
        order = np.argsort(grams, kind="stable")   # rows stay in order within an n-gram
        grams, rows = grams[order], rows[order]
        first = np.r_[True, grams[1:] != grams[:-1]] if len(grams) else np.zeros(0, dtype=bool)
        run = np.cumsum(first) - 1
        run_start = np.nonzero(first)[0]
        size = np.bincount(run, minlength=len(run_start))
        joined = ~first & (size[run] <= cutoff)
        edges.append(np.stack([rows[run_start[run[joined]]], rows[joined]], axis=1))
    # Rows sharing several n-grams (a pasted passage gives n-grams by the dozen): one edge per pair.
    if not edges:
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(np.sort(np.concatenate(edges), axis=1), axis=0)   # (smaller row, larger row)


def prefix_edges(index: SplitIndex, max_count: int) -> np.ndarray:
    """Edges joining a chat to every chat it opens (its turns are their first turns), unless it
    opens more than `max_count` of them (a stock greeting exchange, not one item)."""
    if index.prefix_keys is None or len(index.prefix_keys) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    order = np.argsort(index.prefix_keys, kind="stable")
    keys, rows = index.prefix_keys[order], index.prefix_rows[order]
    lo = np.searchsorted(keys, index.chat_keys, side="left")
    hi = np.searchsorted(keys, index.chat_keys, side="right")
    count = hi - lo
    opener = np.nonzero((count > 0) & (count <= max_count))[0]
    if len(opener) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    repeat = count[opener]
    within = np.arange(int(repeat.sum())) - np.repeat(np.cumsum(repeat) - repeat, repeat)
    opened = rows[np.repeat(lo[opener], repeat) + within]
    return np.stack([np.repeat(opener, repeat), opened], axis=1).astype(np.int64)


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
    similar: Optional[np.ndarray] = None          # the similar pairs of kept rows (the audit reuses them)
    joined: Optional[dict] = None                 # edges per reason
    largest: Optional[dict] = None                # the largest group: size, share, links that made it
    labels: Optional[np.ndarray] = None           # component label per kept row
    removed_pairs: Optional[np.ndarray] = None    # similar pairs with a removed row (node n + j)


GIANT_SHARE = 0.5   # a group with more than this share of the rows is reported as giant


def split_groups(index: SplitIndex, params, word_counts: Optional[dict] = None) -> Grouping:
    """Group the records and assign each group a side (params: the `split` section).

    `word_counts` (role -> audit.WordFrequency over all rows) turns on the n-gram links; the
    split stage always passes it, a caller without it gets the other relations only."""
    n = len(index.ids)
    removed = index.removed if index.removed is not None else RemovedRows(
        np.zeros(0, np.uint64), np.zeros((0, index.fingerprints.shape[1]), np.uint16), np.zeros(0, np.int64))
    pairs, _, compared = similar_pairs(index, params.group_threshold)
    common = common_cutoff(n, params.ngram_max_df)
    edges = {"near_duplicate": pairs, "same_prompt": equal_key_edges(index.prompt_keys),
             "same_answer": equal_key_edges(index.answer_keys, common)}
    if len(removed.ids):
        # A removed row (node n + j) still joins the kept row it duplicates.
        edges["removed_duplicate"] = np.stack([removed.duplicates, n + np.arange(len(removed.ids))], axis=1)
    if word_counts is not None:
        for role in COMPARED_ROLES:
            edges[f"ngram_{role}"] = ngram_edges(index, role, params.ngram, params.ngram_max_df,
                                                 word_counts[role].frequent(params.ngram_max_df))
    edges["prefix"] = prefix_edges(index, common)
    if index.group_values:
        edges["group_by"] = equal_value_edges(index.group_values)
    nodes = n + len(removed.ids)
    labels = connected_groups(nodes, np.concatenate(list(edges.values())).astype(np.int64))
    # The key is the smallest *kept* id of the group (a removed row is not split).
    key_ids = np.concatenate([index.ids, np.full(len(removed.ids), np.iinfo(np.uint64).max, dtype=np.uint64)])
    group_keys = group_key_per_row(key_ids, labels)[:n]
    sides = assign_sides(group_keys, params.seed, params.test_fraction, params.validation_fraction)
    kept_pairs = pairs[(pairs[:, 0] < n) & (pairs[:, 1] < n)] if len(pairs) else pairs
    method = "exhaustive" if index.band_keys is None and nodes <= 2 * EXHAUSTIVE_MAX_ROWS else "lsh"
    return Grouping(sides, group_keys, len(pairs), compared, method, kept_pairs,
                    {reason: int(len(e)) for reason, e in edges.items()},
                    _largest_group(index, removed, labels, edges, n), labels[:n],
                    pairs[(pairs[:, 0] >= n) | (pairs[:, 1] >= n)] if len(pairs) else pairs)


def _largest_group(index: SplitIndex, removed: RemovedRows, labels: np.ndarray, edges: dict, n: int,
                   examples: int = 3) -> dict:
    """Size and share of the largest group, and how many links of each relation lie inside it
    (with a few example pairs): when one group swallows most of the data, this says which
    relation chained it together."""
    kept_labels = labels[:n]
    values, counts = np.unique(kept_labels, return_counts=True)
    top = values[np.argmax(counts)]
    size = int(counts.max())

    def row_id(node: int) -> str:
        return minhash.uint64_to_id(index.ids[node] if node < n else removed.ids[node - n])

    links, shown = {}, {}
    for reason, pairs in edges.items():
        if len(pairs) == 0:
            continue
        inside = pairs[labels[pairs[:, 0]] == top]
        if len(inside):
            links[reason] = int(len(inside))
            shown[reason] = [[row_id(int(a)), row_id(int(b))] for a, b in inside[:examples].tolist()]
    return {"rows": size, "share": round(size / n, 4), "giant": size > GIANT_SHARE * n and n > 1,
            "links": links, "example_links": shown}


def group_layout(n_rows_hint: Optional[int], threshold: float, num_perm: int) -> Optional[minhash.Bands]:
    """None (compare every pair) for small inputs, else a recall-leaning LSH layout."""
    if n_rows_hint is not None and n_rows_hint <= EXHAUSTIVE_MAX_ROWS:
        return None
    return minhash.optimal_bands(threshold, num_perm, *minhash.RECALL_WEIGHTS)
