"""Group-aware split (stages/lib/splitting.py): invariants, determinism, order independence,
append stability, and no near-duplicate pair across train and test."""
from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.lib import minhash, splitting
from stages.lib.io import write_jsonl
from stages.lib.params import SplitParams
from stages.lib.records import make_record

VOCAB = [f"w{i}" for i in range(3000)]


def _record(user: str, answer: str, meta: dict | None = None) -> dict:
    return make_record([{"role": "system", "content": "Shared system prompt for every row."},
                        {"role": "user", "content": user}, {"role": "assistant", "content": answer}],
                       {"file": "t.jsonl", "line": 1}, meta)


def _dataset(n: int, seed: int = 0, near_share: float = 0.3) -> list[dict]:
    """n rows, a share of them edited copies (~0.6-0.9 similar) of earlier rows."""
    rng = random.Random(seed)
    records = []
    while len(records) < n:
        if records and rng.random() < near_share:
            source = rng.choice(records)
            tokens = source["messages"][1]["content"].split()
            for _ in range(rng.randint(1, 3)):
                tokens[rng.randrange(len(tokens))] = rng.choice(VOCAB)
            records.append(_record(" ".join(tokens), source["messages"][2]["content"]))
        else:
            records.append(_record(" ".join(rng.choice(VOCAB) for _ in range(30)),
                                   " ".join(rng.choice(VOCAB) for _ in range(12))))
    return records


def _split(records, tmp_path, params=None, force_lsh=False, name="r.jsonl"):
    """{id: side} for `records` as the split stage assigns them."""
    params = params or SplitParams(test_fraction=0.2, validation_fraction=0.1)
    path = tmp_path / name
    write_jsonl(path, records)
    hasher = minhash.MinHasher(64, 3, 1)
    layout = (minhash.optimal_bands(params.group_threshold, 64, *minhash.RECALL_WEIGHTS) if force_lsh
              else splitting.group_layout(len(records), params.group_threshold, 64))
    scratch = tmp_path / f"tokens-{name}"
    scratch.mkdir()
    index = splitting.build_index(path, hasher, layout, params.group_by, splitting.TokenStore(scratch))
    grouping = splitting.split_groups(index, params)
    ids = [minhash.uint64_to_id(v) for v in index.ids]
    return dict(zip(ids, grouping.sides.tolist())), index, grouping


def test_side_of_is_pure_and_follows_the_fractions():
    keys = [f"{i:016x}" for i in range(20000)]
    sides = np.array([splitting.side_of(k, 42, 0.1, 0.05) for k in keys])
    assert abs((sides == splitting.TEST).mean() - 0.1) < 0.01
    assert abs((sides == splitting.VALIDATION).mean() - 0.05) < 0.01
    assert splitting.side_of(keys[0], 42, 0.1, 0.05) == sides[0]
    assert (np.array([splitting.side_of(k, 7, 0.1, 0.05) for k in keys[:2000]]) != sides[:2000]).any()


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.lists(st.tuples(st.integers(0, 39), st.integers(0, 39)), max_size=60))
def test_connected_groups_label_each_component_by_its_smallest_row(n, raw_edges):
    edges = np.array([(a % n, b % n) for a, b in raw_edges], dtype=np.int64).reshape(-1, 2)
    labels = splitting.connected_groups(n, edges)
    # Reference: flood fill over an adjacency list.
    neighbours = {i: set() for i in range(n)}
    for a, b in edges.tolist():
        neighbours[a].add(b)
        neighbours[b].add(a)
    expected = [None] * n
    for start in range(n):          # ascending, so each component is labelled by its smallest row
        if expected[start] is None:
            todo = [start]
            while todo:
                row = todo.pop()
                if expected[row] is None:
                    expected[row] = start
                    todo.extend(neighbours[row])
    assert labels.tolist() == expected


def test_split_is_disjoint_covering_and_deterministic(tmp_path):
    records = _dataset(300)
    sides, _, _ = _split(records, tmp_path)
    again, _, _ = _split(records, tmp_path, name="again.jsonl")
    assert set(sides) == {r["id"] for r in records}          # covering; a dict: each id on one side
    assert sides == again
    counts = np.bincount(list(sides.values()), minlength=3)
    assert counts[splitting.TEST] > 20 and counts[splitting.VALIDATION] > 5


def test_split_does_not_depend_on_row_order(tmp_path):
    records = _dataset(300, seed=1)
    shuffled = records[:]
    random.Random(5).shuffle(shuffled)
    assert _split(records, tmp_path)[0] == _split(shuffled, tmp_path, name="shuffled.jsonl")[0]


def test_lsh_and_exhaustive_grouping_agree_on_clear_cases(tmp_path):
    records = _dataset(200, seed=2)
    assert _split(records, tmp_path)[0] == _split(records, tmp_path, force_lsh=True, name="lsh.jsonl")[0]


def _pairs_across(sides, index, threshold):
    pairs, _ = splitting.all_pairs_above(index.fingerprints, threshold)
    ids = [minhash.uint64_to_id(v) for v in index.ids]
    return [(a, b) for a, b in pairs.tolist()
            if (sides[ids[a]] == splitting.TEST) != (sides[ids[b]] == splitting.TEST)]


@pytest.mark.parametrize("force_lsh", [False, True])
def test_no_near_duplicate_pair_across_train_and_test(tmp_path, force_lsh):
    records = _dataset(400, seed=3, near_share=0.5)
    params = SplitParams(test_fraction=0.3, group_threshold=0.5)
    sides, index, grouping = _split(records, tmp_path, params, force_lsh=force_lsh)
    assert grouping.near_pairs > 50
    # LSH may miss a pair right at the threshold; exhaustive grouping never does.
    assert len(_pairs_across(sides, index, 0.5)) == 0 if not force_lsh else len(_pairs_across(sides, index, 0.6)) == 0


def test_appending_rows_only_moves_groups_the_new_rows_join(tmp_path):
    old = _dataset(300, seed=4)
    old_sides, _, _ = _split(old, tmp_path)
    unrelated = _dataset(100, seed=99, near_share=0.0)
    sides, _, _ = _split(old + unrelated, tmp_path, name="appended.jsonl")
    assert all(sides[i] == s for i, s in old_sides.items())   # unrelated rows move nothing
    # A new row close to an old one joins its group: only that group may move.
    bridge = _record(old[0]["messages"][1]["content"] + " extra", old[0]["messages"][2]["content"])
    sides, index, grouping = _split(old + [bridge], tmp_path, name="bridge.jsonl")
    ids = [minhash.uint64_to_id(v) for v in index.ids]
    key_of = dict(zip(ids, grouping.group_keys.tolist()))
    moved = [i for i, s in old_sides.items() if sides[i] != s]
    assert all(key_of[i] == key_of[bridge["id"]] for i in moved)
    assert sides[bridge["id"]] == sides[old[0]["id"]]


def test_group_by_keeps_a_conversation_together(tmp_path):
    rng = random.Random(6)
    records = [_record(" ".join(rng.choice(VOCAB) for _ in range(25)), f"answer {i}", {"conv": f"c{i % 15}"})
               for i in range(150)]
    sides, _, _ = _split(records, tmp_path, SplitParams(group_by="conv", test_fraction=0.3))
    by_conv = {}
    for record in records:
        by_conv.setdefault(record["meta"]["conv"], set()).add(sides[record["id"]])
    assert all(len(s) == 1 for s in by_conv.values())
    assert len({next(iter(s)) for s in by_conv.values()}) > 1


def test_same_prompt_or_same_rare_answer_go_together_but_common_answers_do_not(tmp_path):
    rng = random.Random(7)
    text = lambda k: " ".join(rng.choice(VOCAB) for _ in range(k))  # noqa: E731
    records = []
    for i in range(40):   # 40 prompts asked twice with different answers
        prompt = text(20)
        records += [_record(prompt, text(10)), _record(prompt.upper() + "!", text(10))]
    rare = text(15)
    records += [_record(text(20), rare), _record(text(20), rare)]   # one answer given twice
    records += [_record(text(20), "positive") for _ in range(60)]   # a bare label: common
    sides, index, grouping = _split(records, tmp_path, SplitParams(test_fraction=0.3, ngram_max_df=0.01))
    for i in range(0, 80, 2):
        assert sides[records[i]["id"]] == sides[records[i + 1]["id"]]
    assert sides[records[80]["id"]] == sides[records[81]["id"]]
    label_sides = {sides[r["id"]] for r in records[82:]}
    assert len(label_sides) > 1   # the 60 "positive" rows were not forced into one group


def test_sequence_keys_ignore_case_and_punctuation_and_never_join_empty_texts():
    hasher = minhash.WordHasher()
    texts = [b"hello world", b"hello world", b"world hello", b"", b""]
    tokens = [t.split() for t in texts]
    lengths = np.array([len(t) for t in tokens])
    keys = splitting.sequence_keys(hasher.hash_words([w for t in tokens for w in t]), lengths,
                                   np.arange(5, dtype=np.uint64))
    assert keys[0] == keys[1] != keys[2]
    assert keys[3] != keys[4]


def test_token_store_round_trip(tmp_path):
    store = splitting.TokenStore(tmp_path)
    store.append("user", np.array([1, 2, 3], dtype=np.uint64), np.array([2, 0, 1]))
    store.append("user", np.array([4], dtype=np.uint64), np.array([1]))
    store.append("assistant", np.zeros(0, dtype=np.uint64), np.array([0, 0, 0, 0]))
    store.close()
    batches = list(store.batches("user", batch=3))
    assert [(lo, h.tolist(), n.tolist()) for lo, h, n in batches] == [(0, [1, 2, 3], [2, 0, 1]), (3, [4], [1])]


def test_assign_sides_is_side_of_for_every_group():
    rng = np.random.default_rng(7)
    keys = np.concatenate([rng.integers(0, 2**64, size=20000, dtype=np.uint64),
                           np.array([0, 1, 2**64 - 1, 2**63], dtype=np.uint64)])
    for seed, test, validation in [(42, 0.1, 0.03), (0, 0.5, 0.0), (7, 0.0, 0.2)]:
        sides = splitting.assign_sides(keys, seed, test, validation)
        expected = [splitting.side_of(minhash.uint64_to_id(k), seed, test, validation) for k in keys.tolist()]
        assert sides.tolist() == expected


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(0, 5), max_size=8), max_size=6))
def test_distinct_per_text_and_unique_counts(texts):
    hashes = np.array([w for t in texts for w in t], dtype=np.uint64)
    lengths = np.array([len(t) for t in texts], dtype=np.int64)
    distinct, owner = splitting.distinct_per_text(hashes, lengths)
    assert sorted(zip(owner.tolist(), distinct.tolist())) == sorted({(i, w) for i, t in enumerate(texts) for w in t})
    values, counts = splitting.unique_counts(hashes)
    expected_values, expected_counts = np.unique(hashes, return_counts=True)
    assert values.tolist() == expected_values.tolist() and counts.tolist() == expected_counts.tolist()
    words, documents = splitting.batch_document_counts(hashes, lengths)
    assert dict(zip(words.tolist(), documents.tolist())) == {
        w: sum(w in t for t in texts) for w in {w for t in texts for w in t}}
