"""Build the two local lm-evaluation-harness tasks (configs/lm_eval/) from real human-written text in data/.

    python scripts/build_eval_tasks.py [--data data] [--out data/eval] [--seed 1234]

Sources (scripts/fetch_data.py puts them in data/quality/high/; none is in the demo LM's training corpus, which is
news HTML and a WARC crawl):

    lee_background.txt   300 ABC news articles, one per line (Lee et al. 2005; gensim's LGPL test data)
    alice29.txt          Alice's Adventures in Wonderland (Project Gutenberg, public domain)
    lcet10.txt           Library of Congress Workshop on Electronic Texts, 1992 (Project Gutenberg, public domain)
    plrabn12.txt         Paradise Lost (Project Gutenberg, public domain)

Outputs, in --out:

    athanor_cloze.jsonl   LAMBADA-style last-word cloze. `text` is a 40-120 word passage of whole sentences from one
                          article or book unit (a prose paragraph, or a run of at most 300 words of a longer one),
                          ending in its last word without the final punctuation, exactly as lambada_openai's `text`:
                          context = all but the last space-separated word, target = " " + it.
    athanor_choice.jsonl  HellaSwag-style four-way choice. `query` is the opening sentences of an article (or a book
                          unit), `choices` its real next sentence and three real sentences of about the same length
                          from OTHER articles (for books: units of the same book at least 20 units away), in seeded
                          order; `label` is the index of the real one.
    manifest.json         seed, counts per task and source, source files with sha256 and licence, output sha256.

Everything is a pure function of the source files and the seed (random.Random(seed) in a fixed order, sorted JSON
keys), so a rerun writes the same bytes; files are replaced atomically and only when their bytes change.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

VERSION = 1
CLOZE_FILE, CHOICE_FILE, MANIFEST_FILE = "athanor_cloze.jsonl", "athanor_choice.jsonl", "manifest.json"

NEWS = "lee_background.txt"
# name -> (file, first line of the body, the line that ends it)
BOOKS = {
    "alice": ("alice29.txt", r"^\s*CHAPTER I\s*$", r"^\s*THE END\s*$"),
    "lcet10": ("lcet10.txt", r"^\s*INTRODUCTION\s*$", r"^\s*END\s*$"),
    "paradise_lost": ("plrabn12.txt", r"^\s*Book I\s*$", r"^\s*\[The End\]"),
}
LICENCES = {
    NEWS: "ABC news articles of the Lee et al. (2005) document-similarity corpus, as shipped in gensim's test data "
          "(gensim is LGPL-2.1); the articles belong to the Australian Broadcasting Corporation",
    "alice29.txt": "Project Gutenberg etext, public domain (Canterbury corpus copy, brotli sdist)",
    "lcet10.txt": "Project Gutenberg etext, public domain (Canterbury corpus copy, brotli sdist)",
    "plrabn12.txt": "Project Gutenberg etext, public domain (Canterbury corpus copy, brotli sdist)",
}
# Items per task and source, at most (a seeded sample when a source offers more).
CLOZE_CAP = {"news": 200, "alice": 100, "lcet10": 100, "paradise_lost": 100}
CHOICE_CAP = {"news": 300, "alice": 100, "lcet10": 100}

CLOZE_WORDS = (40, 120)  # passage length, in words
CONTEXT_WORDS = (20, 120)  # choice: the opening sentences
ENDING_WORDS = (6, 40)  # choice: each ending
MIN_PARAGRAPH_DISTANCE = 20  # book distractors come from units at least this far away
MAX_UNIT_WORDS = 300  # book paragraphs longer than this are cut into runs of whole sentences

# Words that end in a period without ending a sentence (lower-cased, without the period).
ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "gen", "col", "lt", "sgt", "capt", "rev", "hon", "gov", "sen",
    "rep", "vs", "etc", "e.g", "i.e", "cf", "no", "nos", "vol", "vols", "p", "pp", "fig", "figs", "inc", "co", "corp",
    "ltd", "mt", "ft", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "approx",
    "dept", "univ", "assn", "ed", "eds", "op", "ca", "u.s", "u.k", "u.n", "a.m", "p.m",
}
# A sentence ends at . ! or ? (closing quotes or brackets may follow), before whitespace and an opening capital,
# digit or quote.
BOUNDARY = re.compile(r"""[.!?]['"’”)\]]*(?=\s+['"‘“(`]*[A-Z0-9])""")
GOOD_CHARS = re.compile(r"""[A-Za-z0-9 .,;:!?'"`()\[\]\-&%$/’‘“”]*""")  # [] : editors' insertions in quotes
BOILERPLATE = re.compile(r"gutenberg|e-?text|copyright|\bascii\b|internet|listserv|\bftp\b|@", re.IGNORECASE)
WORD = re.compile(r"[A-Za-z]{3,}")
ROMAN = re.compile(r"^[IVXLC]+$")


@dataclass
class Doc:
    source: str  # news, alice, lcet10, paradise_lost
    index: int  # article number (line) or paragraph number within the book's body
    sentences: list[str]


def normalize(text: str) -> str:
    """One space between words. Alice's `quote' marks stay until `plain` (the backtick tells where a quote opens)."""
    return re.sub(r"\s+", " ", text).strip()


def plain(text: str) -> str:
    """The text as the tasks show it: Alice's `quote' style becomes 'quote'."""
    return text.replace("`", "'")


CLOSING_SINGLE = re.compile(r"(?<=\S)'(?=[\s.,;:!?)\-]|$)")


def open_quote(text: str) -> bool:
    """Whether text leaves a quotation open: an odd number of double quotes, or more `-opened quotes than closed."""
    opened = text.count("`")
    return text.count('"') % 2 == 1 or (opened > 0 and opened > len(CLOSING_SINGLE.findall(text)))


def balanced(text: str) -> bool:
    """No quotation left open or closed without its opening (double quotes even; as many ` as closing ')."""
    opened = text.count("`")
    return text.count('"') % 2 == 0 and (opened == 0 or opened == len(CLOSING_SINGLE.findall(text)))


def split_sentences(text: str) -> list[str]:
    """Sentences of a normalized paragraph. A period after a known abbreviation or an initial ("W.", "J.") ends
    nothing; inside an open double quote nothing ends either, so a quoted speech stays one unit."""
    out, start = [], 0
    for m in BOUNDARY.finditer(text):
        end = m.end()
        word = text[start:m.start() + 1].rsplit(" ", 1)[-1].lstrip("'\"(‘“")
        bare = word[:-1].lower()
        if word.endswith(".") and (bare in ABBREVIATIONS or re.fullmatch(r"[A-Za-z]", bare or "")):
            continue
        piece = text[start:end].strip()
        if open_quote(piece):  # inside a quotation: keep going
            continue
        out.append(piece)
        start = end
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


def is_prose(paragraph: str) -> bool:
    """A paragraph of running text: no tables, rules, bullets, addresses or header lines."""
    letters = [c for c in paragraph if c.isalpha()]
    if len(paragraph.split()) < 12 or len(letters) < 0.7 * len(paragraph.replace(" ", "")):
        return False
    if sum(c.isupper() for c in letters) > 0.2 * len(letters):  # headers, contents, all-caps names lists
        return False
    if sum(c.isdigit() for c in paragraph) > 0.05 * len(paragraph):
        return False
    if not GOOD_CHARS.fullmatch(paragraph) or BOILERPLATE.search(paragraph):
        return False
    return bool(re.search(r"[.!?]['\")]*$", paragraph))  # ends a sentence


def is_sentence(s: str, words: tuple[int, int]) -> bool:
    """A whole sentence of `words` words: starts with a capital (or a quote), ends a sentence, quotes balanced."""
    n = len(s.split())
    return (words[0] <= n <= words[1] and (s[0].isupper() or s[0] in "`\"") and balanced(s)
            and bool(re.search(r"[.!?]['\")]*$", s)) and not ROMAN.match(s.split()[0].rstrip(".")))


def book_paragraphs(path: Path, start: str, stop: str) -> list[str]:
    """Normalized prose paragraphs (blank-line separated) of a book's body, between its start and end markers."""
    lines = path.read_text(encoding="utf-8", errors="strict").splitlines()
    begin = next((i for i, line in enumerate(lines) if re.match(start, line)), 0)
    end = next((i for i in range(len(lines) - 1, begin, -1) if re.match(stop, lines[i])), len(lines))
    paragraphs, current = [], []
    for line in lines[begin:end] + [""]:
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append(normalize(" ".join(current)))
            current = []
    return [p for p in paragraphs if is_prose(p)]


def chunks(sentences: list[str], max_words: int) -> list[list[str]]:
    """Consecutive runs of whole sentences of at most max_words words (a longer sentence stands alone): Paradise
    Lost's verse paragraphs run to thousands of words, and one passage per paragraph would leave few items."""
    out: list[list[str]] = []
    current: list[str] = []
    n = 0
    for s in sentences:
        w = len(s.split())
        if current and n + w > max_words:
            out.append(current)
            current, n = [], 0
        current.append(s)
        n += w
    if current:
        out.append(current)
    return out


def load_docs(data: Path) -> tuple[list[Doc], dict[str, dict]]:
    high = data / "quality" / "high"
    sources: dict[str, dict] = {}
    docs: list[Doc] = []
    news_path = high / NEWS
    articles = [normalize(line) for line in news_path.read_text(encoding="utf-8").splitlines()]
    kept = 0
    for i, article in enumerate(articles):
        if article and GOOD_CHARS.fullmatch(article):
            docs.append(Doc("news", i, split_sentences(article)))
            kept += 1
    sources["news"] = {"file": f"quality/high/{NEWS}", "sha256": sha256(news_path), "documents": kept,
                       "unit": "article (one line)", "licence": LICENCES[NEWS]}
    for name, (file, start, stop) in BOOKS.items():
        path = high / file
        paragraphs = book_paragraphs(path, start, stop)
        units = [chunk for p in paragraphs for chunk in chunks(split_sentences(p), MAX_UNIT_WORDS)]
        docs += [Doc(name, i, sentences) for i, sentences in enumerate(units)]
        sources[name] = {"file": f"quality/high/{file}", "sha256": sha256(path), "documents": len(units),
                         "paragraphs": len(paragraphs), "licence": LICENCES[file],
                         "unit": f"prose paragraph (longer ones cut into runs of whole sentences of at most "
                                 f"{MAX_UNIT_WORDS} words)"}
    return docs, sources


def cloze_candidates(doc: Doc) -> list[str]:
    """Every passage of whole consecutive sentences with CLOZE_WORDS words, balanced double quotes and a last word
    of letters only (3 or more, not all capitals), as lambada-style text: the final punctuation taken off."""
    out = []
    s = doc.sentences
    for i in range(len(s)):
        if not (s[i][0].isupper() or s[i][0] in "`\""):
            continue
        n = 0
        for j in range(i, len(s)):
            n += len(s[j].split())
            if n > CLOZE_WORDS[1]:
                break
            if n < CLOZE_WORDS[0]:
                continue
            passage = " ".join(s[i : j + 1])
            if not balanced(passage):
                continue
            body, last = passage.rsplit(" ", 1)
            word = re.sub(r"""[.!?'"’”)\]]+$""", "", last)
            if not (re.fullmatch(r"[.!?]['\"’”)\]]*", last[len(word):]) and WORD.fullmatch(word)
                    and not word.isupper()):
                continue
            out.append(plain(f"{body} {word}"))
    return out


def build_cloze(docs: list[Doc], rng: random.Random) -> list[dict]:
    per_source: dict[str, list[dict]] = {}
    for doc in docs:  # one passage per article or paragraph, so the items spread over the sources
        candidates = cloze_candidates(doc)
        if candidates:
            text = rng.choice(candidates)
            per_source.setdefault(doc.source, []).append(
                {"text": text, "source": doc.source, "doc": doc.index})
    items = []
    for source, cap in CLOZE_CAP.items():
        pool = per_source.get(source, [])
        items += rng.sample(pool, min(cap, len(pool)))
    return items


def build_choice(docs: list[Doc], rng: random.Random) -> list[dict]:
    endings: dict[str, list[tuple[int, str]]] = {}  # source -> (doc index, sentence): the distractor pool
    for doc in docs:
        for k, s in enumerate(doc.sentences):
            if k > 0 and is_sentence(s, ENDING_WORDS):
                endings.setdefault(doc.source, []).append((doc.index, s))
    per_source: dict[str, list[dict]] = {}
    for doc in docs:
        if doc.source not in CHOICE_CAP:
            continue
        options = []
        for k in range(1, len(doc.sentences)):
            context = " ".join(doc.sentences[:k])
            n = len(context.split())
            if n > CONTEXT_WORDS[1]:
                break
            if n >= CONTEXT_WORDS[0] and balanced(context) and is_sentence(doc.sentences[k], ENDING_WORDS):
                options.append((context, doc.sentences[k]))
        if not options:
            continue
        context, gold = rng.choice(options)
        far = (lambda i: i != doc.index) if doc.source == "news" else \
            (lambda i: abs(i - doc.index) >= MIN_PARAGRAPH_DISTANCE)
        n = len(gold.split())
        distractors: list[str] = []
        for lo, hi in ((0.8, 1.25), (0.67, 1.5), (0.5, 2.0), (0.0, 1e9)):  # about the gold ending's length first
            pool = sorted({s for i, s in endings[doc.source]
                           if far(i) and lo * n <= len(s.split()) <= hi * n and s != gold and s not in distractors})
            if len(pool) >= 3 - len(distractors):
                distractors += rng.sample(pool, 3 - len(distractors))
                break
        if len(distractors) < 3:
            continue
        choices = [plain(c) for c in (gold, *distractors)]
        rng.shuffle(choices)
        per_source.setdefault(doc.source, []).append(
            {"query": plain(context), "choices": choices, "label": choices.index(plain(gold)), "source": doc.source,
             "doc": doc.index})
    items = []
    for source, cap in CHOICE_CAP.items():
        pool = per_source.get(source, [])
        items += rng.sample(pool, min(cap, len(pool)))
    return items


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_if_changed(path: Path, data: bytes) -> bool:
    if path.is_file() and path.read_bytes() == data:
        return False
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return True


def jsonl(items: list[dict]) -> bytes:
    return "".join(json.dumps(item, sort_keys=True, ensure_ascii=False) + "\n" for item in items).encode("utf-8")


def build(data: Path, out: Path, seed: int = 1234) -> dict:
    """Build both tasks; returns the manifest."""
    docs, sources = load_docs(data)
    cloze_rng, choice_rng = random.Random(f"{seed}:cloze"), random.Random(f"{seed}:choice")
    cloze = build_cloze(docs, cloze_rng)
    choice = build_choice(docs, choice_rng)
    # Mixed order, so that lm_eval's --limit N (the first N documents) samples every source.
    cloze_rng.shuffle(cloze)
    choice_rng.shuffle(choice)
    out.mkdir(parents=True, exist_ok=True)
    blobs = {CLOZE_FILE: jsonl(cloze), CHOICE_FILE: jsonl(choice)}
    changed = [name for name, blob in blobs.items() if write_if_changed(out / name, blob)]

    def counts(items):
        by: dict[str, int] = {}
        for item in items:
            by[item["source"]] = by.get(item["source"], 0) + 1
        return {"items": len(items), "by_source": dict(sorted(by.items()))}

    manifest = {
        "version": VERSION,
        "seed": seed,
        "builder": "scripts/build_eval_tasks.py",
        "tasks": {
            "athanor_cloze": {"file": CLOZE_FILE, **counts(cloze),
                              "sha256": hashlib.sha256(blobs[CLOZE_FILE]).hexdigest(),
                              "passage_words": list(CLOZE_WORDS)},
            "athanor_choice": {"file": CHOICE_FILE, **counts(choice),
                               "sha256": hashlib.sha256(blobs[CHOICE_FILE]).hexdigest(),
                               "context_words": list(CONTEXT_WORDS), "ending_words": list(ENDING_WORDS)},
        },
        "sources": sources,
    }
    if write_if_changed(out / MANIFEST_FILE, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()):
        changed.append(MANIFEST_FILE)
    manifest["changed"] = changed
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("data"), help="the folder scripts/fetch_data.py filled")
    ap.add_argument("--out", type=Path, default=None, help="where the task files go (default: DATA/eval)")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)
    missing = [f for f in [NEWS, *(b[0] for b in BOOKS.values())] if not (args.data / "quality/high" / f).is_file()]
    if missing:
        print(f"missing {', '.join(missing)} in {args.data / 'quality/high'}: run scripts/fetch_data.py first",
              file=sys.stderr)
        return 2
    out = args.out or args.data / "eval"
    manifest = build(args.data, out, args.seed)
    for task, info in manifest["tasks"].items():
        print(f"{task}: {info['items']} items {info['by_source']} -> {out / info['file']}")
    print("unchanged" if not manifest["changed"] else f"wrote {', '.join(manifest['changed'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
