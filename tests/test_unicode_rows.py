"""Text that is not valid Unicode (issue 14): a lone surrogate, which valid JSON can spell as
"\\ud800", is rejected with a reason by clean, never a traceback in clean, dedup or split."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _stage(project: Path, name: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=project, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)


def test_lone_surrogates_are_rejected_with_a_reason_everywhere_they_can_hide(tmp_path):
    project = tmp_path / "project"
    folder = project / "data/raw/mixed"
    folder.mkdir(parents=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update({"raw": "data/raw/mixed", "keep_columns": ["tag"]})
    params["clean"]["max_rejected_fraction"] = 1.0
    params["split"].update({"test_fraction": 0.3, "validation_fraction": 0.0})
    (project / "params.yaml").write_text(yaml.safe_dump(params))

    def row(user, answer="a plain answer here", **extra):
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], **extra}

    import random

    rng = random.Random(0)
    good = [row(" ".join(f"w{rng.randrange(5000)}" for _ in range(12)), " ".join(f"a{rng.randrange(5000)}" for _ in range(5)))
            for _ in range(30)]
    bad_jsonl = ['{"messages": [{"role": "user", "content": "broken \\ud800 text"}, '
                 '{"role": "assistant", "content": "fine"}]}',
                 '{"messages": [{"role": "user", "content": "fine question"}, '
                 '{"role": "assistant", "content": "low \\udfff end"}]}',
                 '{"messages": [{"role": "user", "content": "a tag with a surrogate"}, '
                 '{"role": "assistant", "content": "fine"}], "tag": "x\\udc80"}',
                 '{"messages": [{"role": "user", "content": "\\ud800"}]}',   # rejected for another reason too
                 '{"messages": [{"role": "user", "content": "an emoji pair \\ud83d\\ude00 is fine"}, '
                 '{"role": "assistant", "content": "yes"}]}']
    (folder / "a.jsonl").write_text("\n".join([json.dumps(r) for r in good] + bad_jsonl) + "\n")
    (folder / "b.json").write_text('[{"prompt": "json array \\ud801 row", "completion": "x y"}, '
                                   '{"prompt": "a clean json array row", "completion": "x y"}]')
    for name in ("clean", "dedup", "split"):
        result = _stage(project, name)
        assert "Traceback" not in result.stderr, result.stderr
        assert result.returncode == 0, f"{name}: {result.stderr}"
    report = json.loads((project / "reports/clean.json").read_text())
    assert report["rejected_by_reason"]["invalid_unicode"] == 4
    assert report["kept"] == 32 and report["accounting_ok"]
    reasons = [json.loads(line)["reason"] for line in (project / "data/clean/rejected.jsonl").read_text().splitlines()]
    assert any("lone surrogate U+D800 at character 8" in r for r in reasons)
    assert any("column 'tag' has a lone surrogate U+DC80" in r for r in reasons)
    for path in project.rglob("*.json*"):
        if path.is_file():
            path.read_bytes().decode("utf-8")   # every output is valid UTF-8
    kept = (project / "data/clean/records.jsonl").read_text(encoding="utf-8")
    assert "\U0001F600" in kept and "\\ud800" not in kept
