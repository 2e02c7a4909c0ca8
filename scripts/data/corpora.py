#!/usr/bin/env python3
"""Fetches the memory decoder's two domain corpora and a long-context corpus, split train/test.

    python3 scripts/data/corpora.py [--out corpora] [--only DOMAIN ...]

writes `OUT/<domain>/{train,test}/<name>.txt` and `OUT/manifest.json`. Without `--only` it
builds `python-docs`, `licenses` and `english`; `--only` (repeatable) builds just the domains
named, and `long-text` is built only when named (`--only long-text`): it is the sparse-attention
plug-in's corpus, not the memory decoder's, and the default output stays what the README
describes. The manifest keeps the entries of domains not rebuilt:

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

And one long-context corpus, for training and evaluating the sparse-attention plug-in:

- `long-text`: documents long enough to need long context. `kjv__<Book>.txt`: the 66 books of the
  King James Bible from the Debian package bible-kjv-text (public domain), each its title line and
  then one paragraph per chapter, the verses joined as running text without chapter:verse
  markers. `pydoc__<page>.txt`: the pages of `python-docs` (same conversion) whose text is at
  least 60,000 characters (above ~8k tokens). The pydoc pages are named with their own prefix,
  so the split rule may put a page in long-text/test that python-docs has in train (and the
  reverse): never evaluate one corpus' test split on a plug-in trained on the other's train split.

The split rule, used by every script of the project (and by `server train memory`'s
subsample, `plugins::memory::corpus`): a document's name is its path inside the package with
`/` written `__` and `.txt` appended (`library/os.html` -> `library__os.html.txt`); it is a
test document when the first 8 hex digits of the SHA-256 of that name, read as a number, are
divisible by 10 (about 10%), else a training document. Nothing from a test split is trained on.

Needs `apt-get download` (Debian's archive), `pip download` (the Python package index) and, for
the Bible, `gzip` (it reads the `compress` blocks of bible.data); the downloads are cached in
OUT/downloads.
"""

import argparse
import hashlib
import html.parser
import io
import json
import re
import struct
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
KJV_PACKAGE = "bible-kjv-text"
KJV_DATA = "./usr/lib/bible.data"
# The books in the order of bible.data, which names them only by abbreviation (Ge, Exo, ...).
KJV_BOOKS = (
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth",
    "1 Samuel", "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra",
    "Nehemiah", "Esther", "Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon",
    "Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos",
    "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah",
    "Malachi", "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians",
    "2 Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians", "1 Thessalonians",
    "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus", "Philemon", "Hebrews", "James",
    "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude", "Revelation")
# A verse line of bible.data: `Ge1:1 In the beginning ...`, `1Sm3:4 ...`.
KJV_VERSE = re.compile(r"([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)")
# Shorter pages fit a short context; 60,000 characters are more than ~8k tokens.
LONG_PAGE_CHARS = 60_000
# The documentation's table of contents passes the length rule but is a list of headings.
NOT_PROSE = ("contents.html",)


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


def decompress_brs(data: bytes) -> str:
    """The text of a Bible Retrieval System data file (bible.data).

    Layout: the magic `EC02`, a description, then big-endian u32s: at 0x54 the block size
    (64 KiB of text), at 0x58 the block count n, from 0x5c n + 1 file offsets of the blocks.
    Each block is a Unix `compress` (LZW) stream whose 3-byte magic the file stores once, just
    before the first block; gzip reads that format, the standard library does not.
    """
    if not data.startswith(b"EC02"):
        sys.exit(f"{KJV_DATA} is not a BRS data file")
    n = struct.unpack(">I", data[0x58:0x5c])[0]
    offsets = struct.unpack(f">{n + 1}I", data[0x5c:0x5c + 4 * (n + 1)])
    magic = data[offsets[0] - 3:offsets[0]]
    if not magic.startswith(b"\x1f\x9d"):
        sys.exit(f"{KJV_DATA}: no compress magic before the first block")
    blocks = []
    for start, end in zip(offsets, offsets[1:]):
        run = subprocess.run(["gzip", "-dc"], input=magic + data[start:end],
                             capture_output=True, check=True)
        blocks.append(run.stdout)
    return b"".join(blocks).decode("ascii")


def kjv_chapters(text: str):
    """{book abbreviation: {chapter: [verse text]}} in the file's order."""
    books = {}
    for line in text.splitlines()[1:]:  # the first line is the edition's title
        if not line.strip():
            continue
        m = KJV_VERSE.fullmatch(line)
        if not m:
            sys.exit(f"{KJV_DATA}: not a verse line: {line[:80]!r}")
        book, chapter, _, verse = m.groups()
        books.setdefault(book, {}).setdefault(int(chapter), []).append(" ".join(verse.split()))
    if len(books) != len(KJV_BOOKS):
        sys.exit(f"{KJV_DATA}: {len(books)} books, expected {len(KJV_BOOKS)}")
    return books


def kjv(downloads: Path):
    """One document per book: its title, then each chapter as one paragraph of running text."""
    deb = fetch(downloads, ["apt-get", "download", KJV_PACKAGE], f"{KJV_PACKAGE}_*.deb")
    data = dict(deb_members(deb)).get(KJV_DATA)
    if data is None:
        sys.exit(f"{deb} has no {KJV_DATA}")
    books = kjv_chapters(decompress_brs(data))
    for title, chapters in zip(KJV_BOOKS, books.values()):
        paragraphs = [" ".join(verses) for _, verses in sorted(chapters.items())]
        yield title.replace(" ", "_"), title + "\n\n" + "\n\n".join(paragraphs) + "\n"


def long_text(downloads: Path):
    """The Bible's books and the long Python pages; the path's first part names the source."""
    for book, text in kjv(downloads):
        yield f"kjv/{book}", text
    for rel, text in python_docs(downloads):
        if len(text) >= LONG_PAGE_CHARS and rel not in NOT_PROSE:
            yield f"pydoc/{rel}", text


ENGLISH_PER_DOCUMENT = 200


def english(refusal: Path):
    """The harmless validation instructions, as test-only documents."""
    items = json.loads((refusal / "harmless_val.json").read_text())
    lines = [" ".join(item["instruction"].split()) for item in items]
    for i in range(0, len(lines), ENGLISH_PER_DOCUMENT):
        chunk = lines[i:i + ENGLISH_PER_DOCUMENT]
        yield f"harmless_val__{i // ENGLISH_PER_DOCUMENT:03d}.txt", "\n".join(chunk) + "\n"


def split_counts(records) -> dict:
    """{"train"|"test": {"documents", "characters"}} of (name, split, characters) records."""
    counts = {split: {"documents": 0, "characters": 0} for split in ("train", "test")}
    for _, split, chars in records:
        counts[split]["documents"] += 1
        counts[split]["characters"] += chars
    return counts


def write_split(out: Path, domain: str, documents) -> list:
    """Writes each (path, text) to its split; the (name, split, characters) of each."""
    for split in ("train", "test"):
        (out / domain / split).mkdir(parents=True, exist_ok=True)
    records = []
    for rel, text in documents:
        name = document_name(rel)
        split = "test" if is_test(name) else "train"
        (out / domain / split / name).write_text(text)
        records.append((name, split, len(text)))
    return records


def report(label: str, counts: dict):
    print(f"{label}: {counts['train']['documents']} train documents "
          f"({counts['train']['characters']:,} chars), {counts['test']['documents']} test "
          f"({counts['test']['characters']:,} chars)", file=sys.stderr)


def build_domain(out: Path, domain: str, downloads: Path) -> dict:
    """Writes one of python-docs and licenses; its manifest entry."""
    documents = {"python-docs": python_docs, "licenses": licenses}[domain]
    counts = split_counts(write_split(out, domain, documents(downloads)))
    report(domain, counts)
    return counts


def build_long_text(out: Path, downloads: Path) -> dict:
    """Writes long-text; its manifest entry, with the counts of each source.

    With 66 books a split can come out empty by chance: that is reported, not fixed by
    changing the rule, which every script shares.
    """
    records = write_split(out, "long-text", long_text(downloads))
    entry = {
        "description": "long-context text for the sparse-attention plug-in: the King James "
                       "Bible, one document per book (kjv__*), and the python-docs pages of "
                       f"at least {LONG_PAGE_CHARS:,} characters (pydoc__*)",
        "licence": {"kjv": "public domain (in most of the world; Crown rights in the UK)",
                    "pydoc": "PSF License (Python 3.11 documentation)"},
        **split_counts(records),
        "sources": {},
    }
    for source in ("kjv", "pydoc"):
        counts = split_counts(r for r in records if r[0].startswith(source + "__"))
        entry["sources"][source] = counts
        report(f"long-text {source}", counts)
        for split, c in counts.items():
            if c["documents"] == 0:
                print(f"WARNING: long-text has no {source} document in {split}: the split "
                      "rule left none", file=sys.stderr)
    report("long-text", split_counts(records))
    return entry


def build_english(out: Path, refusal: Path) -> dict:
    out = out / "english" / "test"
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    for name, text in english(refusal):
        (out / name).write_text(text)
        count += 1
    print(f"english: {count} test documents", file=sys.stderr)
    return {"test": {"documents": count}}


DOMAINS = ("python-docs", "licenses", "english", "long-text")
DEFAULT_DOMAINS = ("python-docs", "licenses", "english")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("corpora"))
    ap.add_argument("--only", action="append", choices=DOMAINS, metavar="DOMAIN",
                    help=f"build only this domain (repeatable; one of {', '.join(DOMAINS)}); "
                         f"without it: {', '.join(DEFAULT_DOMAINS)}")
    ap.add_argument("--refusal-data", type=Path,
                    default=Path(__file__).resolve().parents[3] / "shared/data/refusal",
                    help="the refusal data folder whose harmless_val.json gives english/test")
    args = ap.parse_args()
    domains = [d for d in DOMAINS if d in (args.only or DEFAULT_DOMAINS)]
    downloads = args.out / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    # Entries of domains not rebuilt now stay, so that --only does not forget them.
    path = args.out / "manifest.json"
    old = json.loads(path.read_text()).get("domains", {}) if path.exists() else {}
    manifest = {"rule": "test iff int(sha256(name)[:8], 16) % 10 == 0", "domains": old}
    for domain in domains:
        if domain == "english":
            entry = build_english(args.out, args.refusal_data)
        elif domain == "long-text":
            entry = build_long_text(args.out, downloads)
        else:
            entry = build_domain(args.out, domain, downloads)
        manifest["domains"][domain] = entry
    path.write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
