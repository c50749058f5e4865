"""URL block list (DataTrove's, from scripts/fetch_data.py): adult/spam domains and URLs, banned words in URLs.

4.5 M domains as Python strings would take ~400 MB per actor; they are held instead as a sorted array of 64-bit
FNV-1a hashes (36 MB, looked up with one `searchsorted` per batch; a false match needs a 64-bit collision, odds
about 4.5e6 / 2**64 per lookup). A host is blocked when it or any parent domain is listed, which covers DataTrove's
registered-domain and full-host checks. Listed URLs carry no scheme, so URLs are compared as host + path.
Rows without a URL pass. Signal: `url_block_rule` (domain, url, banned_word, soft_banned_words, banned_subword);
drop reason `url_blocked`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa

from athanor.config import UrlFilterConfig
from athanor.pipelines.stats import mark

NON_ALNUM = re.compile(r"[^a-z0-9]+")
DROP_REASONS = ("url_blocked",)


FNV_OFFSET, FNV_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)


def fnv1a_lines(buf: np.ndarray) -> np.ndarray:
    """64-bit FNV-1a hash of every non-empty newline-separated line of a uint8 buffer, vectorized over lines.

    Lines are sorted by length so step j touches only the lines longer than j: the work is one multiply per byte
    and no Python object is made per line (4.5 M str objects would cost ~300 MB that the allocator keeps).
    """
    ends = np.flatnonzero(buf == ord("\n"))
    if not len(buf) or buf[-1] != ord("\n"):
        ends = np.append(ends, len(buf))
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts
    order = np.argsort(-lengths, kind="stable")
    starts, lengths = starts[order], lengths[order]
    count = int(np.count_nonzero(lengths))
    starts, lengths = starts[:count], lengths[:count]
    hashes = np.full(count, FNV_OFFSET, dtype=np.uint64)
    index, byte = np.empty(count, dtype=np.int64), np.empty(count, dtype=np.uint8)  # reused: no temporaries
    longer_than = count - np.searchsorted(lengths[::-1], np.arange(lengths.max(initial=0)), side="right")
    for j, k in enumerate(longer_than):
        np.add(starts[:k], j, out=index[:k])
        np.take(buf, index[:k], out=byte[:k])
        np.bitwise_xor(hashes[:k], byte[:k], out=hashes[:k])
        np.multiply(hashes[:k], FNV_PRIME, out=hashes[:k])
    return hashes


def fnv1a(texts: list[str]) -> np.ndarray:
    """The same hash for a list of (non-empty, newline-free) strings, in order."""
    if not texts:
        return np.empty(0, dtype=np.uint64)
    encoded = [t.encode() for t in texts]
    buf = np.frombuffer(b"\n".join(encoded) + b"\n", dtype=np.uint8)
    lengths = np.array([len(e) for e in encoded])
    hashed = fnv1a_lines(buf)  # sorted by length, longest first (stable): put back in input order
    order = np.argsort(-lengths, kind="stable")
    out = np.empty(len(texts), dtype=np.uint64)
    out[order] = hashed
    return out


def load_domain_hashes(path: Path) -> np.ndarray:
    """Sorted hashes of the listed domains (one per line), sorted in place: np.unique's temporaries would stay
    in the allocator's heap (~140 MB more resident per process). Hashing 4.5 M lines takes ~2 s, paid by every
    worker process that filters, so the sorted array is kept beside the list (`.domains.<size>-<mtime>.npy`, written
    under a temporary name and renamed) and loaded from there while the list is unchanged; a read-only folder
    just means hashing each time."""
    stat = path.stat()
    cache = path.with_name(f".{path.name}.{stat.st_size}-{stat.st_mtime_ns}.fnv1a64.npy")
    if cache.is_file():
        return np.load(cache)
    hashes = fnv1a_lines(np.fromfile(path, dtype=np.uint8))
    hashes.sort()
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            np.save(f, hashes)
        os.replace(tmp, cache)
    except OSError:
        tmp.unlink(missing_ok=True)
    return hashes


def _normalize_url(url: str) -> str:
    """host + path (+ query), lowercased host, no scheme or trailing slash: the form the block list uses."""
    try:
        parts = urlsplit(url if "://" in url else f"http://{url}")
    except ValueError:  # e.g. an invalid IPv6 literal: compared as it is
        return url
    tail = parts.path + (f"?{parts.query}" if parts.query else "")
    return f"{(parts.hostname or '')}{tail}".rstrip("/")


def _parent_domains(host: str) -> list[str]:
    labels = host.split(".")
    return [d for d in (".".join(labels[i:]) for i in range(len(labels) - 1)) if d and "\n" not in d]


def _words(path: Path) -> set[str]:
    return {NON_ALNUM.sub("", w.lower()) for w in path.read_text().splitlines() if w.strip() and w[0] != "#"}


class UrlBlocklist:
    """The loaded lists; `rule(url)` names the first rule a URL breaks, or None."""

    def __init__(self, cfg: UrlFilterConfig):
        root = Path(cfg.blocklist_dir)
        if not (root / "domains").exists():
            raise FileNotFoundError(f"curate.url_filter.blocklist_dir: {root}/domains is missing "
                                    "(run scripts/fetch_data.py)")
        self.domains = load_domain_hashes(root / "domains")
        self.urls = {_normalize_url(u.strip()) for u in (root / "urls").read_text().splitlines() if u.strip()}
        self.banned_words = _words(root / "banned_words.txt")
        self.soft_banned_words = _words(root / "soft_banned_words.txt")
        subwords = sorted(_words(root / "banned_subwords.txt"), key=len, reverse=True)
        self.banned_subwords = re.compile("|".join(map(re.escape, subwords))) if subwords else None
        self.soft_word_threshold = cfg.soft_word_threshold

    def domain_listed(self, hosts: list[str]) -> np.ndarray:
        """For each host, whether it or a parent domain is listed: one searchsorted for the whole batch."""
        owner, domains = [], []
        for i, host in enumerate(hosts):
            for domain in _parent_domains(host):
                owner.append(i)
                domains.append(domain)
        listed = np.zeros(len(hosts), dtype=bool)
        if domains and len(self.domains):
            hashes = fnv1a(domains)
            pos = np.minimum(np.searchsorted(self.domains, hashes), len(self.domains) - 1)
            listed[np.array(owner)[self.domains[pos] == hashes]] = True
        return listed

    def rule(self, url: str, domain_listed: bool) -> str | None:
        if domain_listed:
            return "domain"
        lower = url.lower()
        if _normalize_url(url) in self.urls:
            return "url"
        words = set(NON_ALNUM.split(lower))
        if words & self.banned_words:
            return "banned_word"
        if len(words & self.soft_banned_words) >= self.soft_word_threshold:
            return "soft_banned_words"
        if self.banned_subwords and self.banned_subwords.search(NON_ALNUM.sub("", lower)):
            return "banned_subword"
        return None


def _host(url: str) -> str:
    try:
        return urlsplit(url if "://" in url else f"http://{url}").hostname or ""
    except ValueError:  # e.g. an invalid IPv6 literal
        return ""


class UrlFilter:
    """Ray Data class UDF: the lists load once per actor, then every batch is checked against them."""

    def __init__(self, cfg: UrlFilterConfig):
        self.blocklist = UrlBlocklist(cfg)

    def __call__(self, batch: pa.Table) -> pa.Table:
        urls = batch["url"].to_pylist() if "url" in batch.column_names else [None] * batch.num_rows
        listed = self.blocklist.domain_listed([_host(u) if u else "" for u in urls])
        rules = [self.blocklist.rule(u, hit) if u else None for u, hit in zip(urls, listed)]
        out = batch.append_column("url_block_rule", pa.array(rules, type=pa.string()))
        return mark(out, ["url_blocked" if r else None for r in rules])
