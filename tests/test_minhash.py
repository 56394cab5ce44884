"""Vectorised MinHash, LSH candidates and the dedup decision (stages/lib/minhash.py)."""
from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.lib import minhash
from stages.lib.text import shingles, word_bytes, words


def _jaccard(a: str, b: str, k: int = 3) -> float:
    sa, sb = set(shingles(words(a), k)), set(shingles(words(b), k))
    return len(sa & sb) / len(sa | sb)


def _texts(n: int, seed: int = 0, length: int = 40) -> list[str]:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(2000)]
    return [" ".join(rng.choice(vocab) for _ in range(length)) for _ in range(n)]


def _edit(text: str, changes: int, seed: int) -> str:
    rng = random.Random(seed)
    tokens = text.split()
    for _ in range(changes):
        tokens[rng.randrange(len(tokens))] = f"x{rng.randrange(10**6)}"
    return " ".join(tokens)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.sampled_from(["a", "b", "c", "d"]), max_size=9), max_size=6), st.integers(1, 4))
def test_ngram_hashes_match_the_ngrams(texts, n):
    """Equal hashes <=> equal n-grams, counts per text as the definition says (short texts too)."""
    hasher = minhash.WordHasher()
    lengths = np.array([len(t) for t in texts], dtype=np.int64)
    flat = [w.encode() for t in texts for w in t]
    for short in (True, False):
        hashes, counts = minhash.ngram_hashes(hasher.hash_words(flat), lengths, n, short)
        expected = []
        for t in texts:
            grams = [tuple(t[i:i + n]) for i in range(len(t) - n + 1)]
            if short and 0 < len(t) < n:
                grams = [tuple(t)]
            expected += grams
        assert counts.tolist() == [sum(1 for _ in ([tuple(t)] if short and 0 < len(t) < n else range(max(len(t) - n + 1, 0))))
                                   for t in texts]
        assert len(hashes) == len(expected)
        for i in range(len(expected)):
            for j in range(len(expected)):
                assert (hashes[i] == hashes[j]) == (expected[i] == expected[j])


def test_signatures_are_deterministic_and_seeded():
    texts = _texts(5)
    a = minhash.MinHasher(64, 3, seed=1).signatures(texts)
    assert np.array_equal(a, minhash.MinHasher(64, 3, seed=1).signatures(texts))
    assert not np.array_equal(a, minhash.MinHasher(64, 3, seed=2).signatures(texts))


def test_estimate_tracks_true_jaccard_within_binomial_error():
    base = _texts(300, seed=3, length=60)
    pairs = [(t, _edit(t, k % 8, k)) for k, t in enumerate(base)]
    hasher = minhash.MinHasher(128, 3, seed=1)
    sig_a = hasher.signatures([a for a, _ in pairs])
    sig_b = hasher.signatures([b for _, b in pairs])
    estimate = (minhash.fingerprint(sig_a) == minhash.fingerprint(sig_b)).mean(axis=1)
    truth = np.array([_jaccard(a, b) for a, b in pairs])
    error = estimate - truth
    assert abs(error.mean()) < 0.01          # unbiased
    assert error.std() < 0.05                # binomial sd at J=0.5 and 128 perms is 0.044


def test_text_without_words_never_collides():
    hasher = minhash.MinHasher(32, 3, seed=1)
    sig = hasher.signatures(["", "!!!", "some words here"])
    assert (sig[:2] == np.iinfo(np.uint32).max).all()
    keys = minhash.band_keys(sig, minhash.Bands(8, 4))
    assert len(set(keys[0]) & set(keys[1])) == 0
    assert len(minhash.candidate_pairs(keys)) == 0


def test_optimal_bands_fit_and_recall_leaning_layout_has_more_bands():
    for threshold in (0.5, 0.7, 0.9):
        layout = minhash.optimal_bands(threshold, 128)
        assert layout.bands * layout.rows <= 128
    assert (minhash.optimal_bands(0.5, 128, 0.2, 0.8).bands > minhash.optimal_bands(0.5, 128).bands)


def test_candidate_pairs_in_a_huge_bucket_stay_linear_and_include_the_first_rows():
    keys = np.zeros((1000, 1), dtype=np.uint64)  # one bucket of 1000 rows
    pairs = minhash.candidate_pairs(keys, window=4, anchors=2)
    assert len(pairs) < 1000 * 6
    fingerprints = np.zeros((1000, 8), dtype=np.uint16)   # all identical: every candidate verifies
    verified, sims, compared = minhash.verified_pairs(keys, fingerprints, 0.9, window=4, anchors=2)
    assert compared == len(pairs) and np.array_equal(verified, pairs) and (sims == 1).all()
    assert (pairs[:, 0] < pairs[:, 1]).all()
    late = pairs[pairs[:, 1] == 999]
    assert {0, 1, 995, 996, 997, 998} == set(late[:, 0].tolist())


def _dedup(texts, threshold=0.7, near=True):
    hasher = minhash.MinHasher(128, 3, seed=1)
    signatures = hasher.signatures(texts)
    layout = minhash.optimal_bands(threshold, 128, *minhash.RECALL_WEIGHTS)
    exact = minhash.text_keys(texts)
    return minhash.find_duplicates(exact, minhash.fingerprint(signatures) if near else None,
                                   minhash.band_keys(signatures, layout) if near else None, threshold)


def test_exact_duplicates_ignore_case_and_spacing_and_keep_the_first():
    texts = ["Hello there friend", "hello   THERE friend", "something else entirely", "Hello there friend"]
    dups = _dedup(texts, near=False)
    assert dups.kind.tolist() == [0, minhash.EXACT, 0, minhash.EXACT]
    assert dups.duplicate_of.tolist() == [-1, 0, -1, 0]


def test_near_duplicates_are_removed_and_distinct_rows_kept():
    base = _texts(50, seed=5, length=60)
    texts = base + [_edit(t, 2, i) for i, t in enumerate(base[:20])]   # ~0.8 similar copies
    dups = _dedup(texts)
    assert (dups.kind[:50] == 0).all()
    assert (dups.kind[50:] == minhash.NEAR).sum() >= 19
    removed = np.nonzero(dups.kind == minhash.NEAR)[0]
    assert (dups.duplicate_of[removed] == removed - 50).all()
    assert (dups.similarity[removed] >= 0.7).all()


def test_near_duplicate_points_at_a_kept_row_and_chains_are_reported():
    a = _texts(1, seed=9, length=60)[0]
    b = _edit(a, 2, 1)
    texts = [a, b, b.upper()]    # b near a; b.upper() is an exact copy of b
    dups = _dedup(texts)
    assert dups.kind.tolist() == [0, minhash.NEAR, minhash.EXACT]
    assert dups.duplicate_of.tolist() == [-1, 0, 1]
    report = minhash.cluster_report(["A", "B", "C"], dups)
    assert report["cluster_size_histogram"] == {"3": 1}
    assert report["largest_clusters"] == [{"kept": "A", "size": 3}]


def test_removes_whatever_a_datasketch_loop_removes():
    """Same decision rule as the plain loop (query, insert if new), with a recall-leaning LSH
    layout: every row the loop removes is removed here too, and no original is removed."""
    datasketch = pytest.importorskip("datasketch")
    base = _texts(80, seed=11, length=50)
    texts = base + [_edit(t, 1, i) for i, t in enumerate(base[::3])]
    ours = set(np.nonzero(_dedup(texts).kind == 0)[0].tolist())
    lsh = datasketch.MinHashLSH(threshold=0.7, num_perm=128)
    theirs = set()
    for i, text in enumerate(texts):
        m = datasketch.MinHash(num_perm=128)
        m.update_batch([s.encode() for s in shingles(words(text), 3)])
        if not lsh.query(m):
            lsh.insert(i, m)
            theirs.add(i)
    assert ours <= theirs and set(range(80)) <= ours


def test_ids_round_trip_through_uint64():
    ids = ["0123456789abcdef", "ffffffffffffffff", "0000000000000000"]
    assert [minhash.uint64_to_id(v) for v in minhash.ids_to_uint64(ids)] == ids
    assert sorted(ids) == [minhash.uint64_to_id(v) for v in np.sort(minhash.ids_to_uint64(ids))]


def test_word_hashes_are_stable_across_instances():
    tokens = word_bytes("Stable hashes, on every machine.")
    assert np.array_equal(minhash.WordHasher().hash_words(tokens), minhash.WordHasher().hash_words(tokens))


def test_parse_batch_reports_damage(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": "a", "messages": []}\n\n{"broken\n{"id": "b"}\n')
    with pytest.raises(minhash.RecordFileError, match="line 3: not a record this pipeline wrote"):
        [minhash.parse_batch(batch) for batch in minhash.read_batches(path)]
    path.write_text('{"id": "a", "messages": []}\n{"id": "b"}\n')
    with pytest.raises(minhash.RecordFileError, match="line 2: not a record this pipeline wrote.*KeyError"):
        [minhash.parse_batch(batch) for batch in minhash.read_batches(path)]
    with pytest.raises(minhash.RecordFileError, match="not found"):
        list(minhash.read_batches(tmp_path / "none.jsonl"))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from(list("aZ_9 .,\n\t-éßİ日本ǅ\u00a0\u2003ꭰ")), max_size=30), max_size=8))
def test_hash_texts_is_hash_words_of_each_texts_words(texts):
    # The batched tokeniser gives exactly the tokens of text.word_bytes, text by text.
    hasher = minhash.WordHasher()
    hashes, lengths = hasher.hash_texts(texts)
    assert lengths.tolist() == [len(word_bytes(t)) for t in texts]
    assert hashes.tolist() == hasher.hash_words([w for t in texts for w in word_bytes(t)]).tolist()


def test_word_hashes_tell_words_apart():
    words_ = [w.encode() for w in ["ab", "ba", "a", "aa", "a" * 300, "a" * 299 + "b", "ab" * 200, "ba" * 200]]
    hashes = minhash.WordHasher().hash_words(words_)
    assert len(set(hashes.tolist())) == len(words_)
    vocabulary = [f"w{i}".encode() for i in range(200_000)]
    assert len(set(minhash.WordHasher().hash_words(vocabulary).tolist())) == len(vocabulary)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from(list("aAb ,.\n\t\x1c\x0bßSİi̇ǅǆ\u00a0\u2003日")), max_size=12), min_size=2, max_size=6))
def test_text_keys_are_equal_exactly_when_dedup_keys_are(texts):
    from stages.lib.text import dedup_key

    keys = minhash.text_keys(texts).tolist()
    assert keys == [minhash.text_keys([t])[0] for t in texts]   # independent of the batch
    for i in range(len(texts)):
        for j in range(len(texts)):
            assert (keys[i] == keys[j]) == (dedup_key(texts[i]) == dedup_key(texts[j])), (texts[i], texts[j])


def test_text_keys_of_long_tokens():
    a = "x" * 300 + "ab" + "y" * 300
    b = "x" * 300 + "ba" + "y" * 300
    c = "a" + "x" * 255 + "b" + "x" * 200
    d = "b" + "x" * 255 + "a" + "x" * 200   # the same bytes at positions 256 apart, swapped
    keys = minhash.text_keys([a, b, c, d, a.upper()]).tolist()
    assert len(set(keys[:4])) == 4 and keys[4] == keys[0]


def test_word_hashes_do_not_depend_on_where_the_buffer_is_cut(monkeypatch):
    texts = _texts(300, seed=3, length=40)
    whole = minhash.WordHasher().hash_texts(texts)
    monkeypatch.setattr(minhash, "_CHUNK_BYTES", 1000)   # cut the batch's buffer every ~1000 bytes
    cut = minhash.WordHasher().hash_texts(texts)
    assert np.array_equal(whole[0], cut[0]) and np.array_equal(whole[1], cut[1])


def test_read_batches_numbers_offsets_and_blank_lines(tmp_path):
    path = tmp_path / "r.jsonl"
    rows = [b'{"id": "%d", "messages": []}\n' % i for i in range(10)]
    content = rows[0] + b"\n" + rows[1] + b"   \r\n" + b"".join(rows[2:])
    path.write_bytes(content)
    batches = list(minhash.read_batches(path, batch_size=4))
    assert [len(b.lines) for b in batches] == [4, 4, 2]
    lines = [line for b in batches for line in b.lines]
    numbers = [n for b in batches for n in b.numbers]
    offsets = [o for b in batches for o in b.offsets]
    assert lines == rows and numbers == [1, 3, 5, 6, 7, 8, 9, 10, 11, 12]
    assert all(content[o:o + len(line)] == line for o, line in zip(offsets, lines))
