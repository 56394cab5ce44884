"""Vectorised MinHash + banded LSH, used by dedup (near-duplicates) and split (groups, audit).

Why home-made rather than datasketch (a well-kept library, which the benchmark also runs):
measured, not assumed. bench/data_throughput.py runs both on the same 100k synthetic records
with injected near-duplicates (2-core x86_64, 2026-11-28, reports/bench/data_throughput.json).
This engine: 48,331 records/s, recall 0.984 of the injected near-duplicates, 424 MB. A plain
datasketch loop (one `MinHash` per record, `update` per shingle, `MinHashLSH.query` + `insert`):
1,424 records/s, recall 0.927, 815 MB, i.e. 33.9x slower (an earlier run of record: 24.5x);
with `update_batch` 2,820 records/s (17x slower). rensa (Rust): 23,768 records/s, recall 0.971
(2.0x slower). datasketch spends most of its time in per-shingle Python calls.

Here every step is one numpy operation over a batch:

1. words are hashed in batches (a polynomial hash over the batch's bytes, no Python per word),
2. word-shingle hashes are rolling combinations of the word hashes, mixed to 32 bits,
3. the `num_perm` hash functions h_k(x) = a_k * x + b_k (mod 2^32) are applied to a whole batch
   as one (num_perm x shingles) array and reduced per record with `np.minimum.reduceat` along
   the contiguous axis. With x already a well-mixed 32-bit hash this affine family estimates
   Jaccard with the binomial variance J(1-J)/num_perm (tests/test_minhash.py checks it),
4. LSH: each band of `rows` signature values is folded into one uint64 bucket key; candidate
   pairs come from sorting the keys, not from Python dicts, and are verified by the estimated
   Jaccard (the fraction of equal signature values) before anything is called a duplicate.

Only 16 bits of each signature value are kept for verification (2 bytes x num_perm per record):
a false match of two different minima then has probability 2^-16, a bias of at most 0.00002 on
the estimate, and the index of a 1M-row dataset stays a few hundred MB.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from stages.lib.text import WORD_PATTERN as _WORD

_MASK64 = (1 << 64) - 1
# Odd 64-bit constants (from splitmix64 / golden ratio) that weight the words of a shingle by
# position, so "a b c" and "c b a" hash differently.
_POSITION_WEIGHTS = np.array([
    0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0xD6E8FEB86659FD93,
    0xA0761D6478BD642F, 0xE7037ED1A0B428DB, 0x8EBC6AF09C88C6E3, 0x589965CC75374CC3,
], dtype=np.uint64)


def _mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: every output bit depends on every input bit (in place, uint64)."""
    with np.errstate(over="ignore"):
        values ^= values >> np.uint64(30)
        values *= np.uint64(0xBF58476D1CE4E5B9)
        values ^= values >> np.uint64(27)
        values *= np.uint64(0x94D049BB133111EB)
        values ^= values >> np.uint64(31)
    return values


# Bytes that belong to a word token: ASCII letters, digits and "_" (what \w matches in ASCII), and
# every byte >= 0x80, because non-ASCII text is tokenised by the regex first (see `hash_texts`)
# and what is left of it is its words' UTF-8 bytes.
_WORD_BYTES = bytes.maketrans(bytes(range(256)), bytes(
    c if c >= 0x80 or chr(c).isalnum() or c == 0x5F else 0x20 for c in range(256)))
# Words are hashed with a polynomial over their bytes, h = sum(byte_i * P^i) mod 2^64 for an odd P,
# computed for a whole batch from prefix sums of byte_j * P^j (one multiply and one cumulative
# sum per byte, no Python per word), then mixed with the word's length. The same on every machine.
_WORD_P = 0x9E3779B97F4A7C15
_WORD_P_INVERSE = pow(_WORD_P, -1, 1 << 64)
_CHUNK_BYTES = 1 << 20   # buffers are hashed in pieces of about this size: bounded power tables
_powers = np.ones(1, dtype=np.uint64)
_inverse_powers = np.ones(1, dtype=np.uint64)
_powers_lock = threading.Lock()


def _power_tables(size: int) -> tuple[np.ndarray, np.ndarray]:
    """P^k and P^-k (mod 2^64) for k < size, grown on demand and shared by threads."""
    global _powers, _inverse_powers
    with _powers_lock:
        if len(_powers) < size:
            size = max(size, 2 * len(_powers), 1 << 16)
            with np.errstate(over="ignore"):
                _powers = np.multiply.accumulate(np.full(size, _WORD_P, dtype=np.uint64), dtype=np.uint64)
                _inverse_powers = np.multiply.accumulate(np.full(size, _WORD_P_INVERSE, dtype=np.uint64),
                                                         dtype=np.uint64)
        return _powers, _inverse_powers


def _hash_word_buffer(buffer: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(hash, start offset) of every word in `buffer`, where words are runs of bytes other than
    the space (0x20)."""
    if len(buffer) <= _CHUNK_BYTES:
        return _hash_words_in(buffer)
    parts, lo = [], 0
    while lo < len(buffer):   # cut at spaces, so that no word is split
        hi = buffer.find(b" ", lo + _CHUNK_BYTES)
        hi = len(buffer) if hi < 0 else hi
        hashes, starts = _hash_words_in(buffer[lo:hi])
        parts.append((hashes, starts + lo))
        lo = hi
    return np.concatenate([h for h, _ in parts]), np.concatenate([s for _, s in parts])


def _hash_words_in(buffer: bytes) -> tuple[np.ndarray, np.ndarray]:
    data = np.frombuffer(buffer, dtype=np.uint8)
    n = len(data)
    padded = np.zeros(n + 2, dtype=np.int8)
    np.not_equal(data, 0x20, out=padded[1:-1].view(bool))
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = edges[0::2], edges[1::2]
    powers, inverse_powers = _power_tables(n)
    prefix = np.zeros(n + 1, dtype=np.uint64)   # prefix[k] = sum of byte_j * P^(j+1) for j < k
    with np.errstate(over="ignore"):
        np.multiply(data, powers[:n], out=prefix[1:])
        np.cumsum(prefix[1:], out=prefix[1:])
        # The sum over a word, divided by P^(start+1) so it starts at P^0 (P is odd: invertible).
        hashes = (prefix[ends] - prefix[starts]) * inverse_powers[starts]
        hashes ^= (ends - starts).astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
    return _mix64(hashes), starts


class WordHasher:
    """Stable 64-bit word hashes (a polynomial over the bytes, so the same on every machine and run)."""

    def hash_words(self, tokens: Sequence[bytes]) -> np.ndarray:
        """uint64 hashes of UTF-8 word tokens (text.word_bytes)."""
        return _hash_word_buffer(b" ".join(tokens))[0]

    def hash_texts(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The hashes of the words of several texts, concatenated, and how many each text has:
        the same as hash_words of text.word_bytes(text) for each text, without a Python object
        per word. ASCII texts are lower-cased and split on non-word bytes in one buffer; other
        texts are case-folded and tokenised by the \\w regex first (Unicode word characters)."""
        buffer, sizes = _batch_bytes(texts, _word_tokens, _WORD_BYTES)
        hashes, starts = _hash_word_buffer(buffer)
        return hashes, _words_per_text(starts, sizes)


def _word_tokens(text: str) -> str:
    return " ".join(_WORD.findall(text.casefold()))


def _batch_bytes(texts: Sequence[str], non_ascii, table: bytes) -> tuple[bytes, np.ndarray]:
    """(the texts lower-cased, joined by spaces, as bytes with `table` applied; each text's size
    in bytes). A text that is not ASCII is replaced by non_ascii(text) first."""
    joined = " ".join(texts)
    if joined.isascii():   # the common case: one lower() and one encode for the whole batch
        sizes = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
        return joined.lower().encode("ascii").translate(table), sizes
    pieces = [text.lower() if text.isascii() else non_ascii(text) for text in texts]
    sizes = np.fromiter((len(p) if p.isascii() else len(p.encode("utf-8")) for p in pieces),
                        dtype=np.int64, count=len(pieces))
    return " ".join(pieces).encode("utf-8").translate(table), sizes


def _words_per_text(word_starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """How many of the words (by start offset in the batch buffer) fall in each text."""
    text_starts = np.cumsum(sizes + 1) - (sizes + 1)
    owner = np.searchsorted(text_starts, word_starts, side="right") - 1
    return np.bincount(owner, minlength=len(sizes)).astype(np.int64)


def ngram_hashes(word_hashes: np.ndarray, lengths: np.ndarray, n: int, short: bool) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every word n-gram of several texts whose word hashes are concatenated.

    `lengths[r]` is text r's number of words. Returns (hashes uint64, counts per text). With
    `short=True` a text of 1..n-1 words gives one hash of all its words (shingling: short rows
    must still be comparable); with `short=False` it gives none (a long-overlap check).
    """
    total = int(lengths.sum())
    counts = np.zeros(len(lengths), dtype=np.int64)
    if total == 0:
        return np.zeros(0, dtype=np.uint64), counts
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    rolled = np.zeros(total, dtype=np.uint64)
    short_values = np.zeros(len(lengths), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(min(n, total)):
            weight = _POSITION_WEIGHTS[j % len(_POSITION_WEIGHTS)] + np.uint64(2 * (j // len(_POSITION_WEIGHTS)))
            rolled[:total - j] += word_hashes[j:] * weight
            if short:
                is_short = lengths == j + 1
                short_values[is_short] = rolled[starts[is_short]]
    _mix64(rolled)
    _mix64(short_values)
    # A window at position i of text r is valid when it ends inside text r.
    text_of = np.repeat(np.arange(len(lengths)), lengths)
    position = np.arange(total) - starts[text_of]
    valid = position <= (lengths[text_of] - n)
    long_counts = np.maximum(lengths - n + 1, 0)
    if not short or not np.any((lengths > 0) & (lengths < n)):
        return rolled[valid], long_counts
    # Interleave the one hash of each short text at its place, keeping texts contiguous.
    is_short = (lengths > 0) & (lengths < n)
    rolled[starts[is_short]] = short_values[is_short]
    valid[starts[is_short]] = True
    counts = np.where(is_short, 1, long_counts)
    return rolled[valid], counts


# LSH layout weights used by dedup and split: a missed similar pair is a missed duplicate (or a
# leak), while a false candidate only costs one verification, so misses weigh 9x. At threshold
# 0.7 and 128 permutations this gives 20 bands of 6 rows: a pair of true Jaccard 0.8 becomes a
# candidate with probability 0.998 (0.87 with equal weights, datasketch's default).
RECALL_WEIGHTS = (0.1, 0.9)


@dataclass(frozen=True)
class Bands:
    bands: int
    rows: int


def optimal_bands(threshold: float, num_perm: int, false_positive_weight: float = 0.5,
                  false_negative_weight: float = 0.5) -> Bands:
    """The (bands, rows) split of `num_perm` that minimises the weighted areas of false positives
    (pairs below `threshold` that collide) and false negatives (pairs above it that don't).

    Same criterion as datasketch's MinHashLSH; a higher false-negative weight gives a layout that
    misses fewer similar pairs at the price of more candidates to verify (used by the audit).
    """
    grid_low = np.linspace(0.0, threshold, 201)
    grid_high = np.linspace(threshold, 1.0, 201)
    best, best_error = Bands(1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        rows = num_perm // bands
        collide_low = 1 - (1 - grid_low ** rows) ** bands
        collide_high = 1 - (1 - grid_high ** rows) ** bands
        error = (false_positive_weight * np.trapezoid(collide_low, grid_low)
                 + false_negative_weight * np.trapezoid(1 - collide_high, grid_high))
        if error < best_error - 1e-12:
            best, best_error = Bands(bands, rows), error
    return best


class MinHasher:
    """MinHash signatures of word shingles; same params -> same signatures on any machine."""

    def __init__(self, num_perm: int, shingle_size: int, seed: int) -> None:
        self.num_perm = num_perm
        self.shingle_size = shingle_size
        rng = np.random.Generator(np.random.PCG64(seed))
        # Odd multipliers make each h_k a bijection of 32-bit values (no two shingles tie).
        self._a = (rng.integers(0, 2**32, size=num_perm, dtype=np.uint64).astype(np.uint32)
                   | np.uint32(1))[:, None]
        self._b = rng.integers(0, 2**32, size=num_perm, dtype=np.uint64).astype(np.uint32)[:, None]
        self.words = WordHasher()

    def shingle_hashes(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """32-bit shingle hashes of several texts, concatenated, and how many each text has."""
        return self._shingles(*self.words.hash_texts(texts))

    def _shingles(self, word_hashes: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        hashes, counts = ngram_hashes(word_hashes, lengths, self.shingle_size, short=True)
        return (hashes >> np.uint64(32)).astype(np.uint32), counts

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), num_perm) uint32 signatures; a text with no words gets all 0xFFFFFFFF
        (and `band_keys` gives it keys that collide with nothing)."""
        return self._signatures(*self.shingle_hashes(texts))

    def signatures_from_word_hashes(self, word_hashes: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Same as `signatures`, for texts already tokenised and hashed (WordHasher)."""
        return self._signatures(*self._shingles(word_hashes, lengths))

    def _signatures(self, values: np.ndarray, counts: np.ndarray, chunk_shingles: int = 8192) -> np.ndarray:
        n = len(counts)
        out = np.full((n, self.num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
        ends = np.cumsum(counts)
        starts = ends - counts
        first = 0
        # Chunks of whole texts, about `chunk_shingles` shingles each: the temporary (num_perm x
        # chunk) array is num_perm * chunk_shingles * 4 bytes, 4 MB at the defaults, small enough
        # to stay in cache between the multiply, the add and the reduce (2.4x faster than 32 MB).
        while first < n:
            last = int(np.searchsorted(ends, starts[first] + chunk_shingles, side="right"))
            last = max(last, first + 1)
            lo, hi = int(starts[first]), int(ends[last - 1])
            if hi > lo:
                with np.errstate(over="ignore"):
                    permuted = self._a * values[None, lo:hi]
                    permuted += self._b
                nonempty = np.nonzero(counts[first:last])[0]
                offsets = starts[first:last][nonempty] - lo
                out[first + nonempty] = np.minimum.reduceat(permuted, offsets, axis=1).T
            first = last
        return out


def band_keys(signatures: np.ndarray, layout: Bands, salt: int = 0) -> np.ndarray:
    """(n, bands) uint32 bucket keys: equal band of the signature => equal key.

    32 bits are enough because every candidate pair is verified: among 1M rows a band gives about
    n^2 / 2^33 ~ 100 chance collisions, each costing one comparison, for half the memory of 64.

    Rows with an all-0xFFFFFFFF signature (no words) get unique keys so they never collide."""
    n = len(signatures)
    rng = np.random.Generator(np.random.PCG64(0xB4_4D5 + salt))
    weights = rng.integers(0, 2**63, size=layout.rows, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    used = layout.bands * layout.rows
    with np.errstate(over="ignore"):
        # Every band at once: (n, bands, rows) values, weighted and summed along the rows.
        blocks = signatures[:, :used].reshape(n, layout.bands, layout.rows).astype(np.uint64)
        folded = (blocks * weights).sum(axis=2, dtype=np.uint64) + np.arange(layout.bands, dtype=np.uint64)
        keys = (_mix64(folded) >> np.uint64(32)).astype(np.uint32)
    empty = np.all(signatures == np.iinfo(np.uint32).max, axis=1)
    if empty.any():
        # Distinct per row and per band; the top bit keeps them apart from ordinary keys only
        # statistically, which is enough because candidates are verified.
        rows = np.nonzero(empty)[0].astype(np.uint64)
        keys[empty] = _mix64((rows[:, None] << np.uint64(8)) + np.arange(layout.bands, dtype=np.uint64)
                             + np.uint64(1 << 63)) >> np.uint64(32)
    return keys


def _stable_order(column: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(argsort(column, kind="stable"), column sorted) of a uint32 column, 8x faster: the key and
    the row number packed in one uint64 and sorted by value (numpy's vectorised sort), the row
    number breaking ties."""
    n = len(column)
    if n >= 1 << 32:   # pragma: no cover - row numbers no longer fit beside the key
        order = np.argsort(column, kind="stable")
        return order, column[order]
    packed = (column.astype(np.uint64) << np.uint64(32)) | np.arange(n, dtype=np.uint64)
    packed.sort()
    return (packed & np.uint64(0xFFFFFFFF)).astype(np.int64), (packed >> np.uint64(32)).astype(column.dtype)


def _band_candidates(column: np.ndarray, window: int, anchors: int) -> np.ndarray:
    """Pair codes i * n + j (i < j) of rows sharing a bucket in one band: every row with the
    `window` rows before it in its bucket and with the bucket's first `anchors` rows."""
    n = len(column)
    order, sorted_keys = _stable_order(column)   # within a bucket: input order
    boundary = np.ones(n, dtype=bool)
    boundary[1:] = sorted_keys[1:] != sorted_keys[:-1]
    run_start = np.maximum.accumulate(np.where(boundary, np.arange(n), 0))
    rank = np.arange(n) - run_start
    found = []
    for distance in range(1, window + 1):
        same = rank[distance:] >= distance
        if not same.any():
            break
        found.append(order[:-distance][same].astype(np.int64) * n + order[distance:][same])
    far = np.nonzero(rank > window)[0]
    for anchor_rank in range(min(anchors, window)):
        found.append(order[run_start[far] + anchor_rank].astype(np.int64) * n + order[far])
    if not found:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.concatenate(found))


def candidate_pairs(keys: np.ndarray, window: int = 8, anchors: int = 4) -> np.ndarray:
    """Distinct (i, j), i < j, of rows sharing a bucket in any band, as an (m, 2) int64 array.

    Within a bucket (rows in input order) every row is paired with the `window` rows before it
    and with the bucket's first `anchors` rows, so a bucket of thousands of near-identical rows
    costs O(window + anchors) pairs per row instead of O(rows^2); the earliest rows, the ones
    dedup keeps, are always among a late row's candidates, and consecutive rows chain a bucket
    into one component for grouping."""
    n = len(keys)
    codes = np.zeros(0, dtype=np.int64)
    for band in range(keys.shape[1]):
        codes = np.union1d(codes, _band_candidates(keys[:, band], window, anchors))
    return np.stack([codes // max(n, 1), codes % max(n, 1)], axis=1)


def verified_pairs(keys: np.ndarray, fingerprints: np.ndarray, threshold: float, window: int = 8,
                   anchors: int = 4) -> tuple[np.ndarray, np.ndarray, int]:
    """(pairs, similarities, candidates compared): the LSH candidates whose estimated Jaccard is
    >= threshold. Band by band, each new candidate is verified once and only the similar ones
    are kept, so memory follows the number of distinct candidates (8 bytes each), never the
    sum over bands."""
    n = len(keys)
    checked: list[np.ndarray] = []   # sorted codes already verified, one array per band
    kept_codes, kept_sims = [], []
    for band in range(keys.shape[1]):
        new = _band_candidates(keys[:, band], window, anchors)
        for done in checked:   # binary searches into each earlier band: no re-sorting of the union
            if len(new) and len(done):
                slot = np.minimum(np.searchsorted(done, new), len(done) - 1)
                new = new[done[slot] != new]
        if len(new) == 0:
            continue
        pairs = np.stack([new // n, new % n], axis=1)
        sims = similarities(fingerprints, pairs)
        close = sims >= threshold
        kept_codes.append(new[close])
        kept_sims.append(sims[close])
        checked.append(new)
    compared = sum(len(done) for done in checked)
    if not kept_codes:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0), compared
    codes, sims = np.concatenate(kept_codes), np.concatenate(kept_sims)
    order = np.argsort(codes)
    codes, sims = codes[order], sims[order]
    return np.stack([codes // n, codes % n], axis=1), sims, compared


def similarities(fingerprints: np.ndarray, pairs: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Estimated Jaccard of each pair: the share of equal signature values."""
    out = np.empty(len(pairs), dtype=np.float64)
    for lo in range(0, len(pairs), chunk):
        part = pairs[lo:lo + chunk]
        out[lo:lo + chunk] = (fingerprints[part[:, 0]] == fingerprints[part[:, 1]]).mean(axis=1)
    return out


def fingerprint(signatures: np.ndarray) -> np.ndarray:
    """The 16 low bits of each signature value, kept for verification (see module docstring)."""
    return signatures.astype(np.uint16)


def similarity_text(record: dict) -> str:
    """What near-duplicate detection compares: user and assistant turns, not the system prompt.

    A system prompt is usually shared by every row of a dataset; counting it would make unrelated
    rows look similar (a 100-word prompt alone gives two 20-word tickets a Jaccard near 0.7)."""
    return "\n".join(m["content"] for m in record["messages"] if m["role"] != "system")


class GrowingArray:
    """Append rows batch by batch without keeping a Python list of every row (amortised doubling)."""

    def __init__(self, width: int | None, dtype, capacity: int = 1024) -> None:
        # Pass the expected number of rows when known: no regrowth, no transient double copy.
        capacity = max(capacity, 1)
        shape = (capacity,) if width is None else (capacity, width)
        self._data = np.zeros(shape, dtype=dtype)
        self._size = 0

    def extend(self, rows: np.ndarray) -> None:
        need = self._size + len(rows)
        if need > len(self._data):
            capacity = max(need, 2 * len(self._data))
            grown = np.zeros((capacity,) + self._data.shape[1:], dtype=self._data.dtype)
            grown[:self._size] = self._data[:self._size]
            self._data = grown
        self._data[self._size:need] = rows
        self._size = need

    def array(self) -> np.ndarray:
        return self._data[:self._size]


# --------------------------------------------------------------------------------------------
# Reading the pipeline's own record files in batches, and the dedup decision.


class RecordFileError(Exception):
    """A records file this pipeline should have written is missing or damaged."""


@dataclass
class LineBatch:
    """Consecutive non-blank lines of a records file, with where they are (for messages and seeks)."""

    path: str
    numbers: list        # 1-based line numbers
    offsets: list        # byte offset of each line
    lines: list          # the raw lines (bytes, newline included)


def read_batches(path, batch_size: int = 4096):
    """Yield LineBatch after LineBatch of a JSONL records file (no parsing: cheap, in order)."""
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise RecordFileError(f"{path}: not found (run the previous stage first: dvc repro)") from None
    with handle:
        numbers, offsets, lines = [], [], []
        offset = 0
        for number, line in enumerate(handle, 1):
            if line.strip():
                numbers.append(number)
                offsets.append(offset)
                lines.append(line)
                if len(lines) == batch_size:
                    yield LineBatch(str(path), numbers, offsets, lines)
                    numbers, offsets, lines = [], [], []
            offset += len(line)
        if lines:
            yield LineBatch(str(path), numbers, offsets, lines)


def parse_batch(batch: LineBatch) -> list[dict]:
    """The records of a batch; RecordFileError names the first line that is not one."""
    from stages.lib.io import fast_json_loads, has_long_number

    checked = not has_long_number(b"".join(batch.lines))   # one scan for the batch, not one per line
    records = []
    for number, line in zip(batch.numbers, batch.lines):
        try:
            record = fast_json_loads(line, may_have_long_numbers=not checked)
            record["id"], record["messages"]  # noqa: B018 - shape check
        except (ValueError, TypeError, KeyError) as exc:
            raise RecordFileError(f"{batch.path} line {number}: not a record this pipeline wrote "
                                  f"({type(exc).__name__}: {exc}); re-run the previous stage") from None
        records.append(record)
    return records


def count_lines(path) -> int:
    """Records in a JSONL file (a cheap pre-pass over bytes, no parsing): sizes the indexes."""
    count = 0
    with open(path, "rb") as handle:
        for line in handle:
            count += bool(line.strip())
    return count


# str.split()'s ASCII whitespace, as bytes: what separates the tokens of a dedup key.
_WHITESPACE_TO_SPACE = bytes.maketrans(b"\t\n\r\x0b\x0c\x1c\x1d\x1e\x1f", b" " * 9)


def _folded_tokens(text: str) -> str:
    return " ".join(text.casefold().split())


def text_keys(texts: Sequence[str]) -> np.ndarray:
    """uint64 key per text, a hash of its text.dedup_key (the whitespace-separated tokens,
    case-folded, in order): equal for texts that differ only in case and spacing. Computed for
    the whole batch at once from the texts' bytes (tests check it against dedup_key)."""
    buffer, sizes = _batch_bytes(texts, _folded_tokens, _WHITESPACE_TO_SPACE)
    hashes, starts = _hash_word_buffer(buffer)
    counts = _words_per_text(starts, sizes)
    keys = np.zeros(len(texts), dtype=np.uint64)
    if len(hashes):
        first = np.cumsum(counts) - counts
        position = (np.arange(len(hashes)) - np.repeat(first, counts)).astype(np.uint64)
        with np.errstate(over="ignore"):
            mixed = _mix64(hashes + position * np.uint64(0xD6E8FEB86659FD93))
        nonempty = counts > 0
        keys[nonempty] = np.add.reduceat(mixed, first[nonempty], dtype=np.uint64)
    with np.errstate(over="ignore"):
        return _mix64(keys + counts.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))


def ids_to_uint64(ids: Sequence[str]) -> np.ndarray:
    """Record ids are 16 hex digits: as uint64 they sort like the strings and take 8 bytes."""
    return np.fromiter((int(i, 16) for i in ids), dtype=np.uint64, count=len(ids))


def uint64_to_id(value) -> str:
    return format(int(value), "016x")


@dataclass
class DedupIndex:
    """What dedup keeps of a batch of records: a few hundred bytes per record."""
    ids: np.ndarray                       # uint64 record ids
    exact_keys: np.ndarray                # uint64 text_keys of the whole conversation
    fingerprints: Optional[np.ndarray]    # (n, num_perm) uint16, when near-duplicates are searched
    band_keys: Optional[np.ndarray]       # (n, bands) uint32 LSH keys, likewise


def dedup_index(batch: LineBatch, hasher: MinHasher, layout: Optional[Bands]) -> DedupIndex:
    """Parse and index one batch of records (in a worker process). Fingerprints are always
    computed (split reads them from dedup's signatures file); `layout` None: no LSH keys, exact
    duplicates only."""
    from stages.lib.records import conversation_text

    records = parse_batch(batch)
    ids = ids_to_uint64([r["id"] for r in records])
    exact = text_keys([conversation_text(r) for r in records])
    signatures = hasher.signatures([similarity_text(r) for r in records])
    return DedupIndex(ids, exact, fingerprint(signatures), band_keys(signatures, layout) if layout else None)


# --------------------------------------------------------------------------------------------
# dedup's signatures file: every clean record's MinHash fingerprint and dedup's decision, which
# split reads instead of hashing again, and through which rows dedup removed still join the rows
# they resemble into one group (a removed row can be the only link between two kept rows).

SIGNATURES_VERSION = 1


def signatures_dtype(num_perm: int) -> np.dtype:
    return np.dtype([("id", "<u8"), ("duplicate_of", "<i8"), ("kind", "u1"), ("fingerprint", "<u2", (num_perm,))])


def write_signatures(handle, ids: np.ndarray, dups: "Duplicates", fingerprints: np.ndarray,
                     shingle_size: int, seed: int) -> None:
    """One .npy structured array (no pickle), row for row the clean records: id, the row index it
    duplicates (-1: kept), kind (0 kept, EXACT, NEAR) and the uint16 fingerprint. The header
    row 0 is not a record: it carries the format version and the hashing params in its fields,
    so that split can tell fingerprints it cannot compare."""
    table = np.zeros(len(ids) + 1, dtype=signatures_dtype(fingerprints.shape[1]))
    table[0]["id"] = SIGNATURES_VERSION
    table[0]["duplicate_of"] = shingle_size
    table[0]["kind"] = 255
    table[0]["fingerprint"][:2] = (seed & 0xFFFF, (seed >> 16) & 0xFFFF)
    table[1:]["id"] = ids
    table[1:]["duplicate_of"] = dups.duplicate_of
    table[1:]["kind"] = dups.kind
    table[1:]["fingerprint"] = fingerprints
    np.save(handle, table, allow_pickle=False)


@dataclass
class Signatures:
    ids: np.ndarray            # uint64, every clean record in order
    duplicate_of: np.ndarray   # int64 row it duplicates, -1 when kept
    kind: np.ndarray           # uint8 0 kept, EXACT, NEAR
    fingerprints: np.ndarray   # (n, num_perm) uint16
    shingle_size: int
    seed: int

    @property
    def num_perm(self) -> int:
        return self.fingerprints.shape[1]


def read_signatures(path) -> Signatures:
    """What write_signatures wrote; RecordFileError for a missing or foreign file."""
    try:
        table = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise RecordFileError(f"{path}: not found (run the dedup stage first: dvc repro dedup)") from None
    except (ValueError, OSError, EOFError) as exc:
        raise RecordFileError(f"{path}: not a signatures file this pipeline wrote ({exc}); re-run dedup") from None
    names = ("id", "duplicate_of", "kind", "fingerprint")
    if table.dtype.names != names or table.ndim != 1 or len(table) == 0 or int(table[0]["id"]) != SIGNATURES_VERSION:
        raise RecordFileError(f"{path}: not a signatures file this pipeline wrote (version or layout differs); re-run dedup")
    head = table[0]
    seed = int(head["fingerprint"][0]) | (int(head["fingerprint"][1]) << 16)
    rows = table[1:]
    # Field views of the one table (no copies: the table is a few hundred bytes per row).
    return Signatures(rows["id"], rows["duplicate_of"], rows["kind"], rows["fingerprint"],
                      int(head["duplicate_of"]), seed)


EXACT, NEAR = 1, 2


@dataclass
class Duplicates:
    duplicate_of: np.ndarray   # int64 row index of the row each row duplicates; -1 when kept
    kind: np.ndarray           # 0 kept, EXACT or NEAR
    similarity: np.ndarray     # float64 estimated Jaccard to duplicate_of (1.0 for exact)
    candidate_pairs: int = 0


def find_duplicates(exact_keys: np.ndarray, fingerprints: Optional[np.ndarray], keys: Optional[np.ndarray],
                    threshold: float) -> Duplicates:
    """Keep the first row of each duplicate cluster, in input order.

    Exact: a row whose exact key was seen before duplicates that first row. Near (when
    `fingerprints` and band `keys` are given): among rows that are not exact duplicates, a row
    duplicates the most similar earlier *kept* row with estimated Jaccard >= threshold, the same
    decision as a loop that queries an LSH index and inserts only the rows it keeps.
    `keys` is modified in place (the exact duplicates' rows).
    """
    n = len(exact_keys)
    duplicate_of = np.full(n, -1, dtype=np.int64)
    kind = np.zeros(n, dtype=np.int8)
    similarity = np.zeros(n, dtype=np.float64)
    _, first, inverse = np.unique(exact_keys, return_index=True, return_inverse=True)
    first_of = first[inverse]
    exact = first_of != np.arange(n)
    duplicate_of[exact] = first_of[exact]
    kind[exact] = EXACT
    similarity[exact] = 1.0
    if fingerprints is None or keys is None:
        return Duplicates(duplicate_of, kind, similarity)
    # Exact duplicates take no part in the near search: their bucket keys are replaced (in
    # place, no copy of the index) by values of their own, so they collide with nothing.
    rows = np.nonzero(exact)[0].astype(np.uint64)
    keys[exact] = (_mix64(rows[:, None] * np.uint64(keys.shape[1]) + np.arange(keys.shape[1], dtype=np.uint64)
                          + np.uint64(0x5EED << 40)) >> np.uint64(32)).astype(keys.dtype)
    pairs, sims, compared = verified_pairs(keys, fingerprints, threshold)
    # Decide rows in input order; for each row, its most similar earlier partner first.
    order = np.lexsort((pairs[:, 0], -sims, pairs[:, 1])) if len(pairs) else np.zeros(0, dtype=np.int64)
    kept = kind == 0
    for earlier, later, sim in zip(pairs[order, 0].tolist(), pairs[order, 1].tolist(), sims[order].tolist()):
        if kept[later] and kept[earlier]:
            kept[later] = False
            duplicate_of[later] = earlier
            kind[later] = NEAR
            similarity[later] = sim
    return Duplicates(duplicate_of, kind, similarity, candidate_pairs=compared)


def cluster_report(ids: Sequence[str], dups: Duplicates, largest: int = 5) -> dict:
    """Cluster size histogram and the largest clusters (a cluster: a kept row and every row that
    duplicates it, directly or through another removed row)."""
    root = dups.duplicate_of.copy()
    idx = np.arange(len(root))
    root[root < 0] = idx[root < 0]
    while True:  # follow chains (exact copy of a near duplicate) to the kept row
        nxt = root[root]
        if np.array_equal(nxt, root):
            break
        root = nxt
    sizes = np.bincount(root, minlength=len(root))
    multi = np.nonzero(sizes > 1)[0]
    histogram = {str(size): int(count) for size, count in zip(*np.unique(sizes[multi], return_counts=True))}
    top = sorted(multi.tolist(), key=lambda r: (-int(sizes[r]), r))[:largest]
    return {
        "clusters_with_duplicates": int(len(multi)),
        "cluster_size_histogram": histogram,
        "largest_clusters": [{"kept": ids[r] if isinstance(ids[r], str) else uint64_to_id(ids[r]), "size": int(sizes[r])}
                             for r in top],
    }
