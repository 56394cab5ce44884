"""Human-facing evaluation outputs: the side-by-side samples file and the metric bar plot rows.

Model outputs are untrusted text: a stray `|`, `<script>`, `# ` or ``` in an output must show up
as those characters, not break the table or turn into markup. Everything that reaches the
markdown goes through `md_inline` (table cells, one line) or `md_block` (quoted prompt text).
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from stages.lib.metrics import SHARE_METRICS, extract_answer, is_exact_match, parse_json_output

# Characters with inline meaning in CommonMark/GFM (emphasis, code, links, tables, strikethrough,
# autolinks, HTML, entities, escapes). Line-start markers are handled separately in md_block.
_INLINE_SPECIAL = set("\\`*_[]|~<>&")
_ENTITIES = {"<": "&lt;", ">": "&gt;", "&": "&amp;"}
# ("*" and ">" need nothing more: md_inline has already made them "\*" and "&gt;".)
_LINE_START = re.compile(r"^(\s*)(#|-|\+|=|\d+(?=[.)]))")


def md_inline(text: str | None) -> str:
    """Escape `text` for a single-line context such as a table cell; newlines become <br>."""
    out = []
    for ch in text or "":
        if ch in _ENTITIES:
            out.append(_ENTITIES[ch])
        elif ch in _INLINE_SPECIAL:
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("<br>")
        elif ch == "\r":
            continue
        else:
            out.append(ch)
    return "".join(out)


def md_block(text: str | None, quote: bool = True) -> str:
    """Escape multi-line `text` as a block quote that renders exactly as written."""
    lines = []
    for line in (text or "").replace("\r\n", "\n").split("\n"):
        escaped = md_inline(line.expandtabs(4))
        # A line starting with "# ", "- ", "1. ", ">" or "===" would become markup: escape it.
        match = _LINE_START.match(escaped)
        if match:
            indent, marker = match.group(1), match.group(2)
            rest = escaped[match.end():]
            if marker[0].isdigit():
                escaped = f"{indent}{marker}\\{rest}"
            else:
                escaped = f"{indent}\\{marker}{rest}"
        # Leading spaces would make an indented code block or vanish: keep them visible.
        stripped = escaped.lstrip(" ")
        escaped = "&nbsp;" * (len(escaped) - len(stripped)) + stripped
        lines.append(escaped)
    # A backslash at the end of a line is a hard line break: the text keeps its line structure.
    body = "\\\n".join(lines) if not quote else "\\\n> ".join(lines)
    return f"> {body}" if quote else body


def _cell(text: str | None, as_code: bool) -> str:
    if text is None or not text.strip():
        return "*(empty)*"
    escaped = md_inline(text)
    return f"<code>{escaped}</code>" if as_code else escaped


def _prompt_text(row: Mapping[str, Any]) -> str:
    prompt = row.get("prompt")
    if prompt is None and "messages" in row:
        prompt = [m for m in row["messages"][:-1]] if row["messages"] and \
            row["messages"][-1].get("role") == "assistant" else row["messages"]
    if isinstance(prompt, list):
        users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
        return "\n\n".join(users)
    return prompt or ""


def _mark(ok: bool) -> str:
    return "✅" if ok else "❌"


def samples_markdown(rows: Sequence[Mapping[str, Any]], n: int, *, extract: str | None = None,
                     json_output: bool | None = None, title: str = "Evaluation samples") -> str:
    """A markdown page showing, for the first `n` rows, prompt, reference, base and tuned output.

    Each row is {"id", "prompt" (text, or the prompt messages: the user turns are shown),
    "reference", "base", "tuned"}. Outputs are shown side by side in a table, exactly as the
    model wrote them (escaped, never reformatted: a reviewer must see the real format); JSON
    outputs are set in code. Marks per output: exact match (on extracted answers with `extract`,
    and the extracted answer is shown), and JSON validity when `json_output` is true, or, when
    it is None, when the row's reference is a JSON object.
    """
    shown = list(rows)[:max(n, 0)]
    parts = [f"# {md_inline(title)}", "",
             f"{len(shown)} of {len(rows)} test rows. Outputs are shown exactly as generated. "
             "Marks: exact match" + (f" on the answer extracted by `{extract}`" if extract else "")
             + "; JSON = the whole output is one valid JSON object.", ""]
    for index, row in enumerate(shown, 1):
        reference, base, tuned = row.get("reference"), row.get("base"), row.get("tuned")
        is_json = json_output if json_output is not None else parse_json_output(reference) is not None
        row_id = row.get("id")
        parts.append(f"## {index}" + (f" · `{str(row_id).replace('`', '')}`" if row_id else ""))
        parts += ["", "**Prompt**", "", md_block(_prompt_text(row)), ""]
        parts.append("| | Reference | Base | Tuned |")
        parts.append("|---|---|---|---|")
        parts.append(f"| output | {_cell(reference, is_json)} | {_cell(base, is_json)} | {_cell(tuned, is_json)} |")
        marks = {}
        for name, output in (("base", base), ("tuned", tuned)):
            items = [f"exact {_mark(is_exact_match(output, reference, extract))}"]
            if is_json:
                items.append(f"JSON {_mark(parse_json_output(output) is not None)}")
            marks[name] = " · ".join(items)
        parts.append(f"| marks | | {marks['base']} | {marks['tuned']} |")
        if extract:
            answers = [extract_answer(x, extract) for x in (reference, base, tuned)]
            parts.append("| answer | " + " | ".join(
                "*(none)*" if a is None else f"<code>{md_inline(a)}</code>" for a in answers) + " |")
        parts.append("")
    return "\n".join(parts)


def eval_plot_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows for the metric bar plot (reports/plots/eval_metrics.json), base and tuned per metric.

    Only share metrics (0..1) are plotted; loss and perplexity would dwarf them. The label in
    "metric" carries the model ("json_valid (tuned)"): DVC's bar templates offset bars by
    revision only, so two rows with the same label in one revision would stack into one bar.
    Each row also has the 95 % interval ("lower", "upper") when the report has one.
    """
    rows = []
    for model in ("base", "tuned"):
        metrics = report.get(model) or {}
        names = [m for m in SHARE_METRICS if m in metrics]
        names += [f"field_accuracy.{f}" for f in sorted(metrics.get("field_accuracy") or {})
                  if f not in ("value", "lower", "upper")]
        for name in names:
            entry = metrics["field_accuracy"][name.split(".", 1)[1]] if name.startswith("field_accuracy.") \
                else metrics[name]
            value = entry.get("value") if isinstance(entry, Mapping) else entry
            if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1:
                row = {"metric": f"{name} ({model})", "model": model, "value": value}
                if isinstance(entry, Mapping) and "lower" in entry and "upper" in entry:
                    row.update(lower=entry["lower"], upper=entry["upper"])
                rows.append(row)
    rows.sort(key=lambda r: r["metric"])
    return rows
