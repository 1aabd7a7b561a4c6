"""The docs build with MkDocs in strict mode (a broken link, anchor or image is an error), and every relative
link and image in README.md, which MkDocs does not build, exists in the repository."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"(!?)\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def links(path: Path) -> list[tuple[bool, str]]:
    """(is_image, target) of every inline link in a Markdown file, code blocks and code spans left out."""
    text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", path.read_text(encoding="utf-8")))
    return [(bang == "!", target) for bang, target in LINK.findall(text)]


def test_docs_build_strict(tmp_path: Path) -> None:
    # No --quiet: in MkDocs 1.6 it hides the warnings from strict mode as well, and the build passes.
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "index.html").is_file()


def test_readme_links_resolve() -> None:
    targets = [t for _, t in links(ROOT / "README.md")]
    assert any(t.startswith("docs/") for t in targets)
    missing = [t for t in targets
               if not re.match(r"[a-z]+:", t) and not t.startswith("#")
               and not (ROOT / t.split("#")[0]).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


@pytest.mark.parametrize("page", ["README.md", *sorted(p.relative_to(ROOT).as_posix()
                                                        for p in (ROOT / "docs").glob("*.md"))])
def test_images_are_in_the_repository(page: str) -> None:
    path = ROOT / page
    outside = [t for image, t in links(path) if image and (
        re.match(r"[a-z]+:", t) or t.startswith("/")
        or not (path.parent / t).resolve().is_relative_to(ROOT) or not (path.parent / t).is_file())]
    assert not outside, f"{page}: images that are not files inside the repository: {outside}"


def test_readme_maps_every_page() -> None:
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"]
    pages = {page for entry in nav for page in entry.values()} - {"index.md"}
    linked = {t.split("#")[0].removeprefix("docs/") for _, t in links(ROOT / "README.md")}
    assert pages <= linked, f"pages of mkdocs.yml's nav missing from the README's map: {sorted(pages - linked)}"
