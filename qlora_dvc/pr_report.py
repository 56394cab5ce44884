"""Write a pull-request summary: what this workspace changed against a base git revision.

    qlora-dvc pr-report --base main [--out reports/pr_summary.md]

The summary has a headline table of the key task metrics (base model vs tuned, and tuned vs the
tuned model at the base revision), the gates, `dvc metrics diff <base> --md`, `dvc params diff
<base> --md`, and a link to `dvc plots diff <base>` rendered as HTML. CI posts it as a PR comment
(.github/workflows/pr.yml). Exit status 1 with a one-line reason when it cannot be written: not a
git repository, not a DVC project, unknown base revision, no metrics yet, dvc failing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HEADLINE = ("exact_match", "rouge_l", "chrf", "json_valid", "schema_valid", "field_accuracy_mean",
            "general_accuracy", "general_perplexity", "loss", "perplexity", "empty_output_rate")


class ReportError(RuntimeError):
    """The summary cannot be written; the message says why and what to do."""


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ReportError(f"{cmd[0]} not found on PATH") from None


def dvc_executable() -> str:
    """The dvc of the running Python's environment (a venv need not be activated), else PATH's."""
    for name in ("dvc", "dvc.exe"):
        candidate = Path(sys.executable).parent / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("dvc")
    if not found:
        raise ReportError("dvc not found next to the Python interpreter or on PATH "
                          "(pip install -e . installs it)")
    return found


def _dvc(dvc: str, args: list[str], root: Path) -> str:
    done = _run([dvc, *args], cwd=root)
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise ReportError(f"`dvc {' '.join(args)}` failed: {detail[-1] if detail else f'exit {done.returncode}'}")
    return done.stdout


def _table_or_none(markdown: str) -> str | None:
    """dvc prints a bare header when nothing changed: treat a table without rows as nothing."""
    lines = [line for line in markdown.strip().splitlines() if line.strip()]
    return "\n".join(lines) if len(lines) > 2 else None


def _git_root() -> Path:
    done = _run(["git", "rev-parse", "--show-toplevel"])
    if done.returncode != 0:
        raise ReportError(f"{Path.cwd()} is not inside a git repository; run this from the project's "
                          "git checkout")
    return Path(done.stdout.strip())


def _dvc_root(git_root: Path) -> Path:
    here = Path.cwd().resolve()
    for candidate in (here, *here.parents):
        if (candidate / ".dvc").is_dir():
            return candidate
        if candidate == git_root.resolve():
            break
    raise ReportError(f"{here} is not inside a DVC project (no .dvc directory); run it from the project root")


def _resolve_base(base: str, root: Path) -> str:
    done = _run(["git", "rev-parse", "--verify", "--quiet", f"{base}^{{commit}}"], cwd=root)
    if done.returncode != 0:
        raise ReportError(f"base revision {base!r} not found in this repository (in CI, check out with "
                          f"fetch-depth: 0, or `git fetch origin {base}`)")
    return done.stdout.strip()


def _report_at(sha: str, path: Path, git_root: Path) -> dict | None:
    """reports/eval.json as committed at `sha`, or None if that revision has none (or a broken one)."""
    rel = path.resolve().relative_to(git_root.resolve()).as_posix()
    done = _run(["git", "show", f"{sha}:{rel}"], cwd=git_root)
    if done.returncode != 0:
        return None
    try:
        report = json.loads(done.stdout)
    except ValueError:
        return None
    return report if isinstance(report, dict) else None


def _num(value) -> float | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _fmt(value, signed: bool = False) -> str:
    value = _num(value)
    if value is None:
        return "—"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def _change(new, old, metric: str) -> str:
    from stages.lib.metrics import LOWER_IS_BETTER

    new, old = _num(new), _num(old)
    if new is None or old is None:
        return "—"
    diff = round(new - old, 4)
    if diff == 0:
        return _fmt(0.0, signed=True)
    better = diff < 0 if metric in LOWER_IS_BETTER else diff > 0
    return f"{_fmt(diff, signed=True)} {'🟢' if better else '🔴'}"


def headline_table(report: dict, base_report: dict | None, base_label: str) -> str:
    """Key metrics: base model, tuned, tuned − base, tuned at the base revision, and the change."""
    from stages.lib.metrics import LOWER_IS_BETTER

    base, tuned = report.get("base") or {}, report.get("tuned") or {}
    old_tuned = (base_report or {}).get("tuned") or {}
    names = [m for m in HEADLINE if m in base or m in tuned]
    if not names:
        return "*(no task metrics in the report)*"
    lines = [f"| metric | better | base model | tuned | tuned − base | tuned @ `{base_label}` | change vs `{base_label}` |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name in names:
        lines.append(f"| {name} | {'lower' if name in LOWER_IS_BETTER else 'higher'} | {_fmt(base.get(name))} "
                     f"| {_fmt(tuned.get(name))} | {_change(tuned.get(name), base.get(name), name)} "
                     f"| {_fmt(old_tuned.get(name))} | {_change(tuned.get(name), old_tuned.get(name), name)} |")
    return "\n".join(lines)


def _gates_section(report: dict, root: Path) -> str | None:
    import yaml

    from stages.lib.gates import check_gates

    try:
        params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8")) or {}
        gates = (params.get("evaluate") or {}).get("gates") or []
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    if not gates:
        return None
    failures = check_gates(list(gates), report)
    if not failures:
        return f"All {len(gates)} gate(s) pass: " + ", ".join(f"`{g}`" for g in gates)
    return "\n".join([f"**{len(failures)} of {len(gates)} gate(s) fail:**", ""]
                     + [f"- {f}" for f in failures])


def _preference(root: Path, sha: str, git_root: Path, base_label: str) -> str:
    """The LLM judge's and the blind raters' win rates, now and at the base revision."""
    import yaml

    from qlora_dvc.preference_report import JUDGE_REPORT, PREFS_REPORT, preference_section

    def now(rel: str) -> dict | None:
        try:
            report = json.loads((root / rel).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return report if isinstance(report, dict) else None

    try:
        params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8")) or {}
        model = ((params.get("evaluate") or {}).get("judge") or {}).get("model")
    except (OSError, yaml.YAMLError, AttributeError):
        model = None
    return preference_section(now(JUDGE_REPORT), now(PREFS_REPORT), _report_at(sha, root / JUDGE_REPORT, git_root),
                              _report_at(sha, root / PREFS_REPORT, git_root), base_label, model)


def _plots(dvc: str, base: str, root: Path, plots_dir: Path) -> Path | None:
    """Render `dvc plots diff <base>` to plots_dir/index.html (replaced atomically); None if none."""
    from stages.lib.io import atomic_dir

    try:
        with atomic_dir(plots_dir) as tmp:
            _dvc(dvc, ["plots", "diff", base, "--out", str(tmp)], root)
            if not (tmp / "index.html").is_file():
                raise ReportError("dvc plots diff rendered no index.html")
    except ReportError as exc:
        print(f"pr-report: no plots: {exc}", file=sys.stderr)
        return None
    return plots_dir / "index.html"


def build_summary(base: str, out: Path, *, metrics_file: str = "reports/eval.json",
                  plots_dir: str | None = "reports/pr_plots", plots_link: str | None = None,
                  note: str | None = None) -> str:
    git_root = _git_root()
    root = _dvc_root(git_root)
    sha = _resolve_base(base, root)
    metrics_path = root / metrics_file
    if not metrics_path.is_file():
        raise ReportError(f"no metrics yet: {metrics_file} does not exist; run `dvc repro` first")
    try:
        report = json.loads(metrics_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ReportError(f"{metrics_file} is not valid JSON ({exc}); re-run `dvc repro`") from None
    base_report = _report_at(sha, metrics_path, git_root)

    dvc = dvc_executable()
    metrics_md = _table_or_none(_dvc(dvc, ["metrics", "diff", base, "--md"], root))
    params_md = _table_or_none(_dvc(dvc, ["params", "diff", base, "--md"], root))
    head = _run(["git", "rev-parse", "--short", "HEAD"], cwd=root).stdout.strip() or "(no commit)"
    dirty = bool(_run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root).stdout.strip())

    parts = ["## Fine-tuning report", ""]
    if note:
        parts += [f"> {note}", ""]
    parts += [f"Workspace (`{head}`{' + uncommitted changes' if dirty else ''}) compared with "
              f"`{base}` (`{sha[:7]}`).", ""]
    n = report.get("n") or {}
    if n:
        parts += ["Rows scored: " + ", ".join(f"{k} {v}" for k, v in n.items()) + ".", ""]
    parts += ["### Headline", "", headline_table(report, base_report, base), ""]
    if base_report is None:
        parts += [f"*`{base}` has no {metrics_file}: nothing to compare the tuned model with.*", ""]
    gates = _gates_section(report, root)
    if gates:
        parts += ["### Gates", "", gates, ""]
    parts += ["### Preference (tuned vs base)", "", _preference(root, sha, git_root, base), ""]
    parts += [f"### Metrics changed (`dvc metrics diff {base}`)", "",
              metrics_md or "No metric changed.", "",
              f"### Params changed (`dvc params diff {base}`)", "",
              params_md or "No parameter changed.", ""]
    if plots_dir is not None:
        html_path = _plots(dvc, base, root, root / plots_dir)
        parts += ["### Plots", ""]
        if html_path is None and not plots_link:
            parts.append("No plots could be rendered (see the log).")
        else:
            target = plots_link or Path(os.path.relpath(html_path, out.resolve().parent)).as_posix()
            parts.append(f"[Loss curves and metric bars, overlaid with `{base}` (`dvc plots diff`)]({target})")
        parts.append("")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qlora-dvc pr-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="main", help="git revision to compare with (default: main)")
    parser.add_argument("--out", default="reports/pr_summary.md", help="markdown file to write")
    parser.add_argument("--metrics-file", default="reports/eval.json")
    parser.add_argument("--plots-dir", default="reports/pr_plots", help="where `dvc plots diff` renders")
    parser.add_argument("--no-plots", action="store_true", help="skip `dvc plots diff`")
    parser.add_argument("--plots-link", help="link target for the plots (e.g. the CI run's artifacts page)")
    parser.add_argument("--note", help="a line shown at the top (e.g. which config CI ran)")
    args = parser.parse_args(argv)

    from stages.lib.io import write_text

    out = Path(args.out)
    try:
        text = build_summary(args.base, out, metrics_file=args.metrics_file,
                             plots_dir=None if args.no_plots else args.plots_dir,
                             plots_link=args.plots_link, note=args.note)
        write_text(out, text)
    except (ReportError, OSError) as exc:
        print(f"pr-report: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0

