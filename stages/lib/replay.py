"""Replay of the base model's own answers, so that fine-tuning keeps its general behaviour.

Trained on the sample task alone, the default model learns the task and forgets how to answer
anything else: after 240 steps on the triage rows it answered "What is the capital of Japan?
Answer with one word." with "capital" and "What is the opposite of up?" with "up-negative"
(label-like words, as in the task's JSON), and its probe accuracy fell from 0.70 to 0.44; a lower
learning rate (1e-4) or LoRA on the attention only did not prevent it (0.51, 0.23). Mixing in
about 12 % of rows in which the base model answers general requests in its own words (a
self-distillation replay) kept the probe accuracy at the base model's 0.70 with the same task
scores (bench/NOTES.md, CPU section).

The answers are the base model's, so replay can only keep what the base model does, never teach
the probes: and no replay prompt may repeat a probe or a test prompt (`check_no_overlap`).
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Iterable, Mapping, Sequence


class ReplayError(ValueError):
    """The replay prompts cannot be used (missing, empty, or overlapping the evaluation)."""


def read_prompts(text: str) -> list[str]:
    """One prompt per non-empty line; lines starting with # are comments. Repeats are refused
    (they would weigh one request more than the others without saying so)."""
    prompts, seen, repeats = [], set(), []
    for line in text.splitlines():
        prompt = line.strip()
        if not prompt or prompt.startswith("#"):
            continue
        if prompt in seen:
            repeats.append(prompt)
            continue
        seen.add(prompt)
        prompts.append(prompt)
    if repeats:
        raise ReplayError(f"{len(repeats)} repeated prompt(s), e.g. {repeats[0]!r}")
    return prompts


def _normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


def check_no_overlap(prompts: Sequence[str], protected: Mapping[str, Iterable[str]],
                     min_contained_chars: int = 24) -> None:
    """Refuse replay prompts that repeat an evaluation prompt: equal after normalisation (case,
    punctuation, whitespace), or one contained in the other when the shorter has at least
    `min_contained_chars` characters. `protected` maps a name ("probes", "test split") to its
    prompts. Every offending prompt is named in one error."""
    problems = []
    normalised = [(prompt, _normalise(prompt)) for prompt in prompts]
    for name, texts in protected.items():
        for text in texts:
            other = _normalise(text)
            if not other:
                continue
            for prompt, mine in normalised:
                shorter = min(len(mine), len(other))
                if mine == other or (shorter >= min_contained_chars and (mine in other or other in mine)):
                    problems.append(f"{prompt!r} repeats a prompt of the {name} ({text[:80]!r})")
    if problems:
        raise ReplayError(f"{len(problems)} replay prompt(s) overlap the evaluation, which would then "
                          "measure them instead of general ability: " + "; ".join(problems[:5]))


def replay_records(prompts: Sequence[str], answers: Sequence[str], source: str) -> list[dict]:
    """Records in the project's format (id, messages, meta, source) for the prompts with a
    non-empty answer; ids are stable hashes of the prompt."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    records = []
    for line, (prompt, answer) in enumerate(zip(prompts, answers), start=1):
        if not answer.strip():
            continue
        digest = hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]
        records.append({"id": f"replay-{digest}",
                        "messages": [{"role": "user", "content": prompt},
                                     {"role": "assistant", "content": answer.strip()}],
                        "meta": {"replay": True}, "source": {"file": source, "prompt": line}})
    return records


def replay_copies(n_train: int, n_replay: int, share: float) -> int:
    """How many times the replay rows are repeated so that they are about `share` of the mixed
    training rows (at least once when share > 0 and there are replay rows)."""
    if share <= 0 or n_replay == 0 or n_train == 0:
        return 0
    return max(1, round(share * n_train / ((1 - share) * n_replay)))


def mix_replay(train_records: list[dict], replay: list[dict], share: float) -> tuple[list[dict], int]:
    """The training rows followed by the replay rows, repeated `replay_copies` times (the trainer
    shuffles); returns (rows, copies). Deterministic."""
    copies = replay_copies(len(train_records), len(replay), share)
    return train_records + replay * copies, copies
