"""The sections of the PR report that compare the workspace with the base revision's outputs:
what changed (data, params, code), the tuned model against the base revision's tuned model on the
same rows (with intervals and verdicts), the reviewer's table, per-label results, the dataset diff.

The base revision's DVC outputs (per-row scores, splits) are read with dvc.api from the local
cache, or the default remote when one is configured; when they are in neither, the section says
so and what to run, and falls back to what git has (the committed reports/*.json).
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Mapping

SCORES = "data/eval/tuned/scores.json"
LABELS = "reports/labels.json"
SPLIT_FILES = {split: f"data/split/{split}.jsonl" for split in ("train", "validation", "test")}
REJECTED = "data/clean/rejected.jsonl"
REMOVED = "data/dedup/removed.jsonl"
# What is data, what is params; everything else git tracks is code (or docs).
NOT_CODE_PREFIXES = ("data/", "reports/", "dvc.lock", "params.yaml", ".dvc/")


class Unavailable(RuntimeError):
    """A file of the base revision could not be read (not in the cache or remote)."""


def read_at(root: Path, rel: str, rev: str | None) -> bytes:
    """`rel` as of git revision `rev` (None: the workspace), DVC-tracked or git-tracked."""
    if rev is None:
        path = root / rel
        if not path.is_file():
            raise Unavailable(f"{rel} does not exist in the workspace")
        return path.read_bytes()
    import dvc.api

    try:
        with dvc.api.open(rel, repo=str(root), rev=rev, mode="rb") as handle:
            return handle.read()
    except Exception as exc:  # dvc raises many kinds (missing cache, path missing, no remote)
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise Unavailable(f"{rel} at {rev[:7]}: {reason}") from None


def _md_cell(text: str) -> str:
    from stages.lib.report import md_inline

    return md_inline(text)


# --- what changed --------------------------------------------------------------------------------

def changed_files(root: Path, sha: str) -> list[str]:
    """Files that differ between `sha` and the workspace (committed or not), relative to root."""
    done = subprocess.run(["git", "diff", "--name-only", sha, "--", "."], cwd=root, capture_output=True,
                          text=True, check=False)
    untracked = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "--", "."], cwd=root,
                               capture_output=True, text=True, check=False)
    prefix = subprocess.run(["git", "rev-parse", "--show-prefix"], cwd=root, capture_output=True, text=True,
                            check=False).stdout.strip()
    names = set(done.stdout.split("\n")) | set(untracked.stdout.split("\n"))
    return sorted(n[len(prefix):] if prefix and n.startswith(prefix) else n for n in names if n.strip())


def stages_using(root: Path, files: list[str]) -> dict[str, list[str]]:
    """{file: [stages that list it (or a folder above it) in deps]} from the workspace's dvc.yaml."""
    import yaml

    try:
        pipeline = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}
    deps = {name: [str(d) for d in (stage or {}).get("deps") or []]
            for name, stage in (pipeline.get("stages") or {}).items() if isinstance(stage, dict)}
    return {f: [name for name, paths in deps.items()
                if any(f == p or f.startswith(p.rstrip("/") + "/") for p in paths)] for f in files}


def code_files(files: list[str]) -> list[str]:
    return [f for f in files if not f.startswith(NOT_CODE_PREFIXES) and f != "dvc.yaml"] + \
        (["dvc.yaml"] if "dvc.yaml" in files else [])


def what_changed(root: Path, sha: str, params_changed: list[str], data_summary: str) -> str:
    files = changed_files(root, sha)
    code = code_files(files)
    raw = [f for f in files if f.startswith("data/") and not f.startswith(("data/eval/",))]
    lines = [f"- **Data**: {data_summary}" + (f" (files in git: {', '.join(f'`{f}`' for f in raw)})" if raw else "")]
    if params_changed:
        shown = ", ".join(f"`{p}`" for p in params_changed[:8]) + (" …" if len(params_changed) > 8 else "")
        lines.append(f"- **Params**: {len(params_changed)} changed: {shown}")
    else:
        lines.append("- **Params**: no change")
    if code:
        users = stages_using(root, code)
        parts = []
        for f in code[:12]:
            stages = users.get(f) or []
            parts.append(f"`{f}`" + (f" (stages: {', '.join(stages)})" if stages else ""))
        lines.append(f"- **Code**: {len(code)} file(s): " + ", ".join(parts) + (" …" if len(code) > 12 else ""))
    else:
        lines.append("- **Code**: no change")
    return "\n".join(lines)


def params_changed(diff_json: str) -> list[str]:
    """Dotted names from `dvc params diff --json` ({file: {param: {old, new}}})."""
    try:
        diff = json.loads(diff_json or "{}")
    except ValueError:
        return []
    return sorted(name for params in diff.values() if isinstance(params, Mapping) for name in params)


# --- the tuned model against the base revision's ----------------------------------------------------

def tuned_comparison(root: Path, sha: str, base_label: str, report: Mapping[str, Any],
                     base_report: Mapping[str, Any] | None) -> str:
    """This workspace's tuned model vs the base revision's, on the rows both scored."""
    from stages.lib.review import comparison_table, method_note, to_markdown, verdict_counts
    from stages.lib.uncertainty import compare_scores

    try:
        new = json.loads(read_at(root, SCORES, None))
    except (Unavailable, ValueError) as exc:
        return f"*No per-row results in the workspace ({exc}); run `dvc repro`.*"
    try:
        old = json.loads(read_at(root, SCORES, sha))
    except (Unavailable, ValueError) as exc:
        fallback = _point_comparison(report, base_report, base_label)
        return "\n".join([f"*The per-row results of `{base_label}` are not available ({exc}), so there is no "
                          "interval: run its pipeline (CI does), or `dvc pull` its outputs from the shared "
                          "remote. Point values only:*", "", fallback])
    compared = compare_scores(old, new)
    n = compared.get("n") or {}
    if not n.get("test"):
        return f"*No test row was scored by both `{base_label}` and this workspace: the test split changed entirely.*"
    frame = comparison_table(compared, f"tuned @ {base_label}", "tuned (this PR)")
    counts = verdict_counts(frame)
    scope = ", ".join(f"{count} {unit.replace('text', 'probe-text blocks')}" for unit, count in n.items())
    head = (f"On the rows both revisions scored ({scope}): "
            + ", ".join(f"**{count} {label}**" for label, count in counts.items()) + ".")
    return "\n".join([head, "", to_markdown(frame), "", f"<sub>{method_note(report)}</sub>"])


def _point_comparison(report: Mapping[str, Any], base_report: Mapping[str, Any] | None, base_label: str) -> str:
    from stages.lib.review import point_comparison_table, to_markdown

    old = (base_report or {}).get("tuned")
    if not old:
        return f"*`{base_label}` has no reports/eval.json: nothing to compare the tuned model with.*"
    return to_markdown(point_comparison_table(old, report.get("tuned"), f"tuned @ {base_label}", "tuned (this PR)"))


def reviewer_table(report: Mapping[str, Any]) -> str:
    from stages.lib.review import eval_table, method_note, to_markdown

    n = report.get("n") or {}
    scope = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in n.items())
    return "\n".join([f"Base model vs tuned, this workspace ({scope}):" if scope else "Base model vs tuned:", "",
                      to_markdown(eval_table(report)), "", f"<sub>{method_note(report)}</sub>"])


# --- per-label ------------------------------------------------------------------------------------

def labels_section(root: Path) -> str | None:
    import pandas as pd

    from stages.lib.review import to_markdown

    try:
        labels = json.loads(read_at(root, LABELS, None))
    except (Unavailable, ValueError):
        return None
    tuned, base = labels.get("tuned") or {}, labels.get("base") or {}
    if not tuned:
        return None
    summary = pd.DataFrame([{"field": field, "accuracy": f"{entry['accuracy']:.3f}",
                             "macro F1": f"{entry['macro_f1']:.3f}",
                             "macro F1 (base model)": f"{base[field]['macro_f1']:.3f}" if field in base else "—",
                             "no answer": f"{entry['no_answer']} of {entry['n']}"}
                            for field, entry in tuned.items()])
    parts = ["Tuned model, per classification-like JSON field (precision, recall, F1 with scikit-learn; "
             "`(no answer)`: the output was not JSON or lacked the field):", "", to_markdown(summary), ""]
    for field, entry in tuned.items():
        rows = pd.DataFrame([{"label": _md_cell(label), "precision": f"{s['precision']:.3f}",
                              "recall": f"{s['recall']:.3f}", "F1": f"{s['f1']:.3f}", "support": str(s["support"])}
                             for label, s in entry["labels"].items()])
        worst = _top_confusions(entry.get("confusion") or {})
        parts += [f"<details><summary><code>{_md_cell(field)}</code>: per label"
                  + (f"; most frequent confusions: {worst}" if worst else "") + "</summary>", "",
                  to_markdown(rows), "", "</details>", ""]
    return "\n".join(parts).rstrip()


def _top_confusions(confusion: Mapping[str, Any], k: int = 3) -> str:
    labels, matrix = confusion.get("labels") or [], confusion.get("matrix") or []
    pairs = [(count, labels[i], labels[j]) for i, row in enumerate(matrix) for j, count in enumerate(row)
             if i != j and count]
    pairs.sort(key=lambda p: (-p[0], p[1], p[2]))
    return ", ".join(f"{_md_cell(a)} → {_md_cell(b)} ×{c}" for c, a, b in pairs[:k])


# --- dataset diff ---------------------------------------------------------------------------------

def dataset_diff(root: Path, sha: str, base_label: str, examples: int = 3) -> tuple[str, str]:
    """(one-line summary for "What changed", the section's markdown)."""
    import pandas as pd

    from stages.lib.datadiff import diff_reasons, diff_splits, has_changes, index_records, reason_counts
    from stages.lib.review import to_markdown

    old_splits, new_splits, missing = {}, {}, []
    for split, rel in SPLIT_FILES.items():
        try:
            new_splits[split] = index_records(read_at(root, rel, None).splitlines())
        except Unavailable:
            continue  # the workspace has no such split (e.g. no validation split configured)
        try:
            old_splits[split] = index_records(read_at(root, rel, sha).splitlines())
        except Unavailable as exc:
            missing.append(str(exc))
    if not new_splits:
        return ("unknown (no split in the workspace; run `dvc repro`)",
                "*No split files in the workspace: run `dvc repro` first.*")
    if missing:
        return (f"unknown: `{base_label}`'s splits are not available",
                f"*`{base_label}`'s data outputs are not in the DVC cache or remote "
                f"({'; '.join(missing[:2])}); run its pipeline (CI does) or `dvc pull` them to see the "
                "dataset diff.*")
    splits = diff_splits(old_splits, new_splits, examples=examples)
    reasons = {}
    for label, rel in (("clean: rejected", REJECTED), ("dedup: removed", REMOVED)):
        try:
            new_counts = reason_counts(read_at(root, rel, None).splitlines())
            old_counts = reason_counts(read_at(root, rel, sha).splitlines())
        except Unavailable:
            continue
        reasons[label] = diff_reasons(old_counts, new_counts)
    if not has_changes(splits, reasons):
        return "no change in the cleaned, deduplicated or split data", \
            f"No row was added, removed, changed or moved in any split, and the clean/dedup counts are those of `{base_label}`."

    table = pd.DataFrame([{"split": s["split"], f"rows @ {base_label}": str(s["before"]), "rows now": str(s["after"]),
                           "added": f"+{s['added']}", "removed": f"−{s['removed']}", "changed": str(s["changed"]),
                           "moved in / out": f"{s['moved_in']} / {s['moved_out']}"} for s in splits])
    parts = ["Rows by record id (ids derive from content: an edited row is one removed and one added; "
             "*moved* rows changed split):", "", to_markdown(table), ""]
    for label, rows in reasons.items():
        changed = [r for r in rows if r["change"]]
        if changed:
            frame = pd.DataFrame([{"reason": _md_cell(r["reason"]), f"@ {base_label}": str(r["before"]),
                                   "now": str(r["after"]), "change": f"{r['change']:+d}"} for r in changed])
            parts += [f"**{label}**, reasons whose count changed:", "", to_markdown(frame), ""]
    samples = [(s["split"], e) for s in splits for e in s["examples"]]
    if samples:
        parts += ["<details><summary>Examples</summary>", ""]
        for split, e in samples:
            moved = f" (from {e['other_split']})" if e["change"] == "added" and e["other_split"] else \
                f" (to {e['other_split']})" if e["change"] == "removed" and e["other_split"] else ""
            parts.append(f"- {split}, {e['change']}{moved}: `{e['id']}` {_md_cell(e['preview'])}")
        parts += ["", "</details>"]
    summary_bits = [f"{s['split']} +{s['added']} −{s['removed']}" + (f" ~{s['changed']}" if s["changed"] else "")
                    for s in splits if s["added"] or s["removed"] or s["changed"]]
    reason_bits = [label.split(":")[0] for label, rows in reasons.items() if any(r["change"] for r in rows)]
    summary = ", ".join(summary_bits) or "no split changed"
    if reason_bits:
        summary += f"; {' and '.join(reason_bits)} counts changed"
    return summary, "\n".join(parts).rstrip()



# --- plots as images --------------------------------------------------------------------------------

def plot_images(root: Path, sha: str, base_label: str, report: Mapping[str, Any], folder: Path,
                link_for) -> str | None:
    """Render the reviewer's plots to PNG files in `folder` and return Markdown that shows them;
    `link_for(path)` gives the URL (or relative path) an image is shown from. None if no plot."""
    from qlora_dvc import charts
    from stages.lib.io import atomic_dir
    from stages.lib.report import eval_plot_rows

    curves: dict[str, dict[str, list]] = {}
    for label, rev in (("this PR", None), (base_label, sha)):
        for split, rel in charts.LOSS_FILES.items():
            try:
                rows = charts.read_tsv_curve(read_at(root, rel, rev).decode("utf-8"))
            except (Unavailable, UnicodeDecodeError):
                continue
            if rows:
                curves.setdefault(label, {})[split] = rows
    specs = [("loss", "Loss curves", charts.loss_spec(curves)),
             ("metrics", "Metrics with 95 % intervals", charts.metric_bars_spec(eval_plot_rows(report)))]
    try:
        labels = json.loads(read_at(root, LABELS, None))
    except (Unavailable, ValueError):
        labels = {}
    for field, entry in sorted((labels.get("tuned") or {}).items()):
        confusion = entry.get("confusion") or {}
        if confusion.get("labels"):
            specs.append((f"confusion-{field}", f"Confusion matrix: {field}",
                          charts.confusion_spec(field, confusion["labels"], confusion["matrix"])))
    with atomic_dir(folder) as tmp:
        rendered = charts.render_all(specs, tmp)
    if not rendered:
        return None
    return "\n".join(f"![{_md_cell(caption)}]({link_for(folder / path.name)})" for caption, path in rendered)


# --- experiments (sweeps) ---------------------------------------------------------------------------

# The columns a sweep is judged by; intervals stay in each experiment's reports/eval.json.
EXPERIMENT_METRICS = ("tuned.json_valid.value", "tuned.schema_valid.value", "tuned.field_accuracy_mean.value",
                      "tuned.loss.value", "delta.general_accuracy.value")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in (tree or {}).items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def swept_params(exp_show_json: str) -> list[str]:
    """Params whose value differs between the baseline and its experiments (`dvc exp show --json`)."""
    rows = []

    def collect(entry: Mapping[str, Any]) -> None:
        data = entry.get("data") or {}
        params = {}
        for file_params in (data.get("params") or {}).values():
            params.update(_flatten((file_params or {}).get("data") or {}))
        rows.append(params)

    for baseline in json.loads(exp_show_json or "[]"):
        if baseline.get("rev") == "workspace":
            continue
        collect(baseline)
        for group in baseline.get("experiments") or []:
            for rev in group.get("revs") or []:
                collect(rev)
    names = set().union(*rows) if rows else set()
    return sorted(n for n in names if len({json.dumps(r.get(n), sort_keys=True) for r in rows}) > 1)


def experiments_section(run_dvc) -> str:
    """`dvc exp show --md`, cut down to the swept params and the headline metrics.

    `run_dvc(args)` runs dvc in the project and returns its stdout (raising on failure)."""
    import re

    swept = swept_params(run_dvc(["exp", "show", "--json", "--hide-queued", "--hide-workspace"]))
    if not swept:
        return ("*No experiments with other params than their baseline: queue some with "
                "`dvc exp run --queue -S key=v1,v2` and `dvc queue start` (README, \"Sweeps\").*")
    names = [*swept, *EXPERIMENT_METRICS]
    keep = "^(Experiment|" + "|".join(f"(.*:)?{re.escape(n)}" for n in names) + ")$"
    table = run_dvc(["exp", "show", "--md", "--hide-queued", "--hide-workspace", "--drop", ".*", "--keep", keep])
    return "\n".join([f"Swept: {', '.join(f'`{p}`' for p in swept)}. Headline metrics only "
                      "(`tuned.*` values; `delta.general_accuracy`: tuned − base).", "", table.strip()])
