"""Main text of a web page: resiliparse's main-content extraction after a fast boilerplate pass over the DOM.

Why: resiliparse's `extract_plain_text(main_content=True)` is fast but keeps a lot of boilerplate on news pages
(video playlists, captions, comment threads, link lists, bylines): on the newspaper4k reference pages its word
precision is about 0.84 against trafilatura's 0.97 at the same recall (bench/bench_extract.py). trafilatura gets
there with an lxml tree and many Python passes, at about a tenth of the speed. This module keeps resiliparse's
single lexbor parse and its C extractor and removes, before extraction, what is boilerplate on sight:

1. elements that are boilerplate by their tag or ARIA role (nav, aside, footer, figure and captions, forms,
   buttons, iframes, dialogs; role=navigation/complementary/contentinfo; aria-hidden);
2. elements whose class or id names a boilerplate part (comments, share/social, recommended, promo, sidebar,
   breadcrumbs, newsletter, ads, cookie banners, video playlists...), matched as whole name parts ("comment-list"
   yes, "uncommented" no); weaker names (related, menu, caption, byline, date, tags...) only on short or link-dense
   elements, since documentation uses them for content ("Related work", "Date objects");
3. lists (ul, ol, dl, menu) that are mostly link text: navigation and "read more" lists.

A removal never takes an element holding more than `MAX_SHARE` of the page's text: a wrapper whose class happens
to say "sidebar-layout" or "has-comments" must not take the article with it. Then resiliparse extracts with
comments, post meta and alt texts off, and a last line pass drops short lines that carry no sentence (times,
"Now playing", "Video Ad Feedback") while keeping headings that precede text and code lines (symbols,
indentation: the examples of documentation pages).

Selectors and names come from the common vocabulary of CMS templates (WordPress, Drupal, news CMSes) and from
trafilatura's and readability's boilerplate lists, not from the evaluation pages.
"""

from __future__ import annotations

# NodeList.values() turns a query result into a list at once: indexing the NodeList re-walks it per item.

import re

from resiliparse.extract.html2text import extract_plain_text
from resiliparse.parse.html import HTMLTree

MAX_SHARE = 0.4  # never remove an element holding more than this share of the page's text
MAX_LINK_SHARE = 0.5  # a list whose link text is more than this share of its text is navigation
WEAK_MAX_CHARS = 200  # a weak-name element shorter than this is a byline, date, caption or tag line
WEAK_LINK_SHARE = 0.3  # ... and one with more link text than this share is a link box

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
# Lexbor does the substring search in C; Python then checks that the match is a whole name part.
_NAME_SELECTOR = ", ".join(f"[class*={n}], [id*={n}]" for n in sorted(set(_STRONG + _WEAK)) if len(n) > 2) + \
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


def _link_share(node, chars: int) -> float:
    return sum(len(a.text.strip()) for a in node.query_selector_all("a").values()) / chars if chars else 1.0


def _remove(node, page_chars: int) -> None:
    if node.tag in ("html", "body", "main", "article"):
        return
    if page_chars and len(node.text) > MAX_SHARE * page_chars:
        return
    node.decompose()


def prune(tree: HTMLTree) -> None:
    """Removes boilerplate elements from the tree in place (see the module docstring)."""
    body = tree.body
    if body is None:
        return
    for node in body.query_selector_all("script, style, noscript, template").values():
        node.decompose()  # not text; left in, they would count in the page's text below
    page_chars = len(body.text)
    for node in body.query_selector_all(_TAG_SELECTOR).values():
        _remove(node, page_chars)
    for node in body.query_selector_all(_NAME_SELECTOR).values():
        kind = _name_kind(node)
        if kind == 1:
            chars = len(node.text.strip())
            kind = 2 if chars < WEAK_MAX_CHARS or _link_share(node, chars) > WEAK_LINK_SHARE else 0
        if kind == 2:
            _remove(node, page_chars)
    for node in body.query_selector_all("ul, ol, dl, menu").values():
        chars = len(node.text.strip())
        if chars and _link_share(node, chars) > MAX_LINK_SHARE:
            _remove(node, page_chars)


def _keep_line(line: str, next_line: str) -> bool:
    """Short lines without a sentence are kept only as headings (a long line follows) or as code."""
    words = line.split()
    if len(words) >= 6 or _SENTENCE_END.search(line) or _CODE.search(line):
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
    kept = [line for line, nxt in zip(lines, following) if not line.strip() or _keep_line(line.strip(), nxt)]
    # resiliparse separates paragraphs with blank lines (the Gopher paragraph rules read them): keep one per gap
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip()
    # A page that is all link lists (a table of contents) prunes to nothing: then it keeps resiliparse's own text
    return text or extract_plain_text(html, main_content=True).strip()
