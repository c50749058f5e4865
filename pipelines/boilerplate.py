"""Main text of a web page: resiliparse's main-content extraction after a fast boilerplate pass over the DOM.

Why: resiliparse's `extract_plain_text(main_content=True)` is fast but keeps a lot of boilerplate on news pages
(video playlists, captions, comment threads, link lists, bylines, teaser columns, cookie and comment-policy notes):
on the newspaper4k reference pages its word precision is about 0.84 against trafilatura's 0.97 at the same recall
(bench/bench_extract.py). trafilatura gets there with an lxml tree and many Python passes, at a fifth to a tenth of
the speed. This module keeps resiliparse's single lexbor parse and its C extractor and removes, before extraction:

1. Around the main container (readability's idea, kept cheap). The paragraph text (<p>, <pre>) is summed up the
   tree; the main container is the deepest element holding `MAIN_SHARE` of it. The blocks beside the way from
   <body> down to it (siblings of the container and of each of its ancestors) are removed when they are not text:
   less than `OUTSIDE_PARAGRAPH_SHARE` of their own text in paragraphs (teaser cards, navigation, headers, link
   columns: text in <div>s and <a>s) and smaller than the container or link-dense (a large paragraph-less block
   that is not link-dense is kept: some sites set the whole article in <div>s); and whatever their paragraphs,
   when shorter than `OUTSIDE_MIN_CHARS` (a cookie or browser notice, a comment policy, a copyright line beside the
   article). Text elements themselves (p, headings, dt, li, tables...) are never removed this way, so a
   documentation page keeps its intro paragraphs, signatures and sections beside its longest section. A page with
   less than `MIN_PARAGRAPH_CHARS` of paragraph text has no container to go by and skips this step.
2. Within the main container and the blocks kept beside it (the rest is gone, so the work below shrinks with it):
   a. elements that are boilerplate by their tag or ARIA role (nav, aside, footer, figure and captions, forms,
      buttons, iframes, dialogs; role=navigation/complementary/contentinfo; aria-hidden);
   b. elements whose class or id names a boilerplate part (comments, share/social, recommended, promo, sidebar,
      breadcrumbs, newsletter, ads, cookie banners, video playlists...), matched as whole name parts ("comment-list"
      yes, "uncommented" no); weaker names (related, menu, caption, byline, date, tags...) only on short or
      link-dense elements, since documentation uses them for content ("Related work", "Date objects");
   c. lists (ul, ol, dl, menu) that are mostly link text: navigation and "read more" lists.
   None of these takes an element holding more than `MAX_SHARE` of the paragraph text (of the page's text when
   there are no paragraphs): a wrapper whose class happens to say "sidebar-layout" or "has-comments" must not take
   the article with it.
3. resiliparse extracts with comments, post meta and alt texts off, and a line pass drops short lines that carry no
   sentence (times, "Now playing", "Video Ad Feedback", "HIDE CAPTION") while keeping headings that precede text,
   code lines (symbols: the examples of documentation pages) and short lines in a run of `RUN_LINES` or more
   (lists, ingredients, specifications, verses), unless the same line comes `REPEATS` times or more on the page
   (a gallery's caption title under every slide).

Lengths are counted in characters that are not whitespace: template indentation would otherwise swamp them.
Selectors and names come from the common vocabulary of CMS templates (WordPress, Drupal, news CMSes) and from
trafilatura's and readability's boilerplate lists and scoring, not from the evaluation pages; the thresholds are
round numbers, checked on all three kinds of bench/bench_extract.py (news, docs, web) together.
"""

from __future__ import annotations

# NodeList.values() turns a query result into a list at once: indexing the NodeList re-walks it per item.

import re

from resiliparse.extract.html2text import extract_plain_text
from resiliparse.parse.html import HTMLTree

MAX_SHARE = 0.4  # never remove an element holding more than this share of the paragraph (or page) text
MAX_LINK_SHARE = 0.5  # a list whose link text is more than this share of its text is navigation
WEAK_MAX_CHARS = 200  # a weak-name element shorter than this is a byline, date, caption or tag line
WEAK_LINK_SHARE = 0.3  # ... and one with more link text than this share is a link box
MIN_PARAGRAPH_CHARS = 400  # a page with less <p>/<pre> text than this has no main container to go by
MAIN_SHARE = 0.8  # the main container: the deepest element holding this share of the paragraph text
OUTSIDE_PARAGRAPH_SHARE = 0.3  # a block beside it with less paragraph text than this share of its text is no text:
OUTSIDE_LINK_SHARE = 0.3  # ... removed when smaller than the main container, or larger and this link-dense
OUTSIDE_MIN_CHARS = 200  # a block beside it shorter than this is a notice, not a section: removed
RUN_LINES = 3  # short lines in a run of this many non-blank lines are a list, a recipe, a verse: kept
REPEATS = 3  # ... unless the same line comes this often on the page
_TEXT_TAGS = frozenset(("p", "pre", "h2", "h3", "h4", "h5", "h6", "dt", "dd", "li", "table", "blockquote"))

_TAGS = ("h1", "time", "nav", "aside", "footer", "figure", "figcaption", "form", "button", "select", "iframe", "dialog",
         "[role=navigation]", "[role=complementary]", "[role=contentinfo]", "[role=dialog]", "[aria-hidden=true]")
_TAG_SELECTOR = ", ".join(_TAGS)
# Boilerplate names, matched as whole parts of a class or id (split on -, _, space, digits, camelCase). Strong names
# remove on sight; weak ones also name real content ("related work", "date objects", "menus") and remove only short or
# link-dense elements, and only from a class: ids are often heading slugs (Sphinx: id="time-objects").
_STRONG = ("comment", "comments", "share", "sharing", "social", "recommended", "recommendations", "promo", "sidebar",
           "breadcrumb", "breadcrumbs", "newsletter", "subscribe", "subscription", "signup", "advert", "advertisement",
           "ad", "ads", "sponsor", "sponsored", "cookie", "cookies", "consent", "popup", "modal", "playlist",
           "outbrain", "taboola", "disqus", "footer", "navbar", "navigation", "nav", "toolbar", "pagination", "pager",
           "masthead", "skip")
_WEAK = ("related", "menu", "caption", "credit", "credits", "tags", "byline", "author", "timestamp", "dateline", "date",
         "time", "meta", "published", "updated", "video", "trending", "popular", "banner")


def _substrings(names) -> list[str]:
    """The fewest substrings that find every name: "nav" finds "navbar" and "navigation" too."""
    names = [n for n in names if len(n) > 2]
    return sorted(n for n in names if not any(o != n and o in n for o in names))


# Lexbor does the substring search in C and Python then checks that the match is a whole name part. Its cost grows
# with the number of selectors (each is matched against every element): weak names are only looked up in classes,
# and a name that contains another listed name is found by the shorter one.
_NAME_SELECTOR = ", ".join([f"[class*={n}]" for n in _substrings(_STRONG + _WEAK)] +
                           [f"[id*={n}]" for n in _substrings(_STRONG)]) + \
    ", [class|=ad], [id|=ad], [class|=ads], [id|=ads]"
_NAME_PARTS = re.compile(r"[a-z]+|[A-Z][a-z]*")
_STRONG_SET, _WEAK_SET = frozenset(_STRONG), frozenset(_WEAK)
_SENTENCE_END = re.compile(r"[.!?:;…\"'”’»)\]。！？]$")
# Code and markup lines (docs, tutorials): symbols, indentation, dotted names, prompts; page chrome is plain words.
_CODE = re.compile(r"[(){}\[\]=<>_\\*#|@%$`~^&+]|^\s|^\.\.\.|\w[./]\w")


def _name_kind(node) -> int:
    """2: a strong boilerplate name in the class (or an id of at most two parts); 1: a weak one in the class."""
    cls = [p.lower() for p in _NAME_PARTS.findall(node.getattr("class") or "")]
    ids = [p.lower() for p in _NAME_PARTS.findall(node.getattr("id") or "")]
    if any(p in _STRONG_SET for p in cls) or (len(ids) <= 2 and any(p in _STRONG_SET for p in ids)):
        return 2
    return 1 if any(p in _WEAK_SET for p in cls) else 0


def _chars(text: str) -> int:
    """Characters that are not spaces: layout whitespace would otherwise dilute link shares."""
    return len(text) - text.count(" ") - text.count("\n") - text.count("\t")


def _link_share(node, chars: int) -> float:
    return sum(_chars(a.text) for a in node.query_selector_all("a").values()) / chars if chars else 1.0


def _paragraph_chars(body) -> tuple[dict, int]:
    """Characters of paragraph text (<p>, <pre>) under each element that holds some, and on the whole page."""
    per_parent: dict = {}
    total = 0
    for p in body.query_selector_all("p, pre").values():
        n = _chars(p.text)
        if n:
            total += n
            parent = p.parent
            per_parent[parent] = per_parent.get(parent, 0) + n
    score: dict = {}
    for node, n in per_parent.items():  # few distinct parents: most paragraphs are siblings
        while node is not None and node.type == 1:
            score[node] = score.get(node, 0) + n
            if node == body:
                break
            node = node.parent
    return score, total


def _main_container(body, score: dict, total: int) -> tuple:
    """The deepest element holding MAIN_SHARE of the page's paragraph text, and the (element, child on the way)
    pairs from body down to it."""
    need = MAIN_SHARE * total
    node, path = body, []
    while True:
        nxt = next((c for c in node.children.values() if score.get(c, 0) >= need), None)
        if nxt is None:
            return node, path
        path.append((node, nxt))
        node = nxt


def _prune_outside(path: list, main, score: dict) -> list:
    """Removes the blocks beside the way down to the main container that are not text; returns those kept."""
    main_chars = _chars(main.text)
    kept = []
    for parent, on in path:
        for c in parent.children.values():
            if c == on or c.tag in _TEXT_TAGS:
                continue
            chars = _chars(c.text)
            if not chars:
                continue
            if chars < OUTSIDE_MIN_CHARS or score.get(c, 0) < OUTSIDE_PARAGRAPH_SHARE * chars and (
                    chars < main_chars or _link_share(c, chars) > OUTSIDE_LINK_SHARE):
                c.decompose()
            else:
                kept.append(c)
    return kept


def _prune_region(region, too_big) -> None:
    """The tag, name and list rules within one element."""
    for node in region.query_selector_all(_TAG_SELECTOR).values():
        if not too_big(node):
            node.decompose()
    for node in region.query_selector_all(_NAME_SELECTOR).values():
        kind = _name_kind(node)
        if kind == 1:
            chars = _chars(node.text)
            kind = 2 if chars < WEAK_MAX_CHARS or _link_share(node, chars) > WEAK_LINK_SHARE else 0
        if kind == 2 and not too_big(node):
            node.decompose()
    for node in region.query_selector_all("ul, ol, dl, menu").values():
        chars = _chars(node.text)
        if chars and _link_share(node, chars) > MAX_LINK_SHARE and not too_big(node):
            node.decompose()


def prune(tree: HTMLTree) -> None:
    """Removes boilerplate elements from the tree in place (see the module docstring)."""
    body = tree.body
    if body is None:
        return
    for node in body.query_selector_all("script, style, noscript, template").values():
        node.decompose()  # not text
    score, total = _paragraph_chars(body)
    if total >= MIN_PARAGRAPH_CHARS:
        main, path = _main_container(body, score, total)
        regions = [main, *_prune_outside(path, main, score)]
        limit = MAX_SHARE * total

        def too_big(node) -> bool:
            return node.tag in ("main", "article") or score.get(node, 0) > limit
    else:  # no paragraphs to go by: the whole page, guarded by its text
        regions, limit = [body], MAX_SHARE * _chars(body.text)

        def too_big(node) -> bool:
            return node.tag in ("main", "article") or _chars(node.text) > limit
    for region in regions:
        _prune_region(region, too_big)


def _keep_line(line: str, next_line: str) -> bool:
    """A sentence, code, or a heading (a long line follows)."""
    if len(line.split()) >= 6 or _SENTENCE_END.search(line) or _CODE.search(line):
        return True
    return len(next_line.split()) >= 12 and any(c.isalpha() for c in line)


def main_text(html: str) -> str:
    tree = HTMLTree.parse(html)
    prune(tree)
    text = extract_plain_text(tree, main_content=True, comments=False, post_meta=False, alt_texts=False)
    lines = text.splitlines()
    following = [""] * len(lines)  # the next non-empty line after each line
    for i in range(len(lines) - 2, -1, -1):
        following[i] = lines[i + 1] if lines[i + 1].strip() else following[i + 1]
    stripped = [line.strip() for line in lines]
    counts: dict[str, int] = {}
    for line in stripped:
        counts[line] = counts.get(line, 0) + 1
    run = [0] * len(lines)  # the number of non-blank lines in the run each line is in
    i = 0
    while i < len(lines):
        j = i
        while j < len(lines) and stripped[j]:
            j += 1
        run[i:j] = [j - i] * (j - i)
        i = j + 1
    kept = [line for line, st, nxt, r in zip(lines, stripped, following, run)
            if not st or _keep_line(st, nxt)
            or (r >= RUN_LINES and counts[st] < REPEATS and any(c.isalpha() for c in st))]
    # resiliparse separates paragraphs with blank lines (the Gopher paragraph rules read them): keep one per gap
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip()
    # A page that is all link lists (a table of contents) prunes to nothing: then it keeps resiliparse's own text
    return text or extract_plain_text(html, main_content=True).strip()
