"""README.md and the docs/ pages: every relative link points to a file that exists, and the docs
pages link only inside docs/ (the site `mkdocs build --strict` makes holds nothing else)."""

from pathlib import Path
from urllib.parse import urlsplit

import pytest
from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def relative_links(page: Path) -> list[str]:
    """The targets of the page's links and images that are neither URLs nor bare anchors."""
    targets = []
    for token in MarkdownIt("commonmark").enable("table").parse(page.read_text()):
        for child in token.children or []:
            target = child.attrGet("href") if child.type == "link_open" else (
                child.attrGet("src") if child.type == "image" else None)
            url = urlsplit(target or "")
            if target and not url.scheme and not url.netloc and url.path:
                targets.append(url.path)
    return targets


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(page):
    links = relative_links(page)
    missing = [link for link in links if not (page.parent / link).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"
    if page.parent == DOCS:
        outside = [link for link in links
                   if not (page.parent / link).resolve().is_relative_to(DOCS)]
        assert not outside, (f"{page.relative_to(ROOT)} links outside docs/ (the site has only "
                             f"docs/; write such a path as `code`): {outside}")


def test_readme_links_every_docs_page_through_the_index():
    assert "docs/index.md" in relative_links(ROOT / "README.md")
    index_links = set(relative_links(DOCS / "index.md"))
    assert {p.name for p in DOCS.glob("*.md")} - {"index.md"} <= index_links


def test_the_link_extractor_sees_links_and_images(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[a](docs/a.md#x) ![b](b.png) [c](https://example.org/c.md) [d](#d)\n\n"
                    "| t |\n|---|\n| [e](e.md) |\n\n`[f](f.md)`\n")
    assert relative_links(page) == ["docs/a.md", "b.png", "e.md"]
