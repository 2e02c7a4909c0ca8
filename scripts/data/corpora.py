#!/usr/bin/env python3
"""Fetches the two domain corpora of the memory decoder and splits each into train and test.

    python3 scripts/data/corpora.py [--out corpora]

writes `OUT/<domain>/{train,test}/<name>.txt` and `OUT/manifest.json`:

- `python-docs`: the Python 3.11 documentation from the Debian package python3.11-doc, its
  HTML pages (library, c-api, reference, tutorial, howto, whatsnew, ...) turned into text with
  the standard library's HTML parser: the text of Sphinx's main `role="main"` block, code
  blocks kept verbatim, navigation, scripts and headerlink marks dropped.
- `licenses`: the licence texts (`licenses/*.LICENSE`) of the PyPI package
  licensedcode-data==32.1.0 (CC-BY-4.0), each without its YAML front matter.

And one out-of-domain test set that no memory is trained on:

- `english/test`: general English, the harmless instructions of the refusal data's validation
  split (`../shared/data/refusal/harmless_val.json`, Alpaca), 200 instructions per document,
  one per line.

The split rule, used by every script of the project (and by `server train memory`'s
subsample, `plugins::memory::corpus`): a document's name is its path inside the package with
`/` written `__` and `.txt` appended (`library/os.html` -> `library__os.html.txt`); it is a
test document when the first 8 hex digits of the SHA-256 of that name, read as a number, are
divisible by 10 (about 10%), else a training document. Nothing from a test split is trained on.

Needs `apt-get download` (Debian's archive) and `pip download` (the Python package index);
the downloads are cached in OUT/downloads.
"""

import argparse
import hashlib
import html.parser
import io
import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

DEBIAN_PACKAGE = "python3.11-doc"
PYPI_PACKAGE = "licensedcode-data==32.1.0"
HTML_ROOT = "./usr/share/doc/python3.11/html/"
# Generated index pages and Sphinx's own files: no prose.
SKIPPED_HTML = ("_static/", "_sources/", "genindex", "search.html", "py-modindex.html")


def is_test(name: str) -> bool:
    """The split rule: see the module docstring."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 10 == 0


def document_name(path: str) -> str:
    return path.replace("/", "__") + ".txt"


class SphinxText(html.parser.HTMLParser):
    """The text of a Sphinx page's main block."""

    BLOCKS = {"p", "div", "section", "pre", "li", "dt", "dd", "tr", "br",
              "h1", "h2", "h3", "h4", "h5", "h6", "table", "blockquote"}
    VOID = {"br", "img", "hr", "input", "meta", "link", "wbr", "col"}
    SKIP = {"script", "style", "nav"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        # Open elements inside the main block: (tag, whether its text is dropped).
        self.stack = []
        self.inside = False
        self.parts = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if not self.inside:
            self.inside = a.get("role") == "main"
            return
        if tag in self.BLOCKS:
            self.parts.append("\n")
        if tag in self.VOID:
            return
        dropped = tag in self.SKIP or "headerlink" in (a.get("class") or "")
        self.stack.append((tag, dropped))

    def handle_endtag(self, tag):
        if not self.inside or tag in self.VOID:
            return
        if not self.stack:
            self.inside = False  # the main block itself closed
            return
        # Pop to the matching open tag (HTML lets some end tags go missing).
        while self.stack:
            open_tag, _ = self.stack.pop()
            if open_tag == tag:
                break
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.inside or any(d for _, d in self.stack):
            return
        if any(t == "pre" for t, _ in self.stack):
            self.parts.append(data)
        else:
            words = " ".join(data.split())
            lead = " " if data[:1].isspace() and words else ""
            trail = " " if data[-1:].isspace() and words else ""
            self.parts.append(lead + words + trail)

    def text(self) -> str:
        lines = [line.rstrip() for line in "".join(self.parts).splitlines()]
        out, blank = [], False
        for line in lines:
            if line.strip():
                out.append(line if line.startswith(" ") else line.lstrip())
                blank = False
            elif not blank and out:
                out.append("")
                blank = True
        return "\n".join(out).strip() + "\n"


def html_to_text(page: str) -> str:
    parser = SphinxText()
    parser.feed(page)
    parser.close()
    return parser.text()


def strip_front_matter(text: str) -> str:
    if text.startswith("---\n"):
        end = text.find("\n---\n", 4)
        if end >= 0:
            return text[end + 5:].strip() + "\n"
    return text.strip() + "\n"


def fetch(downloads: Path, command: list, pattern: str) -> Path:
    found = sorted(downloads.glob(pattern))
    if not found:
        print(f"fetching: {' '.join(command)}", file=sys.stderr)
        subprocess.run(command, cwd=downloads, check=True)
        found = sorted(downloads.glob(pattern))
    if not found:
        sys.exit(f"{' '.join(command)} left no {pattern} in {downloads}")
    return found[-1]


def deb_members(deb: Path):
    """(path, bytes) of every file of a .deb's data archive (ar + tar, read here)."""
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        sys.exit(f"{deb} is not a Debian package")
    pos = 8
    while pos < len(data):
        name = data[pos:pos + 16].decode().strip().rstrip("/")
        size = int(data[pos + 48:pos + 58].decode().strip())
        body = data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                for m in tar:
                    if m.isfile():
                        yield m.name, tar.extractfile(m).read()
            return
    sys.exit(f"{deb} has no data archive")


def python_docs(downloads: Path):
    deb = fetch(downloads, ["apt-get", "download", DEBIAN_PACKAGE], f"{DEBIAN_PACKAGE}_*.deb")
    for path, body in deb_members(deb):
        if not (path.startswith(HTML_ROOT) and path.endswith(".html")):
            continue
        rel = path[len(HTML_ROOT):]
        if any(s in rel for s in SKIPPED_HTML):
            continue
        text = html_to_text(body.decode("utf-8"))
        if len(text) > 200:
            yield rel, text


def licenses(downloads: Path):
    wheel = fetch(downloads, [sys.executable, "-m", "pip", "download", "--no-deps",
                              "--quiet", PYPI_PACKAGE, "-d", "."], "licensedcode_data-*.whl")
    with zipfile.ZipFile(wheel) as z:
        for path in sorted(z.namelist()):
            rel = path.removeprefix("licensedcode/data/")
            if rel.startswith("licenses/") and rel.endswith(".LICENSE"):
                text = strip_front_matter(z.read(path).decode("utf-8", "replace"))
                if len(text) > 200:
                    yield rel, text


ENGLISH_PER_DOCUMENT = 200


def english(refusal: Path):
    """The harmless validation instructions, as test-only documents."""
    items = json.loads((refusal / "harmless_val.json").read_text())
    lines = [" ".join(item["instruction"].split()) for item in items]
    for i in range(0, len(lines), ENGLISH_PER_DOCUMENT):
        chunk = lines[i:i + ENGLISH_PER_DOCUMENT]
        yield f"harmless_val__{i // ENGLISH_PER_DOCUMENT:03d}.txt", "\n".join(chunk) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("corpora"))
    ap.add_argument("--refusal-data", type=Path,
                    default=Path(__file__).resolve().parents[3] / "shared/data/refusal",
                    help="the refusal data folder whose harmless_val.json gives english/test")
    args = ap.parse_args()
    downloads = args.out / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    manifest = {"rule": "test iff int(sha256(name)[:8], 16) % 10 == 0", "domains": {}}
    for domain, documents in [("python-docs", python_docs), ("licenses", licenses)]:
        counts = {"train": [0, 0], "test": [0, 0]}
        for split in counts:
            (args.out / domain / split).mkdir(parents=True, exist_ok=True)
        for rel, text in documents(downloads):
            name = document_name(rel)
            split = "test" if is_test(name) else "train"
            (args.out / domain / split / name).write_text(text)
            counts[split][0] += 1
            counts[split][1] += len(text)
        manifest["domains"][domain] = {
            s: {"documents": n, "characters": c} for s, (n, c) in counts.items()}
        print(f"{domain}: {counts['train'][0]} train documents ({counts['train'][1]:,} chars), "
              f"{counts['test'][0]} test ({counts['test'][1]:,} chars)", file=sys.stderr)
    out = args.out / "english" / "test"
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    for name, text in english(args.refusal_data):
        (out / name).write_text(text)
        count += 1
    manifest["domains"]["english"] = {"test": {"documents": count}}
    print(f"english: {count} test documents", file=sys.stderr)
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
