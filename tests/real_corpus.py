"""Builds a `curated/final` Parquet folder from the real sample data, as the curation stage would leave it."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from resiliparse.extract.html2text import extract_plain_text
from resiliparse.parse.encoding import bytes_to_str


@functools.cache
def real_documents(data_dir: Path) -> list[tuple[str, str]]:
    """(source, text) for the 258 real news pages (main content) and the 300 Lee background news articles."""
    docs = []
    for page in sorted((data_dir / "html" / "news").glob("*.html")):
        text = extract_plain_text(bytes_to_str(page.read_bytes()), main_content=True).strip()
        if text:
            docs.append(("news_html", text))
    for line in (data_dir / "quality" / "high" / "lee_background.txt").read_text().splitlines():
        if line.strip():
            docs.append(("lee_background", line.strip()))
    return docs


def write_curated(folder: Path, docs: list[tuple[str, str]], files: int = 2) -> Path:
    """Unique documents with doc_id = sha256(text), spread over `files` Parquet files (plus a column to ignore)."""
    unique = {hashlib.sha256(text.encode()).hexdigest(): (source, text) for source, text in docs}
    rows = sorted(unique.items())
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(files):
        part = rows[k::files]
        table = pa.table(
            {
                "doc_id": [doc_id for doc_id, _ in part],
                "text": [text for _, (_, text) in part],
                "source": [source for _, (source, _) in part],
            }
        )
        pq.write_table(table, folder / f"part-{k:03d}.parquet")
    return folder


PACK_CONFIG = {
    "run": {"seed": 11},
    "tokenize": {"vocab_size": 800, "sample_docs": 400, "seq_len": 64, "shard_sequences": 500, "val_fraction": 0.1},
}


@functools.cache
def packed_run(root: Path, data_dir: Path) -> Path:
    """A workdir with the real corpus curated, a trained tokenizer and packed shards; built once per session."""
    from athanor.config import AthanorConfig
    from athanor.layout import RunLayout
    from athanor.pipelines.pack import pack_shards
    from athanor.pipelines.tokenizer import train_tokenizer

    cfg = AthanorConfig.model_validate(PACK_CONFIG)
    layout = RunLayout.from_workdir(root / "packed")
    write_curated(layout.curated("final"), real_documents(data_dir))
    train_tokenizer(cfg, layout)
    pack_shards(cfg, layout)
    return layout.root
