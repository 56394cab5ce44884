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
        # The team's private design notes (upper-case name) are not in the repository; docs/design.md is.
        if re.search(r"\b" + "DESIGN" + r"\.md\b", text) and name != "tests/test_docs.py":
            broken.append(f"{name}: cites a design file that is not in the repository (use docs/design.md)")
        for anchor in re.findall(r"docs/design\.md#([\w\-]+)", text):
            if anchor not in anchors:
                broken.append(f"{name}: docs/design.md#{anchor} has no such heading")
    assert not broken, "\n".join(broken)


def test_readme_layout_names_every_module_and_command():
    # The README's Layout section is the map of the code: a module or command it does not name is
    # one a reader cannot find.
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = readme.split("## Layout", 1)[1].split("```")[1]
    words = set(re.findall(r"[\w.\-]+", layout))
    missing = sorted(p.stem for p in (ROOT / "stages/lib").glob("*.py")
                     if p.stem != "__init__" and p.stem not in words)
    from qlora_dvc.cli import COMMANDS

    missing += sorted(f"qlora-dvc {name}" for name in COMMANDS if name not in words)
    assert not missing, f"README's Layout section does not name: {missing}"
