"""Stage `replay`: the base model's own answers to general requests -> data/replay/answers.jsonl.

    python -m stages.replay

Reads train.replay.prompts (one request per line), refuses any that repeats a probe or a test
prompt, answers the rest with the base model (greedy, as evaluation generates) and writes them as
records that the train stage mixes into its rows (train.replay.share; stages/lib/replay.py says
why). train.replay.share 0: an empty file, no model loaded, and training on the task rows alone.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from stages.lib.io import read_jsonl, read_probes, resolve_data_path, write_json, write_jsonl
from stages.lib.params import load_params
from stages.lib.stage import StageError

TEST = Path("data/split/test.jsonl")
ANSWERS = Path("data/replay/answers.jsonl")
REPORT = Path("reports/replay.json")


def _protected_prompts(params) -> dict[str, list[str]]:
    """The prompts evaluation asks: the probes' and the test split's user turns."""
    from stages.lib.records import prompt_messages

    probes = [row["prompt"] for row in read_probes(params.evaluate.probes, missing_ok=True)[0]]
    test = [m["content"] for r in read_jsonl(TEST) for m in prompt_messages(r) if m["role"] == "user"] \
        if TEST.exists() else []
    return {"probes": probes, "test split": test}


def main() -> int:
    from stages.lib.replay import ReplayError, check_no_overlap, read_prompts, replay_records

    params = load_params(stage="replay")
    settings = params.train.replay
    started = time.perf_counter()
    if settings.share == 0:
        write_jsonl(ANSWERS, [])
        write_json(REPORT, {"enabled": False, "prompts": 0, "answered": 0})
        print("replay: off (train.replay.share is 0)", file=sys.stderr)
        return 0
    try:
        path = resolve_data_path(settings.prompts)
        prompts = read_prompts(path.read_text(encoding="utf-8"))
        if not prompts:
            raise ReplayError("no prompts in the file")
        check_no_overlap(prompts, _protected_prompts(params))
    except FileNotFoundError:
        raise StageError(f"{settings.prompts} not found (train.replay.prompts; train.replay.share 0 turns "
                         "replay off)") from None
    except ReplayError as exc:
        raise StageError(f"train.replay.prompts {settings.prompts}: {exc}") from None

    from stages.lib.generation import generate, load_for_inference
    from stages.lib.stage import peak_rss_mib

    model, tokenizer = load_for_inference(params)
    answers = generate(model, tokenizer, [[{"role": "user", "content": p}] for p in prompts],
                       max_new_tokens=settings.max_new_tokens, batch_size=params.evaluate.batch_size,
                       desc="replay: base answers", key="train.replay.max_new_tokens")
    records = replay_records(prompts, answers, source=settings.prompts)
    write_jsonl(ANSWERS, records)
    write_json(REPORT, {"enabled": True, "prompts": len(prompts), "answered": len(records),
                        "empty_answers": len(prompts) - len(records), "max_new_tokens": settings.max_new_tokens,
                        "wall_s": round(time.perf_counter() - started, 1), "peak_rss_mib": peak_rss_mib()})
    print(f"replay: {len(records)} of {len(prompts)} prompts answered by the base model -> {ANSWERS}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    from stages.lib.modeling import run_model_stage

    sys.exit(run_model_stage("replay", main))
