"""Make trtpipe/data/bench_corpus.txt: natural English sentences for the real-text benchmark.

Sources, both public domain and shipped by Debian packages:
- Ambrose Bierce, "The Devil's Dictionary" (1911, copyright expired): ``dict-devil``.
- The Jargon File 4.4.7 ("in the public domain, to be freely used, shared, and modified"):
  ``dict-jargon``; every fourth prose sentence is kept so the file stays small.

    apt-get download dict-devil dict-jargon
    dpkg-deb -x dict-devil_*.deb src && dpkg-deb -x dict-jargon_*.deb src
    python scripts/make_bench_corpus.py src/usr/share/dictd/devil.dict.dz \
        src/usr/share/dictd/jargon.dict.dz trtpipe/data/bench_corpus.txt

Only prose paragraphs are kept (verse, code, quotations and attributions are dropped),
cross-reference braces, italics underscores and sense tags removed, then split into sentences;
every distinct sentence of 3 to 120 words is written once, in the source's order, one per line.
"""

from __future__ import annotations

import argparse
import gzip
import re
from pathlib import Path

DEVIL_HEADWORD = re.compile(r"^[A-Z][A-Z' .-]+, (?:[a-z]+\.\s*)+(?:[a-z]+\.)?\s*")
# Split after . ! ? (optionally a closing quote/bracket) before an upper-case start.
SPLIT = re.compile(r"(?<=[.!?])[\"'”’)\]]?\s+(?=[\"'“‘(\[]?[A-Z])")
ABBREVIATIONS = ("Mr.", "Mrs.", "Dr.", "St.", "Mt.", "Messrs.", "i.e.", "e.g.", "viz.", "cf.")
ABBREVIATIONS += ("esp.", "etc.", "vs.", "U.S.", "Inc.", "Co.", "approx.", "orig.")


def read_dict(path: str) -> str:
    raw = Path(path).read_bytes()
    return (gzip.decompress(raw) if path.endswith(".dz") else raw).decode("utf-8", "replace")


def devil_paragraphs(text: str) -> list[str]:
    """Entries start at ABASEMENT; a block of only indented lines is verse."""
    body = text[text.index("ABASEMENT, n.") :]
    result = []
    for block in re.split(r"\n\s*\n", body):
        lines = [ln for ln in block.splitlines() if ln.strip()]
        if not lines or all(ln.startswith(" ") for ln in lines):
            continue
        result.append(DEVIL_HEADWORD.sub("", " ".join(ln.strip() for ln in lines)))
    return result


def jargon_paragraphs(text: str) -> list[str]:
    """Prose is indented by exactly four spaces; code and verse by more."""
    result = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln for ln in block.splitlines() if ln.strip()]
        if not lines or not all(ln.startswith("    ") and ln[4] != " " for ln in lines):
            continue
        paragraph = " ".join(ln.strip() for ln in lines)
        paragraph = re.sub(r"^(?:\d+\.\s*)?(?:\[[^\]]*\]\s*)*", "", paragraph)
        result.append(paragraph)
    return result


def sentences(paragraph: str) -> list[str]:
    paragraph = re.sub(r"\{\s*([^}]*?)\s*\}", r"\1", paragraph).replace("_", "")
    paragraph = re.sub(r"\s+", " ", paragraph).strip()
    parts: list[str] = []
    for piece in SPLIT.split(paragraph):
        if parts and parts[-1].endswith(ABBREVIATIONS):
            parts[-1] = f"{parts[-1]} {piece}"
        else:
            parts.append(piece)
    return [
        p.strip()
        for p in parts
        if 3 <= len(p.split()) <= 120 and not p.isupper() and p[-1] in ".!?\"'”’)"
    ]


def main(devil: str, jargon: str, target: str) -> None:
    out: list[str] = []
    seen: set[str] = set()

    def add(items: list[str]) -> None:
        for sentence in items:
            if sentence not in seen:
                seen.add(sentence)
                out.append(sentence)

    for paragraph in devil_paragraphs(read_dict(devil)):
        add(sentences(paragraph))
    jargon_sentences = [s for p in jargon_paragraphs(read_dict(jargon)) for s in sentences(p)]
    add(jargon_sentences[::4])
    Path(target).write_text("\n".join(out) + "\n", encoding="utf-8")
    words = [len(s.split()) for s in out]
    print(f"wrote {target}: {len(out)} sentences, {min(words)}-{max(words)} words")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("devil", help="devil.dict.dz from Debian's dict-devil")
    parser.add_argument("jargon", help="jargon.dict.dz from Debian's dict-jargon")
    parser.add_argument("target", help="the corpus file to write")
    args = parser.parse_args()
    for source in (args.devil, args.jargon):
        if not Path(source).is_file():
            parser.error(f"{source} does not exist (see this script's docstring for the source)")
    main(args.devil, args.jargon, args.target)
