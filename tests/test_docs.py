"""Every reference to the design notes points at something a reader can open."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _anchor(heading: str) -> str:
    # GitHub's rule: lower case, punctuation dropped, spaces to hyphens.
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _tracked_text_files():
    names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in names:
        if name.endswith((".py", ".md", ".yaml", ".yml", ".toml")) and (ROOT / name).is_file():
            yield name, (ROOT / name).read_text(encoding="utf-8", errors="replace")


def test_design_references_resolve():
    design = (ROOT / "docs/design.md").read_text(encoding="utf-8")
    anchors = {_anchor(line.lstrip("#")) for line in design.splitlines() if line.startswith("#")}
    broken = []
    for name, text in _tracked_text_files():
        if re.search(r"\bDESIGN\.md\b", text) and name != "tests/test_docs.py":
            broken.append(f"{name}: cites DESIGN.md, which is not in the repository")
        for anchor in re.findall(r"docs/design\.md#([\w\-]+)", text):
            if anchor not in anchors:
                broken.append(f"{name}: docs/design.md#{anchor} has no such heading")
    assert not broken, "\n".join(broken)
