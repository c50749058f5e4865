"""The budget per page (pipelines/budget.py, sandbox.py): its cost on real pages, and the time to drop hostile ones.

On the real pages (data/html/news, data/pydoc/html) it extracts every page three ways, in rounds over the same
pages so that a busy machine weighs on each alike: in process without any budget (as before), in process with the
work budget (budget.py's linear shape pass first), and in the sandbox (work budget + timeout: a child process fed
CHUNK_DOCS pages per round trip). It prints the seconds per page of each, the overhead of the budget and of the
sandbox per page, and the slowest real pages (what the default timeout must clear). Then it times each hostile
page of the issue (real text in 200,000 nested <div>s, 10^5 sibling elements, a multi-MB attribute, thousands of
<script>s) to its drop, and a deep page without the work budget to `extract_timeout` in the sandbox.

    python bench/bench_budget.py [--data data] [--rounds 3] [--limit N]
"""

from __future__ import annotations

import argparse
import html as htmllib
import time
from pathlib import Path

from resiliparse.parse.html import HTMLTree

from athanor.config import ExtractConfig
from athanor.pipelines import budget, sandbox
from athanor.pipelines.extract import html_to_text

UNBOUNDED = dict(max_depth=10**9, max_nodes=10**9, max_attribute_chars=10**9, max_scripts=10**9,
                 max_text_chars=10**9)


def hostile_pages(data: Path) -> dict[str, bytes]:
    """The issue's hostile structures around real paragraphs of the Python tutorial (as tests/test_budget.py)."""
    tree = HTMLTree.parse((data / "pydoc" / "html" / "tutorial" / "controlflow.html").read_text())
    paras = [htmllib.escape(p.text) for p in tree.body.query_selector_all("p") if len(p.text) > 150]
    art = "<article>" + "".join(f"<p>{p}</p>" for p in paras[:12]) + "</article>"
    words = " ".join(paras).split()

    def page(body: str, head: str = "") -> bytes:
        return f"<!doctype html><html><head><title>T</title>{head}</head><body>{body}</body></html>".encode()

    return {
        "200,000 nested <div>s": page("<div>" * 200_000 + art),
        "10^5 sibling <span>s": page(art + "".join(f"<span>{words[i % len(words)]}</span> " for i in range(100_000))),
        "5 MB attribute": page(f'<div data-state="{"x" * 5_000_000}">{art}</div>'),
        "3,000 <script>s": page(art, head="".join(f"<script>var s = {paras[i % len(paras)]!r};</script>"
                                                  for i in range(3000))),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("data"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()
    news, docs = args.data / "html" / "news", args.data / "pydoc" / "html"
    paths = (sorted(news.glob("*.html")) + sorted(docs.rglob("*.html")))[: args.limit]
    pages = [p.read_bytes() for p in paths]
    print(f"{len(pages)} real pages, {sum(map(len, pages)) / 2**20:.1f} MiB; extractor {ExtractConfig().extractor}")

    plain = ExtractConfig(**UNBOUNDED, timeout_s=None)
    worked = ExtractConfig(timeout_s=None)
    boxed = ExtractConfig()
    box = sandbox.sandbox(boxed)
    box.extract(pages[:1])  # started and warm
    best = {"no budget": float("inf"), "work budget": float("inf"), "sandbox": float("inf")}
    per_page = [float("inf")] * len(pages)
    for _ in range(args.rounds):
        t = time.perf_counter()
        for i, p in enumerate(pages):
            t1 = time.perf_counter()
            html_to_text(p, plain)
            per_page[i] = min(per_page[i], time.perf_counter() - t1)
        best["no budget"] = min(best["no budget"], time.perf_counter() - t)
        t = time.perf_counter()
        for p in pages:
            html_to_text(p, worked)
        best["work budget"] = min(best["work budget"], time.perf_counter() - t)
        t = time.perf_counter()
        out = box.extract(pages)
        best["sandbox"] = min(best["sandbox"], time.perf_counter() - t)
    assert [r for _, r in out] == [html_to_text(p, worked)[1] for p in pages]
    base = best["no budget"] / len(pages)
    print(f"\nbest of {args.rounds} rounds, seconds per page:")
    for name, total in best.items():
        per = total / len(pages)
        print(f"  {name:12s} {per * 1e3:7.3f} ms/page   overhead {1e3 * (per - base):+.3f} ms/page "
              f"({100 * (per / base - 1):+.1f}%)")
    t = time.perf_counter()
    for p in pages:
        budget.over_budget(p, worked)
    print(f"  the shape pass alone: {1e3 * (time.perf_counter() - t) / len(pages):.3f} ms/page")
    print("\nslowest real pages without a budget (best of the rounds):")
    for s, path in sorted(zip(per_page, paths), reverse=True)[:5]:
        print(f"  {s * 1e3:7.1f} ms  {path.relative_to(args.data)}  ({path.stat().st_size / 2**20:.1f} MiB)")

    print("\nhostile pages, default config (in process; the shape pass drops them before extraction):")
    for name, html in hostile_pages(args.data).items():
        t = time.perf_counter()
        _, reason = html_to_text(html, worked)
        print(f"  {name:24s} {len(html) / 2**20:5.1f} MiB  -> {reason:20s} in {time.perf_counter() - t:6.2f} s")
    deep = hostile_pages(args.data)["200,000 nested <div>s"]
    nobudget = ExtractConfig(**UNBOUNDED)
    t = time.perf_counter()
    got = sandbox.sandbox(nobudget).extract([pages[0], deep, pages[1]])
    print(f"  {'200,000 nested, no work budget':24s}            -> {got[1][1]:20s} in {time.perf_counter() - t:6.2f} s "
          f"(sandbox, {nobudget.timeout_s} s a MiB, with the pages around it and the restart)")
    sandbox.close_all()


if __name__ == "__main__":
    main()
