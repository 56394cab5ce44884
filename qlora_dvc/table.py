"""Print the reviewer's table of reports/eval.json: metrics as rows; base model, tuned, delta
(tuned − base), the 95 % interval of the delta and a verdict as columns.

    qlora-dvc table                     # reports/eval.json of this workspace
    qlora-dvc table --rev main          # as committed at a git revision
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qlora-dvc table", description=__doc__.split("\n\n")[0])
    parser.add_argument("--metrics-file", default="reports/eval.json")
    parser.add_argument("--rev", help="read the file as committed at this git revision")
    args = parser.parse_args(argv)

    from stages.lib.review import eval_table, method_note, to_markdown

    if args.rev:
        done = subprocess.run(["git", "show", f"{args.rev}:./{args.metrics_file}"], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"table: {args.metrics_file} not found at {args.rev!r}: {done.stderr.strip()}", file=sys.stderr)
            return 1
        text = done.stdout
    else:
        try:
            with open(args.metrics_file, encoding="utf-8") as handle:
                text = handle.read()
        except FileNotFoundError:
            print(f"table: {args.metrics_file} does not exist; run `dvc repro` first", file=sys.stderr)
            return 1
    try:
        report = json.loads(text)
    except ValueError as exc:
        print(f"table: {args.metrics_file} is not valid JSON ({exc})", file=sys.stderr)
        return 1
    n = report.get("n") or {}
    if n:
        print("Rows: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in n.items()) + "\n")
    print(to_markdown(eval_table(report)))
    if any("lower" in str(v) for v in (report.get("delta") or {}).values()):
        print(f"\n{method_note(report)}")
    return 0
