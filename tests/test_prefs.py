"""Blind human preference: judgement records, the prefs stage's rates, and the session behind
`qlora-dvc prefs` (blindness, append-only file, what is shown again). The real browser is in
test_prefs_browser.py."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from qlora_dvc.prefs import PrefsSession, serve
from stages.lib.prefs import answers_fingerprint, preferred_model, read_judgements, summarize_prefs

ROOT = Path(__file__).resolve().parents[1]


def _pairs(n=4):
    return [{"id": f"r{i}", "prompt": [{"role": "user", "content": f"ticket {i}"}], "reference": "ref",
             "base": f"base answer {i}", "tuned": f"tuned answer {i}"} for i in range(n)]


def _record(pair, shown_first, choice, rater="ann"):
    return {"id": pair["id"], "answers": answers_fingerprint(pair["base"], pair["tuned"]),
            "shown_first": shown_first, "choice": choice, "preferred": preferred_model(choice, shown_first),
            "rater": rater, "at": "2026-01-01T00:00:00+00:00"}


def test_preferred_model_undoes_the_random_sides():
    assert preferred_model("A", "tuned") == "tuned"
    assert preferred_model("B", "tuned") == "base"
    assert preferred_model("A", "base") == "base"
    assert preferred_model("B", "base") == "tuned"
    assert preferred_model("tie", "base") == "tie"
    assert preferred_model("skip", "tuned") is None
    with pytest.raises(ValueError):
        preferred_model("C", "base")


def test_summary_counts_current_latest_judgements_only():
    pairs = _pairs(4)
    judgements = [
        _record(pairs[0], "base", "A"),           # base preferred, then...
        _record(pairs[0], "tuned", "A"),          # ...the same rater changes their mind: tuned
        _record(pairs[1], "base", "B"),           # tuned
        _record(pairs[1], "base", "tie", rater="bob"),
        _record(pairs[2], "tuned", "skip"),
        {**_record(pairs[3], "tuned", "A"), "answers": "0" * 16},   # about answers that changed
        None,                                                        # a broken line
    ]
    report = summarize_prefs(judgements, pairs)
    assert report["judgements"] == 3 and report["rows_judged"] == 2 and report["raters"] == 2
    assert (report["win"]["count"], report["tie"]["count"], report["loss"]["count"]) == (2, 1, 0)
    assert report["skipped"] == 1 and report["stale"] == 1 and report["malformed"] == 1
    assert report["win"]["lower"] < 2 / 3 < report["win"]["upper"]


def test_no_judgements_gives_zero_counts_and_no_rates():
    report = summarize_prefs([], _pairs(3))
    assert report["judgements"] == 0 and report["win"]["rate"] is None and report["rows"] == 3


def test_read_judgements_keeps_going_past_a_bad_line():
    assert read_judgements(['{"id": "a"}\n', "not json\n", "\n", '{"id": "b"}']) == [{"id": "a"}, None, {"id": "b"}]


def test_session_is_blind_and_appends_every_judgement(tmp_path):
    pairs = _pairs(6)
    file = tmp_path / "prefs/judgements.jsonl"
    session = PrefsSession(pairs, file, "ann", rng=random.Random(3))
    seen_first = set()
    for _ in range(6):
        item = session.next()
        assert set(item) == {"done", "token", "prompt", "a", "b", "position", "total"}  # no model names
        tuned_shown_first = item["a"].startswith("tuned")
        seen_first.add(tuned_shown_first)
        record = session.judge(item["token"], "A")
        assert record["preferred"] == ("tuned" if tuned_shown_first else "base")
    assert seen_first == {True, False}, "sides must vary"
    assert session.next()["done"] is True
    lines = file.read_text().splitlines()
    assert len(lines) == 6 and all(json.loads(line)["rater"] == "ann" for line in lines)


def test_a_stale_or_replayed_token_is_refused(tmp_path):
    session = PrefsSession(_pairs(2), tmp_path / "j.jsonl", "ann", rng=random.Random(0))
    item = session.next()
    session.judge(item["token"], "tie")
    with pytest.raises(LookupError):
        session.judge(item["token"], "A")


def test_judged_rows_are_not_shown_again_but_skipped_and_changed_ones_are(tmp_path):
    pairs = _pairs(4)
    file = tmp_path / "j.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in [
        _record(pairs[0], "base", "A"), _record(pairs[1], "base", "skip"),
        _record(pairs[2], "base", "B", rater="bob"),
        {**_record(pairs[3], "base", "A"), "answers": "0" * 16}]))
    session = PrefsSession(pairs, file, "ann", rng=random.Random(0))
    assert sorted(p["id"] for p in session.queue) == ["r1", "r2", "r3"]
    assert PrefsSession(pairs, file, "ann", limit=2).total == 2


def test_server_refuses_foreign_hosts_and_bad_choices(tmp_path):
    session = PrefsSession(_pairs(2), tmp_path / "j.jsonl", "ann", rng=random.Random(0))
    httpd = serve(session, port=0)
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        item = json.load(urllib.request.urlopen(base + "/api/next"))
        request = urllib.request.Request(base + "/api/judge", method="POST",
                                         data=json.dumps({"token": item["token"], "choice": "C"}).encode())
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request)
        assert err.value.code == 400
        rebinding = urllib.request.Request(base + "/api/next", headers={"Host": "evil.example:80"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(rebinding)
        assert err.value.code == 403
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert not (tmp_path / "j.jsonl").exists()


def test_prefs_stage_reports_the_file(tmp_path):
    import yaml

    pairs = _pairs(3)
    for which in ("base", "tuned"):
        folder = tmp_path / "data/eval" / which
        folder.mkdir(parents=True)
        rows = [{"id": p["id"], "prompt": p["prompt"], "reference": "ref", "prediction": p[which]} for p in pairs]
        (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    file = tmp_path / yaml.safe_load((ROOT / "params.yaml").read_text())["evaluate"]["prefs"]["file"]
    file.parent.mkdir(parents=True)
    file.write_text(json.dumps(_record(pairs[0], "tuned", "A")) + "\n" + json.dumps(_record(pairs[1], "tuned", "B")) + "\n")
    done = subprocess.run([sys.executable, "-m", "stages.prefs"], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "reports/prefs.json").read_text())
    assert (report["judgements"], report["win"]["count"], report["loss"]["count"]) == (2, 1, 1)
    assert "2 blind judgement(s) of 3 rows" in done.stderr

    file.unlink()
    done = subprocess.run([sys.executable, "-m", "stages.prefs"], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert done.returncode == 1 and "qlora-dvc prefs" in done.stderr.strip().splitlines()[-1]


def test_prefs_command_without_predictions_is_one_clear_line(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    done = subprocess.run([sys.executable, "-m", "qlora_dvc", "prefs", "--port", "0"], cwd=tmp_path,
                          capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                          timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == ("prefs: data/eval/base/predictions.jsonl not found: run `dvc repro` first "
                                   "(prefs compares the answers the evaluate stages wrote)")
