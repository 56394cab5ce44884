"""Leakage audit of a split: is any test example, or a near copy of it, also in train/validation?

Seven checks, each giving (other_row, test_row) pairs, where other_row is a train or validation row:
- exact_prompt / exact_answer: the same words in the user turns / in the assistant turns (case,
  spacing and punctuation aside; an answer shared by more rows than the boilerplate cutoff below
  is a common answer, a bare label say, and is skipped);
- near_duplicate: estimated Jaccard of word shingles >= split.group_threshold;
- near_duplicate_via_removed: a row dedup removed is that similar to a test row while the row it
  duplicates is in train/validation (or the other way round): the removed row is the link;
- prefix: a chat whose user/assistant turns are the opening turns of a chat on the other side
  (an opening shared by more rows than the boilerplate cutoff is skipped);
- ngram_user / ngram_assistant: a shared run of split.ngram words in user turns / in assistant
  turns (compared separately: a question copied into an answer is not the leak this looks for).
  System prompts are left out: one prompt shared by every row is not a leak.

The grouping in splitting.py joins rows by every one of these relations, so a correct split
passes every check; each check here is a re-computation by other code (train x test only, from
the test side's point of view) that guards the grouping.

Boilerplate rule (split.ngram_max_df, default 0.01): text found in more than
max(floor, ngram_max_df * rows) records is boilerplate, never evidence of leakage. It is applied
to words first (floor 10, see WORD_DF_FLOOR), then to whole n-grams (floor 2):
- words: the words of a role that occur in more than that many records (JSON keys and label
  values, greetings, "the", "please") are dropped before n-grams are formed, so an n-gram is a run
  of n *content* words. A DF cutoff on whole n-grams alone is not enough for structured answers:
  the n-gram `category billing priority high product router sentiment negative summary ...` of a
  triage answer is shared only by the rows with that label combination, a fraction of a percent
  of the data each, yet it is no sign of copying. Measured on the shipped sample (1.8k rows):
  13-grams of raw words flag train/test pairs that are all template text ("is there a rust
  example for calling v2 readings on your developer api", "category billing priority medium
  product subscription sentiment negative summary ..."): 379 pairs on a first version of the
  sample, 13 on the current one; 13-grams of content words flag none, while a passage pasted
  from a test row into a training row still shares runs of its content words (tests/test_audit.py).
- n-grams: an n-gram of content words in more than that many records (a product list pasted into
  every answer) is dropped too.
A copied test example links it to one or a few other rows; text that recurs across a larger
share of the data is a template the model is meant to learn. The floor of 2 keeps a pair of rows
sharing a passage countable however small the dataset.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stages.lib import minhash
from stages.lib.splitting import (COMPARED_ROLES, TEST, SplitIndex, all_pairs_above, batch_document_counts, distinct_per_text,
                                  select_texts, unique_counts)
from stages.lib.text import word_bytes

# On a small dataset a share of rows is a handful of rows: "in more than 1% of 200 rows" would
# make every word used three times boilerplate. A word is boilerplate only if it is also in more
# than this many records; n-grams keep the floor of 2.
WORD_DF_FLOOR = 10
MAX_PAIRS = 5_000_000   # pairs enumerated per check at most; beyond, the count is a lower bound


@dataclass
class Check:
    pairs: np.ndarray          # (m, 2) int64 (other_row, test_row), distinct
    truncated: bool = False
    detail: dict | None = None


def _cross_side(pairs: np.ndarray, sides: np.ndarray) -> np.ndarray:
    """Pairs with exactly one test row, oriented (other, test)."""
    if len(pairs) == 0:
        return pairs.reshape(0, 2)
    a_test, b_test = sides[pairs[:, 0]] == TEST, sides[pairs[:, 1]] == TEST
    cross = a_test != b_test
    oriented = np.where(a_test[cross, None], pairs[cross][:, ::-1], pairs[cross])
    return _distinct(oriented)


def _distinct(pairs: np.ndarray) -> np.ndarray:
    if len(pairs) == 0:
        return pairs.reshape(0, 2).astype(np.int64)
    return np.unique(pairs.astype(np.int64), axis=0)


def exact_check(keys: np.ndarray, sides: np.ndarray, max_count: int | None = None) -> Check:
    """Rows with equal keys (same prompt, or same answer) across sides; keys shared by more than
    `max_count` rows are common text, not a leak, and are skipped."""
    values, counts = np.unique(keys, return_counts=True)
    repeated = counts > 1
    if max_count is not None:
        repeated &= counts <= max_count
    by_key: dict[int, list[int]] = {}
    for row in np.nonzero(np.isin(keys, values[repeated]))[0].tolist():
        by_key.setdefault(int(keys[row]), []).append(row)
    pairs = [(other, test) for rows in by_key.values()
             for test in rows if sides[test] == TEST
             for other in rows if sides[other] != TEST]
    return Check(_distinct(np.array(pairs, dtype=np.int64).reshape(-1, 2)))


def near_duplicate_check(index: SplitIndex, sides: np.ndarray, threshold: float,
                         similar: np.ndarray | None = None) -> Check:
    """Train/validation x test pairs with estimated Jaccard >= threshold.

    When grouping compared every pair (inputs up to EXHAUSTIVE_MAX_ROWS), this compares every
    train x test pair again, independently. On larger inputs it checks the LSH-verified similar
    pairs (`similar`, from the grouping) for any that ended on two sides: a guard on the group
    assignment, not a second search (LSH recall at the threshold is in the report's layout)."""
    test = np.nonzero(sides == TEST)[0]
    other = np.nonzero(sides != TEST)[0]
    if index.band_keys is None:
        pairs, _ = all_pairs_above(index.fingerprints, threshold, left=other, right=test)
        return Check(_distinct(pairs), detail={"method": "exhaustive", "compared": int(len(test) * len(other))})
    if similar is None:
        similar, _, _ = minhash.verified_pairs(index.band_keys, index.fingerprints, threshold)
    return Check(_cross_side(similar, sides), detail={"method": "lsh", "compared": int(len(similar))})


def removed_link_check(index: SplitIndex, sides: np.ndarray, threshold: float,
                       removed_pairs: np.ndarray | None = None) -> Check:
    """(kept row a removed row duplicates, row similar to the removed row) pairs on two sides.

    Exhaustive (every removed row against every kept row) when the index was built without LSH;
    on larger inputs from the grouping's verified pairs that involve a removed row."""
    removed = index.removed
    n = len(index.ids)
    if removed is None or len(removed.ids) == 0:
        return Check(np.zeros((0, 2), dtype=np.int64), detail={"removed_rows": 0})
    if index.band_keys is None:
        prints = np.concatenate([index.fingerprints, removed.fingerprints])
        pairs, _ = all_pairs_above(prints, threshold, left=n + np.arange(len(removed.ids)), right=np.arange(n))
        method = "exhaustive"
    else:
        pairs = removed_pairs if removed_pairs is not None else np.zeros((0, 2), dtype=np.int64)
        method = "lsh"
    linked = []
    for a, b in pairs.tolist():
        for r, k in ((a, b), (b, a)):
            if r >= n and k < n:
                linked.append((int(removed.duplicates[r - n]), k))
    candidate = np.array(linked, dtype=np.int64).reshape(-1, 2)
    return Check(_cross_side(candidate, sides), detail={"removed_rows": int(len(removed.ids)), "method": method})


def prefix_check(index: SplitIndex, sides: np.ndarray, max_count: int) -> Check:
    """Chats on one side whose turns open a chat on the other side."""
    if index.prefix_keys is None or len(index.prefix_keys) == 0:
        return Check(np.zeros((0, 2), dtype=np.int64))
    keys, opened_counts = np.unique(index.prefix_keys, return_counts=True)
    slot = np.minimum(np.searchsorted(keys, index.chat_keys), len(keys) - 1)
    opener = (keys[slot] == index.chat_keys) & (opened_counts[slot] <= max_count)
    by_key: dict[int, list[int]] = {}
    wanted = set(index.chat_keys[opener].tolist())
    for key, row in zip(index.prefix_keys.tolist(), index.prefix_rows.tolist()):
        if key in wanted:
            by_key.setdefault(key, []).append(row)
    pairs = [(short, long) for short in np.nonzero(opener)[0].tolist()
             for long in by_key.get(int(index.chat_keys[short]), [])]
    return Check(_cross_side(np.array(pairs, dtype=np.int64).reshape(-1, 2), sides))


class WordFrequency:
    """Document frequency of words in one role's turns, counted over all records (by word hash:
    memory grows with the vocabulary, not with the number of rows)."""

    def __init__(self) -> None:
        self.words = np.zeros(0, dtype=np.uint64)
        self.counts = np.zeros(0, dtype=np.int64)
        self.records = 0
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_size = 0

    def add(self, hashes: np.ndarray, lengths: np.ndarray) -> None:
        self.add_counts(*batch_document_counts(hashes, lengths), len(lengths))

    def add_counts(self, words: np.ndarray, counts: np.ndarray, records: int) -> None:
        """Add `records` records given as (distinct words, records with each word), what
        batch_document_counts returns (splitting.build_index computes it in its workers)."""
        self._pending.append((words, counts))
        self._pending_size += len(words)
        self.records += records
        # Merge into the sorted (word, count) arrays only when the pending part is as big as they
        # are (amortised: each merge costs about what it absorbs).
        if self._pending_size > max(len(self.words), 1 << 20):
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        words = np.concatenate([self.words] + [w for w, _ in self._pending])
        counts = np.concatenate([self.counts] + [c for _, c in self._pending])
        self._pending, self._pending_size = [], 0
        self.words, self.counts = unique_counts(words, counts)

    def frequent(self, max_df: float) -> np.ndarray:
        """Sorted hashes of the words in more than max(WORD_DF_FLOOR, max_df * records) records."""
        self._merge()
        return self.words[self.counts > max(WORD_DF_FLOOR, int(max_df * self.records))]


def text_ngrams(word_hashes: np.ndarray, lengths: np.ndarray, n: int, skip: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """(hashes, text index) of the distinct word n-grams of each text (given as word hashes).

    Words whose hash is in `skip` (sorted; the boilerplate vocabulary) are dropped first, so an
    n-gram is a run of n content words; a text with fewer than n words left gives none."""
    if skip is not None and len(skip) and len(word_hashes):
        keep = ~_member(word_hashes, skip)
        owner = np.repeat(np.arange(len(lengths)), lengths)
        lengths = np.bincount(owner[keep], minlength=len(lengths)).astype(np.int64)
        word_hashes = word_hashes[keep]
    hashes, counts = minhash.ngram_hashes(word_hashes, lengths, n, short=False)
    return distinct_per_text(hashes, counts)


def _member(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    if len(sorted_set) == 0:
        return np.zeros(len(values), dtype=bool)
    slot = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[slot] == values


class NgramCheck:
    """Streaming n-gram overlap of one role: feed every test record, then every other record.

    `skip`: the boilerplate vocabulary (WordFrequency.frequent), dropped before forming n-grams."""

    def __init__(self, role: str, n: int, hasher: minhash.WordHasher, skip: np.ndarray) -> None:
        # `hasher` only serves shared_text (examples for the report); the checks take word hashes.
        self.role, self.n, self.hasher, self.skip = role, n, hasher, skip
        self._test_parts: list[tuple[np.ndarray, np.ndarray]] = []
        self._match_parts: list[tuple[np.ndarray, np.ndarray]] = []
        self._frozen = False
        self.boilerplate_hashes: set = set()

    def add_test(self, rows: np.ndarray, word_hashes: np.ndarray, lengths: np.ndarray) -> None:
        """`rows`: the row index of each text; word hashes and lengths as TokenStore gives them."""
        hashes, owner = text_ngrams(word_hashes, lengths, self.n, self.skip)
        self._test_parts.append((hashes, rows[owner]))

    def _freeze(self) -> None:
        hashes = np.concatenate([h for h, _ in self._test_parts]) if self._test_parts else np.zeros(0, np.uint64)
        rows = np.concatenate([r for _, r in self._test_parts]) if self._test_parts else np.zeros(0, np.int64)
        order = np.argsort(hashes, kind="stable")
        self.test_hashes, self.test_rows = hashes[order], rows[order]
        self.unique, self.test_start, self.test_df = np.unique(self.test_hashes, return_index=True, return_counts=True)
        self._test_parts = []
        self._frozen = True

    def add_other(self, rows: np.ndarray, word_hashes: np.ndarray, lengths: np.ndarray) -> None:
        """Keep only the n-grams that also occur in some test record (a small share)."""
        if not self._frozen:
            self._freeze()
        if len(self.unique) == 0:
            return
        hashes, owner = text_ngrams(word_hashes, lengths, self.n, self.skip)
        if len(hashes) == 0:
            return
        hit = _member(hashes, self.unique)
        self._match_parts.append((np.searchsorted(self.unique, hashes[hit]), rows[owner[hit]]))

    def result(self, n_records: int, max_df: float) -> Check:
        if not self._frozen:
            self._freeze()
        slots = np.concatenate([s for s, _ in self._match_parts]) if self._match_parts else np.zeros(0, np.int64)
        others = np.concatenate([r for _, r in self._match_parts]) if self._match_parts else np.zeros(0, np.int64)
        # An n-gram of content words can still be boilerplate (a product list pasted in every
        # answer): the same document-frequency cutoff applies to whole n-grams.
        document_frequency = self.test_df + np.bincount(slots, minlength=len(self.unique))
        cutoff = max(2, int(max_df * n_records))
        boilerplate = document_frequency > cutoff
        keep = ~boilerplate[slots]
        slots, others = slots[keep], others[keep]
        # Every (other row, test row) sharing a kept n-gram.
        repeat = self.test_df[slots]
        total = int(repeat.sum())
        truncated = total > MAX_PAIRS
        if truncated:
            limit = int(np.searchsorted(np.cumsum(repeat), MAX_PAIRS, side="right"))
            slots, others, repeat = slots[:limit], others[:limit], repeat[:limit]
            total = int(repeat.sum())
        within = np.arange(total) - np.repeat(np.cumsum(repeat) - repeat, repeat)
        tests = self.test_rows[np.repeat(self.test_start[slots], repeat) + within]
        pairs = _distinct(np.stack([np.repeat(others, repeat), tests], axis=1))
        self.boilerplate_hashes = set(self.unique[boilerplate].tolist())
        return Check(pairs, truncated, detail={
            "boilerplate_words": int(len(self.skip)),
            "boilerplate_ngrams_shared": int(boilerplate.sum()),
            "document_frequency_cutoff": cutoff,
        })

    def shared_text(self, a: dict, b: dict) -> str:
        """One n-gram (of content words) the two records share, for the report."""
        found = []
        for record in (a, b):
            tokens = [t for m in record["messages"] if m["role"] == self.role for t in word_bytes(m["content"])]
            hashes = self.hasher.hash_words(tokens)
            kept = ~_member(hashes, self.skip)
            tokens, hashes = [t for t, k in zip(tokens, kept) if k], hashes[kept]
            values, _ = minhash.ngram_hashes(hashes, np.array([len(tokens)]), self.n, short=False)
            ngrams = {}
            for start, value in enumerate(values.tolist()):
                ngrams.setdefault(value, b" ".join(tokens[start:start + self.n]).decode("utf-8"))
            found.append(ngrams)
        for value, text in found[0].items():
            if value in found[1] and value not in self.boilerplate_hashes:
                return text
        return ""


def ngram_checks(index: SplitIndex, sides: np.ndarray, n: int, max_df: float,
                 word_counts: dict, hasher: minhash.WordHasher) -> dict[str, "NgramCheck"]:
    """Run the n-gram check of each role over the index's token store: test rows first, then
    the others (two sequential reads of the store; no JSON is parsed)."""
    checks = {role: NgramCheck(role, n, hasher, word_counts[role].frequent(max_df)) for role in COMPARED_ROLES}
    is_test = sides == TEST
    for role, check in checks.items():
        for want_test in (True, False):
            for lo, hashes, lengths in index.tokens.batches(role):
                rows = np.arange(lo, lo + len(lengths))
                keep = is_test[rows] == want_test
                selected, selected_lengths = select_texts(hashes, lengths, keep)
                (check.add_test if want_test else check.add_other)(rows[keep], selected, selected_lengths)
    return checks
