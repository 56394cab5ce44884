"""The samples page (escaping, marks) and the metric bar plot rows."""
import json

import pytest

from stages.lib.report import eval_plot_rows, md_block, md_inline, samples_markdown

EVIL = "| <script>alert(1)</script> **bold** `code` [link](http://x) ~~s~~ &amp; \\ *"


def render(markdown: str) -> str:
    markdown_it = pytest.importorskip("markdown_it")  # comes with rich, which dvc depends on
    return markdown_it.MarkdownIt("commonmark", {"html": True}).enable("table").render(markdown)


def test_md_inline_survives_a_markdown_renderer():
    html = render(f"| a |\n|---|\n| {md_inline(EVIL)} |\n")
    assert "<script>" not in html and "<strong>" not in html and "<a " not in html
    assert "<code>code</code>" not in html and "<del>" not in html
    assert html.count("<td>") == 1  # the pipe did not split the cell
    # Everything the model wrote is visible as text.
    assert "&lt;script&gt;alert(1)&lt;/script&gt; **bold** `code` [link](http://x) ~~s~~ &amp;amp; \\ *" in html


def test_md_block_keeps_lines_and_neutralises_line_markup():
    text = "# not a heading\n- not a list\n1. not numbered\n    not code\n\n===\n> not a quote"
    html = render(md_block(text))
    for tag in ("<h1>", "<h2>", "<ul>", "<ol>", "<pre>"):
        assert tag not in html
    assert html.count("<blockquote>") == 1
    assert "# not a heading" in html and "- not a list" in html and "1. not numbered" in html
    assert "&gt; not a quote" in html


ROWS = [
    {"id": "r1", "prompt": [{"role": "system", "content": "Be terse."},
                            {"role": "user", "content": "Classify: my card was charged twice 😡"}],
     "reference": '{"category": "billing", "priority": "high"}',
     "base": "Sure! Here is the JSON: {\"category\": \"billing\"}",
     "tuned": '{"priority": "high", "category": "billing"}'},
    {"id": "r2", "prompt": "Classify: <b>login</b> fails | 中文 | café",
     "reference": '{"category": "login", "priority": "low"}',
     "base": "", "tuned": '{"category": "login", "priority": "low"'},
    {"id": "r3", "prompt": "unused", "reference": "x", "base": "x", "tuned": "x"},
]


def test_samples_markdown_side_by_side_with_marks():
    page = samples_markdown(ROWS, 2)
    assert "2 of 3 test rows" in page
    assert "Classify: my card was charged twice 😡" in page
    assert "Be terse" not in page          # the user turn, not the system prompt
    assert "r3" not in page                # only n rows
    assert "| | Reference | Base | Tuned |" in page
    # Row 1: base chatty (no JSON), tuned valid JSON and an exact match despite key order.
    assert "| marks | | exact ❌ · JSON ❌ | exact ✅ · JSON ✅ |" in page
    # Row 2: base empty, tuned truncated JSON.
    assert "*(empty)*" in page
    assert page.count("exact ❌ · JSON ❌") == 3
    assert "<code>{\"category\": \"login\", \"priority\": \"low\"</code>" in page  # JSON set in code

    html = render(page)
    assert "<b>login</b>" not in html and "&lt;b&gt;login&lt;/b&gt; fails | 中文 | café" in html
    assert html.count("<table>") == 2 and html.count("<td>") == 2 * 8


def test_samples_markdown_with_extract_shows_answers():
    rows = [{"id": "g1", "prompt": "2+2?", "reference": "2+2=4\n#### 4", "base": "#### 5",
             "tuned": "It is 4.\n#### 4."}]
    page = samples_markdown(rows, 5, extract=r"####\s*(-?[\d,.]+)")
    assert "| marks | | exact ❌ | exact ✅ |" in page   # not JSON: no JSON mark
    assert "| answer | <code>4</code> | <code>5</code> | <code>4</code> |" in page
    assert "<br>" in page  # multi-line outputs keep their lines


def test_samples_markdown_no_rows():
    assert "0 of 0 test rows" in samples_markdown([], 12)


def test_eval_plot_rows_only_shares():
    report = {"base": {"loss": 2.5, "perplexity": 12.2, "json_valid": 0.05, "exact_match": 0.0,
                       "field_accuracy": {"category": 0.1}},
              "tuned": {"loss": 0.9, "perplexity": 2.4, "json_valid": 0.95, "exact_match": 0.4,
                        "field_accuracy": {"category": 0.9}, "general_accuracy": 0.7},
              "delta": {"json_valid": 0.9}, "n": {"test": 60, "probes": 20}}
    rows = eval_plot_rows(report)
    json.dumps(rows)
    assert {r["metric"] for r in rows} == {
        "exact_match (base)", "exact_match (tuned)", "json_valid (base)", "json_valid (tuned)",
        "field_accuracy.category (base)", "field_accuracy.category (tuned)", "general_accuracy (tuned)"}
    assert all(set(r) == {"metric", "model", "value"} and 0 <= r["value"] <= 1 for r in rows)
    assert {"metric": "json_valid (tuned)", "model": "tuned", "value": 0.95} in rows
    assert eval_plot_rows({}) == []


def test_eval_plot_rows_carry_intervals():
    report = {"base": {"json_valid": {"value": 0.0, "lower": 0.0, "upper": 0.107},
                       "field_accuracy": {"category": {"value": 0.5, "lower": 0.3, "upper": 0.7}}},
              "tuned": {"json_valid": {"value": 1.0, "lower": 0.893, "upper": 1.0}}}
    rows = eval_plot_rows(report)
    assert {"metric": "json_valid (tuned)", "model": "tuned", "value": 1.0, "lower": 0.893, "upper": 1.0} in rows
    assert {"metric": "field_accuracy.category (base)", "model": "base", "value": 0.5, "lower": 0.3,
            "upper": 0.7} in rows
