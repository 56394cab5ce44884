"""End to end in a real headless browser: `qlora-dvc prefs` serves the page, Chromium (Debian's,
driven by Playwright) makes ten blind comparisons with the keyboard and the mouse, and the
`prefs` stage reports exactly what was chosen.

Needs /usr/bin/chromium (`apt-get install -y chromium`; .ci/run installs it) and the `playwright`
package (dev extra). Missing either is a failure with the fix in the message, not a skip."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import sigint_as_in_a_terminal

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("QLORA_DVC_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run"]
ROWS = 12


def _project(tmp_path: Path) -> Path:
    # Answers say which model wrote them, so the test can check that the page's random sides are
    # undone correctly; the page itself never names the models.
    for which in ("base", "tuned"):
        folder = tmp_path / "data/eval" / which
        folder.mkdir(parents=True)
        rows = [{"id": f"row{i:02d}", "reference": "{}",
                 "prompt": [{"role": "system", "content": "Triage the customer message."},
                            {"role": "user", "content": f"Ticket {i}: the <b>router</b> reboots"}],
                 "prediction": f'{{"summary": "{which.upper()} model, row {i}"}}'} for i in range(ROWS)]
        (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def _launch(playwright):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (`apt-get install -y chromium`, "
                    "as .ci/run does) or point QLORA_DVC_CHROMIUM at a Chromium binary")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)


def test_ten_blind_comparisons_in_a_browser_reach_the_stage(tmp_path):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: pip install -e '.[dev]'")
    project = _project(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([sys.executable, "-m", "qlora_dvc", "prefs", "--port", "0", "--rater", "tester",
                               "--limit", "10"], cwd=project, env=env, stderr=subprocess.PIPE, text=True,
                              preexec_fn=sigint_as_in_a_terminal)
    try:
        first = server.stderr.readline()
        match = re.search(r"(http://127\.0\.0\.1:\d+/)", first)
        assert match, f"no URL in {first!r}"
        url = match.group(1)
        assert first.startswith("prefs: 10 comparison(s) for tester")

        # What to prefer, by comparison: tuned x5, base x2, tie x2, skip x1.
        plan = ["tuned"] * 5 + ["base"] * 2 + ["tie"] * 2 + ["skip"]
        with sync_playwright() as playwright:
            browser = _launch(playwright)
            page = browser.new_page()
            page.goto(url)
            shown_first = []
            for step, want in enumerate(plan, start=1):
                page.wait_for_selector(f"body[data-state=ready][data-position='{step}']")
                a, b = page.text_content("#answer-a"), page.text_content("#answer-b")
                assert {a.split('"')[3].split()[0], b.split('"')[3].split()[0]} == {"BASE", "TUNED"}
                assert "Comparison %d of 10" % step == page.text_content("#status")
                # The prompt is shown as text: the ticket's "<b>" is not markup.
                assert "<b>router</b>" in page.text_content("#prompt")
                shown_first.append("tuned" if "TUNED" in a else "base")
                if want in ("tuned", "base"):
                    key = "a" if (want == "tuned") == ("TUNED" in a) else "b"
                else:
                    key = "t" if want == "tie" else "s"
                if step % 3 == 0:   # the buttons work too
                    page.click({"a": "#choose-a", "b": "#choose-b", "t": "#choose-tie", "s": "#choose-skip"}[key])
                else:
                    page.keyboard.press(key.upper() if step % 2 else key)
            page.wait_for_selector("body[data-state=done]")
            assert "All done: 10 judgement(s) saved" in page.text_content("#status")
            # Nothing on the page or in what the browser was sent names a model.
            html = page.content()
            assert "shown_first" not in html and "preferred" not in html
            browser.close()
    finally:
        server.send_signal(signal.SIGINT)
        try:
            out = server.communicate(timeout=30)[1]
        finally:
            if server.poll() is None:
                server.kill()  # never left behind, whatever failed above
    assert server.returncode == 0, out
    assert "10 judgement(s) saved to data/prefs/judgements.jsonl" in out
    assert set(shown_first) == {"base", "tuned"}, "sides are drawn at random"

    lines = [json.loads(line) for line in (project / "data/prefs/judgements.jsonl").read_text().splitlines()]
    assert len(lines) == 10 and len({r["id"] for r in lines}) == 10
    assert [r["preferred"] for r in lines] == [None if w == "skip" else w for w in plan]
    assert [r["shown_first"] for r in lines] == shown_first

    done = subprocess.run([sys.executable, "-m", "stages.prefs"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads((project / "reports/prefs.json").read_text())
    assert report["judgements"] == 9 and report["skipped"] == 1 and report["rows"] == ROWS
    assert (report["win"]["count"], report["loss"]["count"], report["tie"]["count"]) == (5, 2, 2)
    assert report["win"]["rate"] == round(5 / 9, 4)
    assert report["win"]["lower"] < 5 / 9 < report["win"]["upper"]
