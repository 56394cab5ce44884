"""Write a pull-request summary: what this workspace changed against a base git revision.

    qlora-dvc pr-report --base main [--out reports/pr_summary.md]

The summary says what changed (data, params, code), compares this workspace's tuned model with
the base revision's on the same test rows (95 % intervals, a verdict per metric), shows the
reviewer's table (base model vs tuned), per-label results, the dataset diff per split, the gates,
`dvc metrics diff` / `dvc params diff <base> --md`, and a link to `dvc plots diff <base>`. CI posts it as a PR comment
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


def layout_problem(report) -> str | None:
    """What is wrong with the shape of an eval.json (None when it has the evaluate stage's layout:
    {"base": {...}, "tuned": {...}, "delta": {...}, "n": {...}}, blocks optional)."""
    if not isinstance(report, dict):
        return f"the top level is a JSON {type(report).__name__}, not an object"
    for key in ("base", "tuned", "delta", "n"):
        if key in report and not isinstance(report[key], dict):
            return f"{key!r} is a JSON {type(report[key]).__name__}, not an object"
    if not any(key in report for key in ("base", "tuned")):
        return "it has neither a 'base' nor a 'tuned' block"
    return None


def stale_stages(dvc: str, root: Path) -> list[str] | None:
    """Stages `dvc status` reports as changed (their metrics are older than their inputs); None
    when dvc status itself fails."""
    done = _run([dvc, "status", "--json"], cwd=root)
    if done.returncode != 0:
        return None
    try:
        status = json.loads(done.stdout or "{}")
    except ValueError:
        return None
    return sorted(name.split(":")[-1] for name in status) if isinstance(status, dict) else None


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


def _images(root: Path, sha: str, base: str, report: dict, out: Path, images_dir: str,
            image_url: str | None) -> str | None:
    """PNG plots (loss, metric bars with intervals, confusion matrices) shown in the summary; a
    failure to render is reported and leaves the rest of the summary intact."""
    from qlora_dvc.pr_sections import plot_images

    def link_for(path: Path) -> str:
        if image_url:
            return image_url.format(name=path.name)
        return Path(os.path.relpath(path, out.resolve().parent)).as_posix()

    try:
        return plot_images(root, sha, base, report, root / images_dir, link_for)
    except Exception as exc:  # a renderer problem must not cost the reviewer the whole summary
        print(f"pr-report: no plot images: {' '.join(str(exc).split()) or type(exc).__name__}", file=sys.stderr)
        return None


def build_summary(base: str, out: Path, *, metrics_file: str = "reports/eval.json",
                  plots_dir: str | None = "reports/pr_plots", plots_link: str | None = None,
                  note: str | None = None, images_dir: str = "reports/pr_images",
                  image_url: str | None = None, experiments: bool = False) -> str:
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
    problem = layout_problem(report)
    if problem:
        raise ReportError(f"{metrics_file} is not an evaluate report ({problem}); re-run `dvc repro evaluate` "
                          "(or pass --metrics-file)")
    base_report = _report_at(sha, metrics_path, git_root)
    if base_report is not None and layout_problem(base_report):
        base_report = None  # a broken report at the base revision: nothing to compare with

    from qlora_dvc import pr_sections

    dvc = dvc_executable()
    stale = stale_stages(dvc, root)
    metrics_md = _table_or_none(_dvc(dvc, ["metrics", "diff", base, "--md"], root))
    params_md = _table_or_none(_dvc(dvc, ["params", "diff", base, "--md"], root))
    changed_params = pr_sections.params_changed(_dvc(dvc, ["params", "diff", base, "--json"], root))
    head = _run(["git", "rev-parse", "--short", "HEAD"], cwd=root).stdout.strip() or "(no commit)"
    dirty = bool(_run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root).stdout.strip())
    data_summary, data_md = pr_sections.dataset_diff(root, sha, base)

    parts = ["## Fine-tuning report", ""]
    if note:
        parts += [f"> {note}", ""]
    if stale:
        warning = (f"The workspace is not up to date: `dvc status` lists {', '.join(f'`{n}`' for n in stale)} "
                   "as changed, so the metrics below may predate the params, data or code they are shown "
                   "with. Run `dvc repro` (and commit dvc.lock and reports/) before trusting them.")
        print(f"pr-report: warning: {warning}", file=sys.stderr)
        parts += [f"> **Warning:** {warning}", ""]
    elif stale is None:
        parts += ["> **Warning:** `dvc status` failed, so whether the metrics are up to date is unknown.", ""]
    parts += [f"Workspace (`{head}`{' + uncommitted changes' if dirty else ''}) compared with "
              f"`{base}` (`{sha[:7]}`).", ""]
    parts += ["### What changed", "", pr_sections.what_changed(root, sha, changed_params, data_summary), ""]
    parts += [f"### Tuned model: this pull request vs `{base}`", "",
              pr_sections.tuned_comparison(root, sha, base, report, base_report), ""]
    parts += ["### Reviewer's table", "", pr_sections.reviewer_table(report), ""]
    labels = pr_sections.labels_section(root)
    if labels:
        parts += ["### Per-label results", "", labels, ""]
    parts += [f"### Dataset diff vs `{base}`", "", data_md, ""]
    if experiments:
        parts += ["### Experiments (`dvc exp show`)", "",
                  pr_sections.experiments_section(lambda args: _dvc(dvc, args, root)), ""]
    gates = _gates_section(report, root)
    if gates:
        parts += ["### Gates", "", gates, ""]
    parts += ["### Preference (tuned vs base)", "", _preference(root, sha, git_root, base), ""]
    parts += [f"<details><summary>Metrics changed (<code>dvc metrics diff {base}</code>)</summary>", "",
              metrics_md or "No metric changed.", "", "</details>", "",
              f"### Params changed (`dvc params diff {base}`)", "",
              params_md or "No parameter changed.", ""]
    if plots_dir is not None:
        parts += ["### Plots", ""]
        images = _images(root, sha, base, report, out, images_dir, image_url)
        if images:
            parts += [images, ""]
        html_path = _plots(dvc, base, root, root / plots_dir)
        if html_path is None and not plots_link:
            parts.append("`dvc plots diff` could not be rendered (see the log).")
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
    parser.add_argument("--experiments", action="store_true",
                        help="add the sweep table: `dvc exp show`, swept params and headline metrics only")
    parser.add_argument("--images-dir", default="reports/pr_images", help="where the PNG plots are written")
    parser.add_argument("--image-url", help="URL template the summary shows each PNG from, with {name} for "
                        "its file name (CI: where it published them); default: a path relative to --out")
    args = parser.parse_args(argv)

    from stages.lib.io import write_text

    out = Path(args.out)
    try:
        text = build_summary(args.base, out, metrics_file=args.metrics_file,
                             plots_dir=None if args.no_plots else args.plots_dir,
                             plots_link=args.plots_link, note=args.note, images_dir=args.images_dir,
                             image_url=args.image_url, experiments=args.experiments)
        write_text(out, text)
    except (ReportError, OSError) as exc:
        print(f"pr-report: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0

