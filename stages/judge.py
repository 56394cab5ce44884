"""Stage `judge` (optional, `evaluate.judge.enabled`): an LLM judge compares base and tuned answers.

    python -m stages.judge

Reads the two evaluate stages' predictions, asks the judge (any OpenAI-compatible chat endpoint,
`evaluate.judge.url` / `.model`, key from the environment variable named by `.key_env`) about
every test row twice, once in each order, and writes every raw reply to data/judge/replies.jsonl
and the win / tie / loss / unparsable rates with 95 % intervals and the position-bias figures to
reports/judge.json. Off (the default), it writes {"enabled": false} and an empty replies file
without touching a model or a server, so the default `dvc repro` pays about a second for it.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from stages.lib.io import read_jsonl, write_json, write_jsonl
from stages.lib.params import load_params

BASE = Path("data/eval/base/predictions.jsonl")
TUNED = Path("data/eval/tuned/predictions.jsonl")
REPLIES = Path("data/judge/replies.jsonl")
REPORT = Path("reports/judge.json")
# Replies of an unfinished run (git-ignored, outside DVC's outputs): a failed run resumes from here.
JOURNAL = Path("checkpoints/judge/replies.partial.jsonl")


def main(argv: list[str] | None = None) -> int:
    from stages.lib import judge
    from stages.lib.pairing import pair_rows

    settings = load_params(stage="judge").evaluate.judge
    if not settings.enabled:
        write_jsonl(REPLIES, [])
        write_json(REPORT, judge.off_report())
        print("judge: off (evaluate.judge.enabled: false)", file=sys.stderr)
        return 0
    for path in (BASE, TUNED):
        if not path.exists():
            raise judge.JudgeError(f"{path} not found: run `dvc repro evaluate` first")
    pairs = pair_rows(read_jsonl(BASE), read_jsonl(TUNED))
    if not pairs:
        raise judge.JudgeError(f"{TUNED} has no rows: nothing to judge")

    client = judge.ChatClient(settings.url, settings.model, api_key=os.environ.get(settings.key_env),
                              timeout_s=settings.timeout_s, retries=settings.retries,
                              backoff_s=settings.backoff_s, max_backoff_s=settings.max_backoff_s)
    options = {"temperature": settings.temperature, "max_tokens": settings.max_tokens,
               **judge.response_format_option(settings.response_format)}
    if settings.seed is not None:
        options["seed"] = settings.seed

    def progress(done: int, total: int) -> None:
        if done == total or done % 10 == 0:
            print(f"judge: {done}/{total} judgements", file=sys.stderr)

    journal = judge.ReplyJournal(JOURNAL)
    if journal.replies:
        print(f"judge: resuming: {len(journal.replies)} replies from an unfinished run in {JOURNAL}", file=sys.stderr)
    ask = journal.wrap(lambda messages: client.chat(messages, **options), client.endpoint, settings.model, options)
    judgements = judge.judge_pairs(pairs, ask, settings.rubric, show_reference=settings.show_reference,
                                   concurrency=settings.concurrency, progress=progress)
    report = {"enabled": True, **judge.summarize(judgements)}
    write_jsonl(REPLIES, judgements)
    write_json(REPORT, report)
    journal.discard()
    win, tie, loss = report["win"], report["tie"], report["loss"]
    print(f"judge: tuned vs base over {report['rows']} rows: win {win['rate']:.2f} "
          f"[{win['lower']:.2f}, {win['upper']:.2f}], tie {tie['rate']:.2f}, loss {loss['rate']:.2f}, "
          f"flip rate {report['position_bias']['flip_rate']['rate']}", file=sys.stderr)
    if report["unparsable_judgements"]:
        print(f"judge: {report['unparsable_judgements']} of {report['judgements']} replies were unparsable "
              f"(counted as such, never as a win; raw replies in {REPLIES})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from stages.lib.stage import run_stage

    sys.exit(run_stage("judge", main))
