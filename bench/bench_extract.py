"""Extraction quality and speed of every extractor on pages that come with their main text, per kind of site.

Kinds: news (newspaper4k's 23 test pages with their article texts: CNN, Time, Wired, cleveland.com, fox13, Yonhap,
Spanish, Latvian, Arabic, Chinese, Japanese, Thai, Burmese sites; scripts/fetch_data.py fetches them from PyPI)
docs (the Python docs below) and web (trafilatura 1.1.0's test pages: blogs, shops, municipal sites, each with
snippets its main text must and must not contain; scored by snippet hit rates, and favouring trafilatura, which is
tuned on them). Extractors: athanor (the default: resiliparse after pipelines/boilerplate.py),
resiliparse (main_content alone), trafilatura (as DataTrove runs it). Words are \\w+ tokens, except that Chinese,
Japanese, Thai and Burmese characters count one by one (those scripts do not separate words by spaces).

Debian's python3.11-doc ships every HTML page with the reST source it was built from (html/_sources/**/*.rst.txt):
the source is the page's main text, the HTML adds navigation, sidebars, headers and footers. For each page both
extractors run on the same bytes on one core; the extracted words are compared with the source's words as bags
(lower-cased \\w+ tokens; reST roles, directive names and option lines are cut from the source first, since they are
markup, not text). Precision: share of extracted words found in the source; recall: share of source words
extracted. Both are given averaged over documents and pooled over all words (micro). A page an extractor returns
nothing for scores 0 on both.

    python bench/bench_extract.py [--data data] [--limit N] [--kinds news docs web] [--repeat 3]

Texts are scored from each extractor's first pass; pages/s is the median of --repeat passes (see timed_texts).

The first run fetches the package into data/pydoc/ (`apt-get download`, then `dpkg-deb -x`; runs `apt-get update`
first if the download fails).
"""

from __future__ import annotations

import argparse
import ast
import gc
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

from athanor.config import ExtractConfig
from athanor.pipelines.extract import html_to_text

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from build_instructions import fetch_pydoc  # noqa: E402 - the same package, fetched one way
from fetch_data import fetch_extract_news, fetch_extract_web  # noqa: E402

WORD = re.compile(r"[\u0e00-\u0e7f\u1000-\u109f\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff]|\w+")
EXTRACTORS = ("athanor", "resiliparse", "trafilatura")
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


def news_pairs(data: Path, limit: int | None) -> list[tuple[Path, Path]]:
    """(page.html, its article text) for newspaper4k's test pages."""
    fetch_extract_news(data)
    root = data / "extract" / "news"
    return [(root / "html" / f"{t.stem}.html", t) for t in sorted((root / "txt").glob("*.txt"))][:limit]


def web_snippets(data: Path, limit: int | None) -> list[tuple[Path, list[str], list[str]]]:
    """(page, must-contain snippets, must-not-contain snippets) from trafilatura 1.1.0's realworld_tests.py.

    Its test_extract() loads a page (`result = load_mock_page(URL, xmloutput)`) then asserts `'...' in result` and
    `'...' not in result`; asserts under `if xmloutput is False:` hold for text output, so they count too."""
    root = data / "extract" / "web"
    fetch_extract_web(data)
    tree = ast.parse((root / "realworld_tests.py").read_text())
    files = next(ast.literal_eval(n.value) for n in tree.body
                 if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "MOCK_PAGES")
    test = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "test_extract")
    snippets: dict[str, tuple[list[str], list[str]]] = {}
    url = None

    def walk(body: list) -> None:
        nonlocal url
        for node in body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and node.value.args:
                url = ast.literal_eval(node.value.args[0])
            elif isinstance(node, ast.If) and "xmloutput is False" in ast.unparse(node.test):
                walk(node.body)
            elif isinstance(node, ast.Assert) and url in files:
                tests = node.test.values if isinstance(node.test, ast.BoolOp) else [node.test]
                for t in tests:
                    if (isinstance(t, ast.Compare) and isinstance(t.left, ast.Constant)
                            and isinstance(t.left.value, str) and getattr(t.comparators[0], "id", "") == "result"):
                        snippets.setdefault(url, ([], []))[isinstance(t.ops[0], ast.NotIn)].append(t.left.value)

    walk(test.body)
    pages = [(root / "cache" / files[u], must, must_not) for u, (must, must_not) in snippets.items()
             if (root / "cache" / files[u]).exists()]
    return pages[:limit]


def timed_texts(extractor: str, pages: list[bytes], repeat: int = 1) -> tuple[list[str | None], float]:
    """The texts of the first pass and the median seconds of `repeat` passes over all pages.

    A pass over the news pages takes a tenth of a second for the fast extractors, so one pass on a shared machine
    is at the mercy of one scheduler hiccup: the median of a few is the figure. Before each pass trafilatura's
    caches are reset (its deduplication cache would otherwise make later passes drop text), and every extractor
    starts after a garbage collection."""
    cfg = ExtractConfig(extractor=extractor)
    html_to_text(pages[0], cfg)  # imports and first-call costs out of the timing
    texts, times = None, []
    for _ in range(max(repeat, 1)):
        if extractor == "trafilatura":
            from trafilatura.meta import reset_caches

            reset_caches()
        gc.collect()
        start = time.perf_counter()
        out = [html_to_text(page, cfg)[0] for page in pages]
        times.append(time.perf_counter() - start)
        texts = texts if texts is not None else out
    return texts, statistics.median(times)


def evaluate_web(extractor: str, pages: list[bytes], snippets: list[tuple[list[str], list[str]]],
                 repeat: int = 1) -> dict:
    """Share of must-contain snippets found (recall-like) and of must-not-contain ones absent (precision-like)."""
    texts, seconds = timed_texts(extractor, pages, repeat)
    found = absent = n_must = n_not = 0
    for text, (must, must_not) in zip(texts, snippets):
        flat = " ".join((text or "").split())
        found += sum(" ".join(m.split()) in flat for m in must)
        absent += sum(" ".join(m.split()) not in flat for m in must_not)
        n_must, n_not = n_must + len(must), n_not + len(must_not)
    p, r = absent / max(n_not, 1), found / max(n_must, 1)
    return {"extractor": extractor, "pages": len(pages), "empty": sum(t is None for t in texts), "must": n_must,
            "must_not": n_not, "precision": p, "recall": r, "f1": _f1(p, r), "pages_per_s": len(pages) / seconds}


def words(text: str) -> Counter:
    return Counter(w.lower() for w in WORD.findall(text))


def overlap(extracted: Counter, reference: Counter) -> tuple[int, int, int]:
    """(shared words, extracted words, reference words), as bags."""
    return sum((extracted & reference).values()), sum(extracted.values()), sum(reference.values())


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r else 0.0


def evaluate(extractor: str, pages: list[bytes], references: list[Counter], repeat: int = 1) -> dict:
    texts, seconds = timed_texts(extractor, pages, repeat)
    precisions, recalls, f1s, totals = [], [], [], Counter()
    for text, reference in zip(texts, references):
        shared, extracted, ref = overlap(words(text or ""), reference)
        precisions.append(shared / extracted if extracted else 0.0)
        recalls.append(shared / ref if ref else 0.0)
        f1s.append(_f1(precisions[-1], recalls[-1]))
        totals.update(shared=shared, extracted=extracted, reference=ref)
    n = len(pages)
    p, r = totals["shared"] / max(totals["extracted"], 1), totals["shared"] / max(totals["reference"], 1)
    return {
        "extractor": extractor,
        "pages": n,
        "empty": sum(t is None for t in texts),
        "precision_doc": sum(precisions) / n,
        "recall_doc": sum(recalls) / n,
        "f1_doc": sum(f1s) / n,
        "precision_micro": p,
        "recall_micro": r,
        "f1_micro": _f1(p, r),
        "pages_per_s": n / seconds,
    }


def kind_sets(data: Path, kinds: list[str], limit: int | None) -> dict[str, tuple[list[bytes], list[Counter]]]:
    sets = {}
    if "news" in kinds:
        pairs = news_pairs(data, limit)
        sets["news"] = ([h.read_bytes() for h, _ in pairs], [words(t.read_text(errors="replace")) for _, t in pairs])
    if "docs" in kinds:
        pairs = page_pairs(fetch_pydoc(data), limit)
        sets["docs"] = ([h.read_bytes() for h, _ in pairs],
                        [words(REST_MARKUP.sub(" ", t.read_text(errors="replace"))) for _, t in pairs])
    return sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data", type=Path)
    ap.add_argument("--limit", type=int, default=None, help="first N pages of each kind only")
    ap.add_argument("--kinds", nargs="+", default=["news", "docs", "web"], choices=["news", "docs", "web"])
    ap.add_argument("--repeat", type=int, default=3, help="timed passes per extractor; pages/s from the median")
    args = ap.parse_args()
    sets = kind_sets(args.data, args.kinds, args.limit)
    print("Bag-of-words overlap with the reference texts (first pass), one core, all extractors in this process; "
          f"pages/s: median of {args.repeat} passes\n")
    print("| kind | pages | extractor | empty | P (micro) | R (micro) | F1 (micro) | P (doc) | R (doc) | F1 (doc) "
          "| pages/s | speed vs trafilatura |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for kind, (pages, references) in sets.items():
        rows = [evaluate(name, pages, references, args.repeat) for name in EXTRACTORS]
        base = rows[-1]["pages_per_s"]
        for r in rows:
            print(f"| {kind} | {r['pages']} | {r['extractor']} | {r['empty']} | {r['precision_micro']:.3f} | "
                  f"{r['recall_micro']:.3f} | {r['f1_micro']:.3f} | {r['precision_doc']:.3f} | {r['recall_doc']:.3f} | "
                  f"{r['f1_doc']:.3f} | {r['pages_per_s']:.1f} | {r['pages_per_s'] / base:.1f}x |")
    if "web" in args.kinds:
        web = web_snippets(args.data, args.limit)
        pages, snippets = [p.read_bytes() for p, _, _ in web], [(m, n) for _, m, n in web]
        print(f"\nweb: trafilatura 1.1.0's test pages (blogs, shops, municipal sites), {len(web)} with snippets. "
              "P: share of must-not-contain snippets absent; R: share of must-contain snippets found "
              "(trafilatura is tuned on these pages)\n")
        print("| kind | pages | extractor | empty | snippets (must / must not) | P | R | F1 | pages/s "
              "| speed vs trafilatura |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        rows = [evaluate_web(name, pages, snippets, args.repeat) for name in EXTRACTORS]
        for r in rows:
            print(f"| web | {r['pages']} | {r['extractor']} | {r['empty']} | {r['must']} / {r['must_not']} | "
                  f"{r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {r['pages_per_s']:.1f} | "
                  f"{r['pages_per_s'] / rows[-1]['pages_per_s']:.1f}x |")


if __name__ == "__main__":
    main()
