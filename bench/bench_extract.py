"""Extraction quality and speed: resiliparse vs trafilatura on the Python docs, whose pages come with their main text.

Debian's python3.11-doc ships every HTML page with the reST source it was built from (html/_sources/**/*.rst.txt):
the source is the page's main text, the HTML adds navigation, sidebars, headers and footers. For each page both
extractors run on the same bytes on one core; the extracted words are compared with the source's words as bags
(lower-cased \\w+ tokens; reST roles, directive names and option lines are cut from the source first, since they are
markup, not text). Precision: share of extracted words found in the source; recall: share of source words
extracted. Both are given averaged over documents and pooled over all words (micro). A page an extractor returns
nothing for scores 0 on both.

    python bench/bench_extract.py [--data data] [--limit N]

The first run fetches the package into data/pydoc/ (`apt-get download`, then `dpkg-deb -x`; runs `apt-get update`
first if the download fails).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import Counter
from pathlib import Path

from athanor.config import ExtractConfig
from athanor.pipelines.extract import html_to_text

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from build_instructions import fetch_pydoc  # noqa: E402 - the same package, fetched one way

WORD = re.compile(r"\w+")
REST_MARKUP = re.compile(r"^\s*\.\. [\w:-]+::|^\s*:[\w-]+:(?=\s|$)|:[\w:+-]+:(?=`)", re.MULTILINE)


def page_pairs(html: Path, limit: int | None) -> list[tuple[Path, Path]]:
    """(page.html, its reST source) for every page that has one."""
    pairs = []
    for page in sorted(html.rglob("*.html")):
        rel = page.relative_to(html)
        source = html / "_sources" / rel.with_suffix(".rst.txt")
        if rel.parts[0] != "_sources" and source.exists():
            pairs.append((page, source))
    return pairs[:limit]


def words(text: str) -> Counter:
    return Counter(w.lower() for w in WORD.findall(text))


def overlap(extracted: Counter, reference: Counter) -> tuple[int, int, int]:
    """(shared words, extracted words, reference words), as bags."""
    return sum((extracted & reference).values()), sum(extracted.values()), sum(reference.values())


def evaluate(extractor: str, pairs: list[tuple[Path, Path]], references: list[Counter]) -> dict:
    cfg = ExtractConfig(extractor=extractor)
    pages = [page.read_bytes() for page, _ in pairs]
    start = time.perf_counter()
    texts = [html_to_text(page, cfg)[0] for page in pages]
    seconds = time.perf_counter() - start
    precisions, recalls, totals = [], [], Counter()
    for text, reference in zip(texts, references):
        shared, extracted, ref = overlap(words(text or ""), reference)
        precisions.append(shared / extracted if extracted else 0.0)
        recalls.append(shared / ref if ref else 0.0)
        totals.update(shared=shared, extracted=extracted, reference=ref)
    n = len(pairs)
    return {
        "extractor": extractor,
        "pages": n,
        "empty": sum(t is None for t in texts),
        "precision_doc": sum(precisions) / n,
        "recall_doc": sum(recalls) / n,
        "precision_micro": totals["shared"] / max(totals["extracted"], 1),
        "recall_micro": totals["shared"] / max(totals["reference"], 1),
        "pages_per_s": n / seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data", type=Path)
    ap.add_argument("--limit", type=int, default=None, help="first N pages only")
    args = ap.parse_args()
    pairs = page_pairs(fetch_pydoc(args.data), args.limit)
    references = [words(REST_MARKUP.sub(" ", source.read_text(errors="replace"))) for _, source in pairs]
    rows = [evaluate(name, pairs, references) for name in ("resiliparse", "trafilatura")]

    print(f"{len(pairs)} Python 3.11 doc pages vs their reST sources (bag-of-words overlap, one core)\n")
    print("| extractor | empty | precision (doc avg) | recall (doc avg) | precision (micro) | recall (micro) "
          "| pages/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['extractor']} | {r['empty']} | {r['precision_doc']:.3f} | {r['recall_doc']:.3f} | "
              f"{r['precision_micro']:.3f} | {r['recall_micro']:.3f} | {r['pages_per_s']:.1f} |")
    print(f"\nresiliparse / trafilatura speed: {rows[0]['pages_per_s'] / rows[1]['pages_per_s']:.1f}x")


if __name__ == "__main__":
    main()
