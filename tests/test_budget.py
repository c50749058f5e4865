"""The budget per page (pipelines/budget.py, sandbox.py): real text in hostile structures becomes a named drop in
bounded time, the other pages of its batch keep the text they get without a budget, and the worker goes on."""

from __future__ import annotations

import html as htmllib
import time

import pyarrow as pa
import pytest
from resiliparse.parse.html import HTMLTree

from athanor.config import CurateConfig, ExtractConfig
from athanor.pipelines import budget, filters, sandbox
from athanor.pipelines.extract import extract_batch, html_to_text
from athanor.pipelines.stats import REASON

BOUND_S = 10.0  # wall time allowed to drop one hostile page
UNBOUNDED = ExtractConfig(max_depth=10**9, max_nodes=10**9, max_attribute_chars=10**9, max_scripts=10**9,
                          max_text_chars=10**9, timeout_s=None)  # the extraction as it was before the budget


@pytest.fixture(scope="module")
def paragraphs(data_dir) -> list[str]:
    """Paragraphs of the Python tutorial (real text), HTML-escaped for re-embedding."""
    out = []
    for name in ("controlflow", "datastructures", "classes"):
        tree = HTMLTree.parse((data_dir / "pydoc" / "html" / "tutorial" / f"{name}.html").read_text())
        out += [htmllib.escape(p.text) for p in tree.body.query_selector_all("p") if len(p.text) > 150]
    assert len(out) > 40
    return out


@pytest.fixture(scope="module")
def normal(data_dir) -> list[bytes]:
    """Three real news pages."""
    return [p.read_bytes() for p in sorted((data_dir / "html" / "news").glob("*.html"))[:3]]


def page(body: str, head: str = "") -> bytes:
    return f"<!doctype html><html><head><title>Tutorial</title>{head}</head><body>{body}</body></html>".encode()


def article(paragraphs: list[str]) -> str:
    return "<article>" + "".join(f"<p>{p}</p>" for p in paragraphs[:12]) + "</article>"


@pytest.fixture(scope="module")
def hostile(paragraphs) -> dict[str, bytes]:
    """Real text in the structures of the issue, each with the drop it must become."""
    words = " ".join(paragraphs).split()
    siblings = "".join(f"<span>{words[i % len(words)]}</span> " for i in range(100_000))
    blob = htmllib.escape(" ".join(paragraphs) * 200, quote=True)  # several MB in one attribute
    scripts = "".join(f"<script>var note = {paragraphs[i % len(paragraphs)]!r};</script>" for i in range(3000))
    return {
        "too_deep": page("<div>" * 200_000 + article(paragraphs)),  # unclosed <div>s: 1.2 MB
        "too_many_nodes": page(article(paragraphs) + f"<div>{siblings}</div>"),
        "attribute_too_long": page(f'<div data-state="{blob}">{article(paragraphs)}</div>'),
        "too_many_scripts": page(article(paragraphs), head=scripts),
    }


def test_hostile_pages_are_named_drops_in_bounded_time(hostile):
    assert len(hostile["attribute_too_long"]) > 3 * 2**20
    for reason, html in hostile.items():
        start = time.perf_counter()
        assert html_to_text(html, ExtractConfig()) == (None, reason)
        assert time.perf_counter() - start < BOUND_S, reason


def test_shape_of_real_pages_is_within_the_defaults(data_dir):
    """The defaults drop no real page: the sampled news pages and Python docs stay far below every bound."""
    cfg = ExtractConfig()
    pages = sorted((data_dir / "html" / "news").glob("*.html"))[::4] + [data_dir / "pydoc" / "html" / "contents.html"]
    for path in pages:
        html = path.read_bytes()
        s = budget.shape(html)
        assert budget.over_budget(html, cfg) is None, path.name
        assert max(s.depth, budget.stack_depth(html, s.tags)) < cfg.max_depth // 4
        assert s.nodes < cfg.max_nodes and s.longest_tag < cfg.max_attribute_chars and s.scripts < cfg.max_scripts


def test_depth_follows_the_html_rules_that_matter():
    def depths(markup: str) -> tuple[int, int]:
        s = budget.shape(markup.encode())
        return s.depth, budget.stack_depth(markup.encode(), s.tags)

    assert depths("<div>" * 50) == (50, 50)
    assert depths("<div></div>" * 50) == (1, 1)
    assert depths("<p>a" * 50)[1] == 1  # implied </p>: the walk over-counts, the stack does not
    assert depths("<ul><li>" * 50)[1] == 100  # a nested list stays nested
    assert depths("<div/>" * 50) == (50, 50)  # HTML ignores '/>' outside <svg>: these <div>s nest
    assert depths("<br><img src=x>" * 50) == (0, 0)
    assert depths("<script>" + "<div>" * 50 + "</script><!--" + "<div>" * 50 + "-->") == (1, 1)
    assert budget.shape(b"<script>" * 10).scripts == 1  # the first one's raw text runs to the end
    assert budget.shape(b'<a href="' + b"x" * 100 + b'">').longest_tag == 111


def test_sandbox_times_out_and_the_batch_goes_on(hostile, normal):
    """Without the work budget the deep page reaches the extractor (over a minute of lexbor's parse): the child
    is killed at the timeout, the page becomes `extract_timeout`, and a fresh child takes the rest of the batch."""
    cfg = UNBOUNDED.model_copy(update={"timeout_s": 0.5})
    box = sandbox.sandbox(cfg)
    expected = [html_to_text(h, UNBOUNDED) for h in normal]
    start = time.perf_counter()
    got = box.extract([normal[0], hostile["too_deep"], normal[1], normal[2]])
    assert time.perf_counter() - start < BOUND_S
    assert got == [expected[0], (None, "extract_timeout"), expected[1], expected[2]]
    assert box.restarts == 1
    assert box.extract(normal) == expected  # the worker survives: the next batch runs in the new child
    sandbox.close_all()


def _batch(pages: list[bytes]) -> pa.Table:
    return pa.table({"doc_id": [f"d{i}" for i in range(len(pages))], "html": pages})


def test_extract_batch_keeps_the_normal_pages_of_a_hostile_batch(hostile, normal):
    pages = [normal[0], *hostile.values(), normal[1], normal[2]]
    reasons = [None, *hostile, None, None]
    out = extract_batch(_batch(pages), ExtractConfig())
    assert out["doc_id"].to_pylist() == [f"d{i}" for i in range(len(pages))]
    assert out[REASON].to_pylist() == reasons
    kept = [t for t, r in zip(out["text"].to_pylist(), reasons) if r is None]
    assert kept == [html_to_text(h, UNBOUNDED)[0] for h in normal]


def test_text_too_long_bounds_the_filters(normal):
    text, _ = html_to_text(normal[0], UNBOUNDED)
    cfg = ExtractConfig(max_text_chars=len(text) - 1, timeout_s=None)
    assert html_to_text(normal[0], cfg) == (None, "text_too_long")
    rows = pa.table({"doc_id": ["a", "b"], "html": [None, None], "text": [text, text[:100]]})  # rows read as text
    assert extract_batch(rows, cfg)[REASON].to_pylist() == ["text_too_long", None]


def test_budget_settings_and_reasons():
    for bad in ({"max_depth": 0}, {"max_nodes": 0}, {"timeout_s": 0}, {"max_text_chars": 0}):
        with pytest.raises(ValueError):
            ExtractConfig(**bad)
    c = CurateConfig()
    owners = filters.reason_owners(filters.row_stages(c), c)
    for reason in (*budget.DROP_REASONS, "text_too_long", "extract_timeout", "extract_crashed"):
        assert owners[reason] == "extract"


@pytest.mark.slow
def test_through_ray_data(ray_local, hostile, normal, paragraphs):
    """In Ray Data's worker processes: named drops, the timeout's child killed and replaced, rows kept in order."""
    import ray

    cfg = ExtractConfig(max_depth=10**9, timeout_s=0.5)  # a deep page goes to the extractor and times out
    deep = page("<div>" * 60_000 + article(paragraphs))  # under max_nodes: lexbor's parse alone takes seconds
    pages = [normal[0], deep, normal[1], hostile["too_many_nodes"], normal[2], hostile["too_many_scripts"]]
    ds = ray.data.from_arrow(_batch(pages)).map_batches(extract_batch, fn_kwargs={"cfg": cfg},
                                                        batch_format="pyarrow", batch_size=None)
    start = time.perf_counter()
    rows = sorted(ds.take_all(), key=lambda r: int(r["doc_id"][1:]))
    assert time.perf_counter() - start < 60
    assert [r[REASON] for r in rows] == [None, "extract_timeout", None, "too_many_nodes", None, "too_many_scripts"]
    expected = [html_to_text(h, UNBOUNDED)[0] for h in normal]
    assert [rows[i]["text"] for i in (0, 2, 4)] == expected
