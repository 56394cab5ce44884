"""`qlora-dvc`: the project's user commands (the pipeline itself is `dvc repro`).

    qlora-dvc generate "My order arrived broken"   # try the fine-tuned model
    qlora-dvc pr-report --base main                # a pull request's summary
    qlora-dvc prefs                                # judge base vs tuned answers blind, in a browser
    qlora-dvc table                                # base vs tuned, metrics as rows, with intervals

Run from the project root (the commands read params.yaml, models/ and reports/). Without the
console script installed, `python -m qlora_dvc <command> ...` is the same. Each command lives in
its own module, imported only when it runs, and fails the way stages do (stages/lib/stage.py):
one line on stderr and exit 1, `--debug` for the traceback.
"""
from __future__ import annotations

import importlib
import sys

# command -> (module with `main(argv) -> int`, one-line help)
COMMANDS = {
    "generate": ("qlora_dvc.generate", "answer a prompt with the base or fine-tuned model"),
    "pr-report": ("qlora_dvc.pr_report", "write the markdown summary of what a branch changed"),
    "prefs": ("qlora_dvc.prefs", "blind human preference, base vs tuned, in a local web page"),
    "cache": ("qlora_dvc.cache", "check the shared DVC remote (CI's cache) and push outputs + run-cache"),
    "table": ("qlora_dvc.table", "the reviewer's table of reports/eval.json (metrics as rows, 95 % intervals)"),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: qlora-dvc <command> [options]   (qlora-dvc <command> --help for its options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from stages.lib.stage import run_stage

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"qlora-dvc: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return run_stage(name, module.main, rest)


if __name__ == "__main__":
    sys.exit(main())
