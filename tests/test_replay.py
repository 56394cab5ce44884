"""Replay of the base model's answers (stages/lib/replay.py): the prompt file, the refusal of
prompts that repeat the evaluation, the records and the mixing share."""
import json
from pathlib import Path

import pytest

from stages.lib.replay import (ReplayError, check_no_overlap, mix_replay, read_prompts, replay_copies,
                               replay_records)

ROOT = Path(__file__).resolve().parents[1]


def _probe_prompts():
    with open(ROOT / "data/probes/general.jsonl", encoding="utf-8") as handle:
        return [json.loads(line)["prompt"] for line in handle if line.strip()]


def test_the_shipped_prompts_read_and_repeat_no_probe():
    prompts = read_prompts((ROOT / "data/replay/prompts.txt").read_text(encoding="utf-8"))
    assert len(prompts) >= 50 and all(not p.startswith("#") for p in prompts)
    check_no_overlap(prompts, {"probes": _probe_prompts()})  # raises on any overlap


def test_every_probe_prompt_is_refused_even_reworded_in_case_and_punctuation():
    probes = _probe_prompts()
    for probe in probes:
        variant = probe.upper().replace("?", " ?!")
        with pytest.raises(ReplayError, match="probes"):
            check_no_overlap(["Describe a cup of tea.", variant], {"probes": probes})


def test_a_prompt_inside_a_test_ticket_is_refused_and_all_offenders_are_named():
    ticket = "Hello, my router keeps dropping the connection every evening since the update. Please help."
    prompts = ["my router keeps dropping the connection every evening", "Write a haiku about rain.",
               "What is the capital of Japan? Answer with one word."]
    with pytest.raises(ReplayError) as error:
        check_no_overlap(prompts, {"test split": [ticket], "probes": _probe_prompts()})
    message = str(error.value)
    assert message.startswith("2 replay prompt(s)") and "test split" in message and "probes" in message
    assert "haiku" not in message
    # A short common phrase inside a long text is not an overlap (below min_contained_chars).
    check_no_overlap(["Please help."], {"test split": [ticket]})


def test_repeated_prompts_and_comments():
    assert read_prompts("# a comment\n\n  First request  \nSecond request\n") == ["First request", "Second request"]
    with pytest.raises(ReplayError, match="repeated"):
        read_prompts("Same request\nSame request\n")


def test_records_skip_empty_answers_and_have_stable_ids():
    records = replay_records(["Say hi.", "Say nothing."], [" Hi! ", "  "], source="data/replay/prompts.txt")
    assert len(records) == 1
    record = records[0]
    assert record["messages"] == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]
    assert record["id"] == replay_records(["Say hi."], ["other answer"], source="x")[0]["id"]
    assert record["meta"] == {"replay": True} and record["source"]["prompt"] == 1
    with pytest.raises(ValueError):
        replay_records(["a"], [], source="x")


@pytest.mark.parametrize("n_train,n_replay,share", [(1616, 60, 0.12), (1000, 10, 0.3), (50, 200, 0.1)])
def test_mixing_reaches_about_the_share(n_train, n_replay, share):
    copies = replay_copies(n_train, n_replay, share)
    assert copies >= 1
    mixed_share = copies * n_replay / (n_train + copies * n_replay)
    # Whole copies: within half a copy of the requested share, or one copy when one is already more.
    if copies > 1:
        assert abs(mixed_share - share) <= 0.5 * n_replay / (n_train + copies * n_replay) + 1e-9
    train = [{"id": f"t{i}"} for i in range(n_train)]
    replay = [{"id": f"r{i}"} for i in range(n_replay)]
    rows, used = mix_replay(train, replay, share)
    assert used == copies and rows[:n_train] == train and len(rows) == n_train + copies * n_replay


def test_share_zero_or_no_rows_mixes_nothing():
    train = [{"id": "t"}]
    assert mix_replay(train, [{"id": "r"}], 0.0) == (train, 0)
    assert mix_replay(train, [], 0.5) == (train, 0)
