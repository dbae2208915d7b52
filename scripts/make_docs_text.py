"""Rebuild the bundled documentation excerpts in gguf_moeify/data/ from Debian's documentation packages.

    .venv/bin/python scripts/make_docs_text.py python [--deb python3.11-doc_*.deb] [--chars 120000]
    .venv/bin/python scripts/make_docs_text.py sqlite [--deb sqlite3-doc_*.deb] [--chars 200000]

* ``python``: python_tutorial_excerpt.txt, the held-out non-fiction evaluation text: the Python tutorial's pages from
  ``python3.11-doc`` (bookworm: 3.11.2-6+deb12u8) in the tutorial's order; PSF licence, kept next to the text as
  python_docs_LICENSE.txt.
* ``sqlite``: sqlite_docs_excerpt.txt, the technical part of the calibration set: SQLite's guides and SQL reference
  from ``sqlite3-doc`` (bookworm: 3.40.1-2+deb12u2); public domain.

The .deb is fetched with ``apt-get download`` unless ``--deb`` names it. The main text of each page is turned into
plain text (headings, paragraphs, list items and code blocks on lines of their own; menus, tables of contents,
scripts, syntax diagrams and permalink anchors dropped) and the first ``--chars`` characters, cut at a paragraph end,
are written.
"""
from __future__ import annotations

import argparse
import html.parser
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "gguf_moeify" / "data"
BLOCKS = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "li", "pre", "dt", "dd", "tr", "div", "section", "table",
          "blockquote"}


def _classes(attrs: dict) -> set[str]:
    return set((attrs.get("class") or "").split())


class PageText(html.parser.HTMLParser):
    """The text of a page's main region; ``<pre>`` kept as it is, other whitespace folded.

    ``main``: does this element open the main region (None: the whole page is); ``dropped``: is this element, with
    all it holds, left out. Both regions end where the tag that opened them is closed (counted by tag name, which
    survives the unclosed ``<p>`` and ``<li>`` of hand-written HTML)."""

    def __init__(self, main, dropped):
        super().__init__(convert_charrefs=True)
        self.main, self.dropped = main, dropped
        self.inside = None if main is None else [None, 0]    # [tag, depth] of the main region; None: everywhere
        self.skip = None                                      # [tag, depth] of the dropped element we are in
        self.pre = 0
        self.parts: list[str] = []

    @staticmethod
    def _count(region, tag, step):
        if region is not None and region[0] == tag:
            region[1] += step

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if self.inside is not None and self.inside[1] == 0:
            if self.main(tag, a):
                self.inside = [tag, 1]
            return
        self._count(self.inside, tag, 1)
        if self.skip is None:
            if self.dropped(tag, a):
                self.skip = [tag, 1]
                return
        else:
            self._count(self.skip, tag, 1)
            return
        if tag == "pre":
            self.pre += 1
        if tag in BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if self.inside is not None and self.inside[1] == 0:
            return
        self._count(self.inside, tag, -1)
        if self.skip is not None:
            self._count(self.skip, tag, -1)
            if self.skip[1] == 0:
                self.skip = None
            return
        if tag == "pre":
            self.pre -= 1
        if tag in BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if (self.inside is None or self.inside[1]) and self.skip is None:
            self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))

    def text(self) -> str:
        paras = (re.sub(r"[ \t]+\n", "\n", p).strip("\n") for p in re.split(r"\n{2,}", "".join(self.parts)))
        return "\n\n".join(p if p.startswith(" ") or "\n" in p else p.strip() for p in paras if p.strip())


@dataclass(frozen=True)
class Source:
    package: str
    html_dir: str                  # inside the package
    pages: tuple[str, ...]         # in reading order, relative to html_dir, without ".html"
    out: str
    chars: int
    main: object                   # PageText's rules
    dropped: object
    licence_page: str | None = None    # written next to the text as LICENCE_FILE
    licence_file: str | None = None


SOURCES = {
    # Sphinx pages: the text is inside <div role="main">; the pilcrow links dropped
    "python": Source(
        "python3.11-doc", "usr/share/doc/python3.11/html",
        tuple(f"tutorial/{p}" for p in (
            "appetite", "interpreter", "introduction", "controlflow", "datastructures", "modules", "inputoutput",
            "errors", "classes", "stdlib", "stdlib2", "venv", "whatnow", "interactive", "floatingpoint", "appendix")),
        "python_tutorial_excerpt.txt", 120_000,
        main=lambda tag, a: tag == "div" and a.get("role") == "main",
        dropped=lambda tag, a: tag == "a" and "headerlink" in _classes(a),
        licence_page="license", licence_file="python_docs_LICENSE.txt"),
    # hand-written pages: the whole body but the menus (div.nosearch), the contents box, scripts, the SVG syntax
    # diagrams and the centred "last modified" footer
    "sqlite": Source(
        "sqlite3-doc", "usr/share/doc/sqlite3",
        ("quickstart", "cintro", "datatype3", "lang_select", "cli", "json1", "windowfunctions", "queryplanner",
         "foreignkeys"),
        "sqlite_docs_excerpt.txt", 200_000,
        main=None,
        dropped=lambda tag, a: (tag in ("script", "style", "svg", "head")
                                or (tag == "div" and _classes(a) & {"nosearch", "fancy_toc"})
                                or (tag == "p" and a.get("align") == "center"))),
}


def page_text(path: Path, source: Source) -> str:
    parser = PageText(source.main, source.dropped)
    parser.feed(path.read_text(encoding="utf-8"))
    return parser.text()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", choices=sorted(SOURCES))
    p.add_argument("--deb", help="the documentation package's .deb (default: apt-get download it)")
    p.add_argument("--chars", type=int, help="length of the excerpt (default: python 120000, sqlite 200000)")
    p.add_argument("--out", help="output file (default: the bundled file in gguf_moeify/data/)")
    args = p.parse_args()
    src = SOURCES[args.source]
    out = Path(args.out or DATA / src.out)
    chars = args.chars or src.chars
    with tempfile.TemporaryDirectory() as tmp:
        deb = args.deb
        if deb is None:
            subprocess.run(["apt-get", "download", src.package], cwd=tmp, check=True)
            deb = str(next(Path(tmp).glob(f"{src.package}_*.deb")))
        subprocess.run(["dpkg-deb", "-x", deb, f"{tmp}/x"], check=True)
        html_dir = Path(tmp) / "x" / src.html_dir
        text = "\n\n".join(page_text(html_dir / f"{name}.html", src) for name in src.pages)
        if src.licence_page:
            licence = page_text(html_dir / f"{src.licence_page}.html", src)
            (out.parent / src.licence_file).write_text(licence + "\n", encoding="utf-8")
    if len(text) < chars:
        raise SystemExit(f"the pages hold {len(text)} characters, fewer than --chars {chars}")
    cut = text.rfind("\n\n", 0, chars)
    out.write_text(text[:cut].rstrip() + "\n", encoding="utf-8")
    print(f"{out}: {cut} characters of {len(text)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
