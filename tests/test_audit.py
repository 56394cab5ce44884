"""Leakage audit (stages/lib/audit.py): each check finds what it should, and boilerplate
(JSON skeletons, label combinations, a shared system prompt, stock phrases) is never leakage."""
from __future__ import annotations

import json
import random

import numpy as np

from stages.lib import audit, minhash, splitting
from stages.lib.io import write_jsonl
from stages.lib.records import make_record

VOCAB = [f"w{i}" for i in range(5000)]
SYSTEM = ("You are the triage assistant of a support team. Read the customer message and reply with "
          "only a JSON object with the keys category, priority, product, sentiment and summary.")


def _text(rng, k):
    return " ".join(rng.choice(VOCAB) for _ in range(k))


def _answer(rng, summary=None):
    return json.dumps({"category": rng.choice(["billing", "bug", "shipping"]), "priority": rng.choice(["low", "high"]),
                       "product": rng.choice(["router", "mobile app"]), "sentiment": rng.choice(["neutral", "negative"]),
                       "summary": summary or _text(rng, 6)})


def _record(user, answer):
    return make_record([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user},
                        {"role": "assistant", "content": answer}], {"file": "t", "line": 1})


def _audit(records, test_rows, tmp_path, n=13, max_df=0.01):
    """Run the checks with the given rows on the test side (everything else train)."""
    path = tmp_path / "r.jsonl"
    write_jsonl(path, records)
    hasher = minhash.MinHasher(64, 3, 1)
    counts = {role: audit.WordFrequency() for role in splitting.COMPARED_ROLES}
    index = splitting.build_index(path, hasher, None, None, splitting.TokenStore(tmp_path), observers=counts)
    sides = np.zeros(len(records), dtype=np.int8)
    sides[list(test_rows)] = splitting.TEST
    checks = audit.ngram_checks(index, sides, n, max_df, counts, hasher.words)
    results = {f"ngram_{role}": check.result(len(records), max_df) for role, check in checks.items()}
    results["exact_prompt"] = audit.exact_check(index.prompt_keys, sides)
    results["near_duplicate"] = audit.near_duplicate_check(index, sides, 0.5)
    return results, checks


def _pairs(check):
    return [tuple(p) for p in check.pairs.tolist()]


def _base(rng, n=200):
    return [_record(f"Hello team, {_text(rng, 25)}. Thanks for your help.", _answer(rng)) for _ in range(n)]


def test_templates_skeletons_labels_and_system_prompt_are_not_leakage(tmp_path):
    """Every row shares the system prompt, a greeting, a sign-off and the JSON skeleton; label
    combinations repeat; none of it is a copied example."""
    rng = random.Random(0)
    results, _ = _audit(_base(rng), range(0, 200, 10), tmp_path)
    assert {name: len(check.pairs) for name, check in results.items()} == {
        "ngram_user": 0, "ngram_assistant": 0, "exact_prompt": 0, "near_duplicate": 0}
    assert results["ngram_assistant"].detail["boilerplate_words"] > 5


def test_a_passage_pasted_from_a_test_row_into_a_train_row_is_found(tmp_path):
    rng = random.Random(1)
    records = _base(rng)
    passage = _text(rng, 30)
    records[10] = _record(f"My question: {passage}", _answer(rng))                       # test
    records[11] = _record(f"{_text(rng, 40)} Quoting a ticket: {passage} {_text(rng, 20)}", _answer(rng))  # train
    results, checks = _audit(records, range(0, 200, 10), tmp_path)
    assert _pairs(results["ngram_user"]) == [(11, 10)]
    assert results["near_duplicate"].pairs.size == 0   # too different overall for MinHash
    # The shared run is 13 *content* words of the passage (words in > 10 of these 200 rows dropped).
    shared = checks["user"].shared_text(records[11], records[10]).split()
    assert len(shared) == 13
    remaining = iter(passage.split())
    assert all(word in remaining for word in shared)   # a subsequence of the passage


def test_a_copied_free_text_answer_is_found_in_assistant_turns(tmp_path):
    rng = random.Random(2)
    records = _base(rng)
    summary = _text(rng, 20)
    records[20] = _record(_text(rng, 25), _answer(rng, summary))   # test
    records[21] = _record(_text(rng, 25), _answer(rng, summary))   # train, other prompt
    results, _ = _audit(records, range(0, 200, 10), tmp_path)
    assert _pairs(results["ngram_assistant"]) == [(21, 20)]
    assert results["ngram_user"].pairs.size == 0


def test_an_ngram_in_many_rows_is_boilerplate_even_of_content_words(tmp_path):
    rng = random.Random(3)
    records = _base(rng)
    stock = _text(rng, 15)
    for i in range(0, 200, 5):   # in 40 rows (20%): a stock paragraph, not a copy
        records[i] = _record(f"{_text(rng, 10)} {stock}", _answer(rng))
    results, _ = _audit(records, range(0, 200, 10), tmp_path, max_df=0.05)
    assert results["ngram_user"].pairs.size == 0


def test_exact_and_near_checks_pair_test_rows_with_train_rows(tmp_path):
    rng = random.Random(4)
    records = _base(rng, 50)
    records[1] = _record(records[0]["messages"][1]["content"].upper(), _answer(rng))    # same prompt
    tokens = records[2]["messages"][1]["content"].split()
    tokens[5] = "changed"
    records[3] = _record(" ".join(tokens), records[2]["messages"][2]["content"])         # near copy
    results, _ = _audit(records, [0, 2], tmp_path)
    assert _pairs(results["exact_prompt"]) == [(1, 0)]
    assert (3, 2) in _pairs(results["near_duplicate"])


def test_word_frequency_counts_documents_not_occurrences():
    counts = audit.WordFrequency()
    hasher = minhash.WordHasher()
    texts = [[b"a", b"a", b"b"], [b"a"], [b"c"], [b"a", b"c"]]
    flat = hasher.hash_words([w for t in texts for w in t])
    counts.add(flat, np.array([len(t) for t in texts]))
    assert counts.frequent(0.1).size == 0            # cutoff max(10, 0.4): nothing is frequent
    for _ in range(3):
        counts.add(flat, np.array([len(t) for t in texts]))
    frequent = counts.frequent(0.1)   # 16 records, cutoff 10: "a" is in 12, "c" in 8
    assert frequent.tolist() == hasher.hash_words([b"a"]).tolist()
