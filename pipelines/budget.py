"""A page's shape, measured in linear time on its bytes before extraction, so a hostile page is dropped cheaply.

HTML parsers (lexbor under resiliparse, libxml2 under trafilatura) look for an open <p> "in scope" by walking the
stack of open elements at every tag, so N nested <div>s cost O(N^2): 16,000 levels take 0.2 s to parse and 2.6 s
to extract, 200,000 levels over a minute to parse alone. Browsers bound it too (Blink stops nesting at 512 levels).
Sheer element count costs more than linearly as well (10^6 sibling <br>s: 6 s to extract). So a page is dropped,
in this order, as `too_many_scripts` (more <script> elements than max_scripts), `attribute_too_long` (a start tag
longer than max_attribute_chars: an inlined blob), `too_deep` (open elements nested deeper than max_depth) or
`too_many_nodes` (more elements than max_nodes). The defaults (config.py) sit far above every real page sampled.

`shape` is numpy over the positions of '<' (a Python loop only per comment and raw-text element, each skipped with
one find), so it costs a small share of the extraction (bench/bench_budget.py). Its depth is
that of a walk that goes up at every start tag but void ones (<br>, <img>) and down at every end tag, never below
zero; it over-counts where markup leans on implied end tags (`<p>a<p>b`, unclosed <li>), so a page it finds too
deep is measured again by `stack_depth`, a stack of element names (linear too, run on such pages only) that pops
an end tag up to its open element, ignores stray end tags and applies the commonest implied end tags. Markup built
to under-count (stray end tags between the <div>s) falls to the time budget instead (sandbox.py): this budget is
the cheap, deterministic first line, the timeout the hard bound.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from athanor.config import ExtractConfig

DROP_REASONS = ("too_many_scripts", "attribute_too_long", "too_deep", "too_many_nodes")

VOID = frozenset(b"area base br col embed hr img input keygen link meta param source track wbr frame basefont "
                 b"bgsound".split())
RAW_TEXT = (b"script", b"style", b"textarea", b"title", b"xmp", b"iframe", b"noembed", b"noframes")
_RAW_END = {name: re.compile(b"</" + name, re.IGNORECASE) for name in RAW_TEXT}
WINDOW = 9  # bytes read after each '<': the longest void or raw-text name (8) and the byte that ends it
_LOWER = np.arange(256, dtype=np.uint8)
_LOWER[ord("A"):ord("Z") + 1] += 0x20
_ENDS_NAME = np.zeros(256, bool)
_ENDS_NAME[[ord(c) for c in " \t\n\r\f/>"]] = True
_LETTER = np.zeros(256, bool)
_LETTER[ord("a"):ord("z") + 1] = True


def _code(name: bytes) -> int:
    """A name of up to 8 bytes as one integer: what `_name_codes` gives for it."""
    return int(np.frombuffer(name.ljust(8, b"\0"), np.uint64)[0])


_VOID_CODES = np.array(sorted(_code(v) for v in VOID), np.uint64)
_RAW_CODES = {_code(name): name for name in RAW_TEXT}
_NAME = re.compile(rb"</?[A-Za-z][^\s/<>]*")

_BLOCKS = frozenset(b"address article aside blockquote center details dialog dir div dl fieldset figcaption figure "
                    b"footer form h1 h2 h3 h4 h5 h6 header hgroup hr main menu nav ol p pre section summary table "
                    b"ul".split())
# start tag -> (the open elements it closes, the elements a search for them stops at)
_IMPLIED: dict[bytes, tuple[frozenset, frozenset]] = {
    b"li": (frozenset((b"li",)), frozenset((b"ul", b"ol", b"menu", b"table"))),
    b"dt": (frozenset((b"dt", b"dd")), frozenset((b"dl", b"table"))),
    b"dd": (frozenset((b"dt", b"dd")), frozenset((b"dl", b"table"))),
    b"td": (frozenset((b"td", b"th")), frozenset((b"tr", b"table"))),
    b"th": (frozenset((b"td", b"th")), frozenset((b"tr", b"table"))),
    b"tr": (frozenset((b"tr", b"td", b"th")), frozenset((b"table", b"tbody", b"thead", b"tfoot"))),
    b"option": (frozenset((b"option",)), frozenset((b"select", b"datalist"))),
    b"a": (frozenset((b"a",)), frozenset((b"table", b"td", b"th"))),
}
_P = (frozenset((b"p",)), frozenset(b"applet caption html table td th marquee object template button".split()))
IMPLIED_SEARCH = 8  # levels searched for an implied end tag's element: O(1) per tag, so the pass stays linear


@dataclass(frozen=True)
class Shape:
    depth: int  # the walk's deepest level (an upper estimate: see stack_depth)
    nodes: int  # start tags
    longest_tag: int  # bytes of the longest start tag, '<' to '>'
    scripts: int  # <script> elements
    tags: np.ndarray  # positions of the start and end tags' '<' (comments and raw text left out)


def _name_codes(win: np.ndarray) -> np.ndarray:
    """Each row's name (lowercased bytes after '<', up to the byte that ends it) as one integer; 0 for names over
    8 bytes, which no void or raw-text element has."""
    ends = _ENDS_NAME[win]
    length = np.where(ends.any(axis=1), ends.argmax(axis=1), WINDOW)
    key = np.where(np.arange(8) < length[:, None], win[:, :8], 0).astype(np.uint8)
    return np.where(length <= 8, np.ascontiguousarray(key).view(np.uint64)[:, 0], 0)


def shape(html: bytes) -> Shape:
    """The page's shape in a few linear numpy passes (see the module docstring)."""
    n = len(html)
    a = np.frombuffer(html + bytes(WINDOW + 1), np.uint8)  # zero padded: windows past the end read zeros
    lt = np.flatnonzero(a[:n] == ord("<"))
    win = _LOWER[a[lt[:, None] + np.arange(1, WINDOW + 1)]]
    code = _name_codes(win)
    # comments and raw-text elements, in page order; one inside another's span is skipped, as the parser skips it
    comment = (win[:, 0] == ord("!")) & (win[:, 1] == ord("-")) & (win[:, 2] == ord("-"))
    raw = np.isin(code, list(_RAW_CODES))
    skip_from, skip_to, scripts, covered = [], [], 0, -1
    for i in np.flatnonzero(comment | raw).tolist():
        start = int(lt[i])
        if start < covered:
            continue
        if comment[i]:
            end = html.find(b"-->", start + 4)
            end = n if end < 0 else end + 3
        else:
            name = _RAW_CODES[int(code[i])]
            scripts += name == b"script"
            found = _RAW_END[name].search(html, start + 1)
            end = n if found is None else found.start()  # its end tag stays in, and closes it
        skip_from.append(start)
        skip_to.append(end)
        covered = end
    if skip_from:
        starts, ends = np.array(skip_from), np.array(skip_to)
        k = np.searchsorted(starts, lt, side="right") - 1
        inside = (k >= 0) & (lt > starts[np.maximum(k, 0)]) & (lt < ends[np.maximum(k, 0)])
        inside |= comment  # a comment's own '<'
        lt, win, code = lt[~inside], win[~inside], code[~inside]
    start_tag = _LETTER[win[:, 0]]
    end_tag = (win[:, 0] == ord("/")) & _LETTER[win[:, 1]]
    void = np.isin(code, _VOID_CODES)
    step = np.where(start_tag & ~void, 1, np.where(end_tag, -1, 0))
    total = np.cumsum(step, dtype=np.int64)
    walk = total - np.minimum.accumulate(np.minimum(total, 0)) if len(total) else total  # held at zero
    opens = lt[start_tag]
    gt = np.flatnonzero(a[:n] == ord(">"))
    j = np.searchsorted(gt, opens)
    closes = np.where(j < len(gt), gt[np.minimum(j, len(gt) - 1)] if len(gt) else n, n)
    return Shape(depth=int(walk.max(initial=0)), nodes=int(start_tag.sum()),
                 longest_tag=int((closes - opens + 1).max(initial=0)), scripts=scripts, tags=lt[start_tag | end_tag])


def stack_depth(html: bytes, tags: np.ndarray) -> int:
    """The deepest stack of open element names over the tags at `tags` (see the module docstring); each name is
    pushed and popped at most once, so it is linear too, if slower than `shape`."""
    stack: list[bytes] = []
    opened: dict[bytes, int] = {}  # name -> how many are on the stack
    deepest = 0

    def pop_to(close: frozenset, stop: frozenset) -> None:
        for k in range(len(stack) - 1, max(len(stack) - 1 - IMPLIED_SEARCH, -1), -1):
            if stack[k] in close:
                for name in stack[k:]:
                    opened[name] -= 1
                del stack[k:]
                return
            if stack[k] in stop:
                return

    match = _NAME.match
    for pos in tags.tolist():
        name = match(html, pos).group().lower()
        if name[1] == ord("/"):
            name = name[2:]
            if opened.get(name):
                while True:
                    top = stack.pop()
                    opened[top] -= 1
                    if top == name:
                        break
            continue
        name = name[1:]
        if name in VOID:
            continue
        if name in _BLOCKS and opened.get(b"p"):
            pop_to(*_P)
        implied = _IMPLIED.get(name)
        if implied is not None and any(opened.get(c) for c in implied[0]):
            pop_to(*implied)
        stack.append(name)
        opened[name] = opened.get(name, 0) + 1
        deepest = max(deepest, len(stack))
    return deepest


def over_budget(html: bytes, cfg: ExtractConfig) -> str | None:
    """The drop reason of a page whose shape exceeds the config's work budget, else None."""
    if html.count(b"<") <= min(cfg.max_scripts, cfg.max_nodes, cfg.max_depth) and len(html) <= cfg.max_attribute_chars:
        return None  # too few tags and bytes to exceed any bound
    s = shape(html)
    if s.scripts > cfg.max_scripts:
        return "too_many_scripts"
    if s.longest_tag > cfg.max_attribute_chars:
        return "attribute_too_long"
    if s.depth > cfg.max_depth and stack_depth(html, s.tags) > cfg.max_depth:
        return "too_deep"
    if s.nodes > cfg.max_nodes:
        return "too_many_nodes"
    return None
