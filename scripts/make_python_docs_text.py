"""Rebuild gguf_moeify/data/python_tutorial_excerpt.txt: the non-fiction evaluation text.

    .venv/bin/python scripts/make_python_docs_text.py [--deb python3.11-doc_*.deb] [--chars 120000]

Source: the HTML of the Python tutorial in Debian's ``python3.11-doc`` package (bookworm: 3.11.2-6+deb12u8; fetched
with ``apt-get download python3.11-doc`` unless ``--deb`` names the file). The rendered pages are read in the
tutorial's order, the main text of each is turned into plain text (headings, paragraphs, list items and code blocks
on lines of their own; the pilcrow links dropped) and the first ``--chars`` characters, cut at a paragraph end, are
written. The documentation is under the PSF licence (kept next to the text as python_docs_LICENSE.txt).
"""
from __future__ import annotations

import argparse
import html.parser
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "gguf_moeify" / "data"
PAGES = ("appetite", "interpreter", "introduction", "controlflow", "datastructures", "modules", "inputoutput",
         "errors", "classes", "stdlib", "stdlib2", "venv", "whatnow", "interactive", "floatingpoint", "appendix")
BLOCKS = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "li", "pre", "dt", "dd", "tr", "div", "section", "table",
          "blockquote"}


class MainText(html.parser.HTMLParser):
    """The text inside ``<div class="body" role="main">``; ``<pre>`` kept as it is, other whitespace folded."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.depth = 0          # div nesting inside the main body; 0: outside
        self.skip = 0           # inside a headerlink anchor
        self.pre = 0
        self.parts: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if self.depth == 0:
            if tag == "div" and a.get("role") == "main":
                self.depth = 1
            return
        if tag == "div":
            self.depth += 1
        if tag == "a" and "headerlink" in (a.get("class") or ""):
            self.skip += 1
        if tag == "pre":
            self.pre += 1
        if tag in BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if self.depth == 0:
            return
        if tag == "a" and self.skip:
            self.skip -= 1
        if tag == "pre":
            self.pre -= 1
        if tag in BLOCKS:
            self.parts.append("\n\n")
        if tag == "div":
            self.depth -= 1

    def handle_data(self, data):
        if self.depth and not self.skip:
            self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))

    def text(self) -> str:
        paras = (re.sub(r"[ \t]+\n", "\n", p).strip("\n") for p in re.split(r"\n{2,}", "".join(self.parts)))
        return "\n\n".join(p if p.startswith(" ") or "\n" in p else p.strip() for p in paras if p.strip())


def page_text(path: Path) -> str:
    parser = MainText()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser.text()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--deb", help="python3.11-doc .deb (default: apt-get download it)")
    p.add_argument("--chars", type=int, default=120_000)
    p.add_argument("--out", default=str(DATA / "python_tutorial_excerpt.txt"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        deb = args.deb
        if deb is None:
            subprocess.run(["apt-get", "download", "python3.11-doc"], cwd=tmp, check=True)
            deb = str(next(Path(tmp).glob("python3.11-doc_*.deb")))
        subprocess.run(["dpkg-deb", "-x", deb, f"{tmp}/x"], check=True)
        html_dir = Path(tmp) / "x/usr/share/doc/python3.11/html"
        text = "\n\n".join(page_text(html_dir / "tutorial" / f"{name}.html") for name in PAGES)
        licence = page_text(html_dir / "license.html")
    cut = text.rfind("\n\n", 0, args.chars)
    Path(args.out).write_text(text[:cut].rstrip() + "\n", encoding="utf-8")
    (Path(args.out).parent / "python_docs_LICENSE.txt").write_text(licence + "\n", encoding="utf-8")
    print(f"{args.out}: {cut} characters of {len(text)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
