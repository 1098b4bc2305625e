"""The documentation lives in the repository: nothing points outside it, and its links resolve."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).parent.parent


def tracked_text_files() -> list[Path]:
    names = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    return [
        ROOT / name
        for name in names
        if Path(name).suffix in {".md", ".py", ".sh", ".yaml", ".toml", ".txt", ""}
        and (ROOT / name).is_file()
    ]


def test_nothing_points_outside_the_repository():
    outside = re.compile(r"\.\./shared|\bshared/(DESIGN|notes|gpu|sdxl-architecture)")
    hits = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in tracked_text_files()
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if outside.search(line) and path.name != "test_docs.py"
    ]
    assert hits == []


def test_relative_links_in_markdown_resolve():
    broken = []
    for path in tracked_text_files():
        if path.suffix != ".md":
            continue
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (path.parent / target).exists():
                broken.append(f"{path.relative_to(ROOT)} -> {target}")
    assert broken == []


def test_the_design_doc_names_every_top_level_folder():
    design = (ROOT / "docs" / "design.md").read_text()
    folders = {
        path.split("/")[0]
        for path in subprocess.run(
            ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
        if "/" in path and not path.startswith(".")
    }
    missing = sorted(f for f in folders if f"`{f}/`" not in design)
    assert missing == []
