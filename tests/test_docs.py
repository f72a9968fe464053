"""The README is a front page whose links stay inside the repository; the site's link checker
finds what is broken. (``make docs`` builds the site itself, warnings as errors.)"""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_the_readme_is_a_front_page_whose_links_stay_in_the_repository():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 300
    links = LINK.findall(text)
    assert len(links) >= 10
    for link in links:
        assert not re.match(r"[a-z]+://", link), f"README links outside the repository: {link}"
        path = (ROOT / link.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT) and path.exists(), f"README link to nothing: {link}"
    assert "../" not in text and "DESIGN.md" not in text


def test_no_page_of_the_docs_points_outside_the_repository():
    pages = [*ROOT.glob("docs/*.md"), *ROOT.glob("docs/*/*.md")]
    assert len(pages) >= 20
    for page in pages:
        text = page.read_text()
        assert "../shared" not in text and "DESIGN.md" not in text, page


def test_the_link_checker_finds_missing_pages_and_anchors(tmp_path):
    site = tmp_path / "html"
    (site / "guide").mkdir(parents=True)
    (site / "index.html").write_text(
        '<a href="guide/a.html#usage">ok</a> <a href="guide/a.html#nope">bad anchor</a>'
        '<a href="missing.html">bad page</a> <a href="https://example.org">external</a>'
        '<a href="#top">same page</a><span id="top"></span>'
    )
    page = '<h2 id="usage">Usage</h2><a href="../index.html">up</a>'
    (site / "guide" / "a.html").write_text(page)
    done = subprocess.run([sys.executable, str(ROOT / "docs" / "check_links.py"), str(site)],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 1
    assert "guide/a.html#nope (no such anchor)" in done.stderr
    assert "missing.html (no such file)" in done.stderr
    assert done.stderr.count("broken link") == 2 and "2 broken internal links" in done.stdout
