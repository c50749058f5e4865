"""HTML bytes -> main text, decoding with encoding detection.

The default ("athanor") is resiliparse's main-content extraction after a boilerplate pass over its DOM
(pipelines/boilerplate.py): on news pages it keeps far less navigation, captions and comments than resiliparse
alone, at several times trafilatura's speed (bench/bench_extract.py). "resiliparse" and "trafilatura" stay
selectable. trafilatura is settled as DataTrove runs it for FineWeb (favor precision,
no comments, deduplicated).

Drops: `binary_content` (NUL bytes: an image or archive served as HTML), `undecodable`, `html_parse_error`,
`empty_text` (nothing left after boilerplate removal); a budget per page: budget.py's work drops before extraction
(`too_deep`, `too_many_nodes`, ...), `extract_timeout` and `extract_crashed` from the sandbox (sandbox.py), and
`text_too_long` (more than max_text_chars, from a page or a text row), which bounds the work of every filter after.
"""

from __future__ import annotations

import pyarrow as pa
from lxml.etree import LxmlError
from resiliparse.extract.html2text import extract_plain_text
from resiliparse.parse.encoding import bytes_to_str, detect_encoding
from resiliparse.parse.html import HTMLParserException

from athanor.config import ExtractConfig
from athanor.pipelines import boilerplate, budget, sandbox

BINARY_SNIFF_BYTES = 4096
DROP_REASONS = ("binary_content", "undecodable", "html_parse_error", "empty_text", *budget.DROP_REASONS,
                "text_too_long", "extract_timeout", "extract_crashed")


def _main_text(html: str, cfg: ExtractConfig) -> str:
    if cfg.extractor == "athanor" and cfg.main_content:
        return boilerplate.main_text(html).strip()
    if cfg.extractor in ("athanor", "resiliparse"):
        return extract_plain_text(html, main_content=cfg.main_content).strip()
    import trafilatura  # imported on use: it pulls in lxml, dateparser and more that the default path never needs

    if not cfg.main_content:
        return trafilatura.html2txt(html).strip()
    return (trafilatura.extract(html, favor_precision=True, include_comments=False, deduplicate=True) or "").strip()


def html_to_text(html: bytes, cfg: ExtractConfig) -> tuple[str | None, str | None]:
    """(text, None) or (None, drop_reason), in this process: extract_batch runs it in the sandbox."""
    if b"\x00" in html[:BINARY_SNIFF_BYTES]:
        return None, "binary_content"
    over = budget.over_budget(html, cfg)
    if over is not None:
        return None, over
    try:
        decoded = bytes_to_str(html, detect_encoding(html))
    except (UnicodeError, LookupError):
        return None, "undecodable"
    try:
        text = _main_text(decoded, cfg)
    except (HTMLParserException, ValueError, LxmlError):
        return None, "html_parse_error"
    if len(text) < cfg.min_chars:
        return None, "empty_text"
    if len(text) > cfg.max_text_chars:
        return None, "text_too_long"
    return text, None


def extract_batch(batch: pa.Table, cfg: ExtractConfig) -> pa.Table:
    """Ray Data UDF: replaces the `html` column with `text`; rows read as text (JSONL, Parquet) keep it unchanged."""
    from athanor.pipelines.stats import mark  # here, not above: the sandbox's process imports this module without Ray

    given = batch["text"].to_pylist() if "text" in batch.column_names else [None] * batch.num_rows
    pages = [h for h, t in zip(batch["html"].to_pylist(), given) if t is None]
    if cfg.timeout_s is None:
        extracted = iter([html_to_text(h, cfg) for h in pages])
    else:
        extracted = iter(sandbox.sandbox(cfg).extract(pages))
    results = [next(extracted) if t is None else (None, "text_too_long") if len(t) > cfg.max_text_chars else (t, None)
               for t in given]
    out = batch.drop_columns([c for c in ("html", "text") if c in batch.column_names])
    out = out.append_column("text", pa.array([t for t, _ in results], type=pa.string()))
    return mark(out, [r for _, r in results])
