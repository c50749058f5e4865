"""Exact and MinHash near-dedup: signatures equal datasketch's, real look-alikes are found, survivors are stable."""

from __future__ import annotations

import hashlib
import json
import math
import random

import numpy as np
import pyarrow as pa
import pytest
import ray
from datasketch import MinHash
from ray.data.context import ShuffleStrategy

from athanor.config import CurateConfig, DedupConfig, ExtractConfig
from athanor.layout import RunLayout
from athanor.pipelines import dedup, minhash
from athanor.pipelines.dedup import mark_exact_duplicates, normalize_texts
from athanor.pipelines.extract import html_to_text
from athanor.pipelines.minhash import (
    EDGE_SCHEMA,
    JOIN_IS_ROOT,
    JOIN_PART,
    MinHasher,
    candidate_pairs,
    connected_components,
    duplicate_roots,
    join_near_duplicates,
    mark_near_duplicates,
    mark_near_duplicates_stage,
    near_duplicates_in_process,
    sha1_hash32,
    shingle_spans,
    star_components,
    word_shingles,
)

# Two real Hindustan Times pages of the same day: one story, re-reported an hour later under a new headline.
HT_ORIGINAL = "464ce5c0838f041dd0d9137eadf95a403232aae2e1eceee9069fc5f292303efe.html"
HT_UPDATE = "17ca85324662023ba21666b3ca5d5d37a92b2806bf7a88b906c28b90a635f82a.html"


@pytest.fixture(scope="module")
def page_texts(data_dir) -> dict[str, str]:
    names = sorted(p.name for p in (data_dir / "html" / "news").iterdir())[:30] + [HT_ORIGINAL, HT_UPDATE]
    texts = {n: html_to_text((data_dir / "html" / "news" / n).read_bytes(), ExtractConfig())[0] for n in names}
    return {n: t for n, t in texts.items() if t}


@pytest.fixture(scope="module")
def all_page_texts(data_dir) -> dict[str, str]:
    """Every news page with main text, keyed by file name (the 258 pages hold same-site look-alikes)."""
    texts = {p.name: html_to_text(p.read_bytes(), ExtractConfig())[0] for p in (data_dir / "html" / "news").iterdir()}
    return {n: t for n, t in sorted(texts.items()) if t}


def _shingles(text: str, ngram: int = 5) -> list[str]:
    return word_shingles(normalize_texts(pa.array([text])).to_pylist()[0], ngram)


@pytest.mark.parametrize(("num_perm", "seed"), [(112, 1), (64, 7)])
def test_signatures_equal_datasketch_on_real_pages(page_texts, num_perm, seed):
    normalized = normalize_texts(pa.array(list(page_texts.values()) + ["too short", ""]))
    shingle_sets = [word_shingles(t, 5) for t in normalized.to_pylist()]
    ours = MinHasher(num_perm, seed).text_signatures(normalized, 5)
    assert (ours[-2:] == 0xFFFFFFFF).all()  # no shingle: datasketch's empty signature
    for row, shingles in zip(ours, shingle_sets):
        reference = MinHash(num_perm=num_perm, seed=seed)
        reference.update_batch([s.encode("utf-8") for s in shingles])
        np.testing.assert_array_equal(row, reference.hashvalues)


def test_shingle_spans_and_sha1_match_python_on_real_pages_and_long_words(page_texts):
    """Spans equal word_shingles; the SIMD one-block and the any-length SHA-1 paths both equal hashlib."""
    texts = list(page_texts.values())[:5] + ["Pneumonoultramicroscopicsilicovolcanoconiosis " * 8, "", "two words"]
    normalized = normalize_texts(pa.array(texts))
    buf, starts, ends, doc_offsets = shingle_spans(normalized, 5)
    hashes = sha1_hash32(buf, starts, ends)
    assert (ends - starts > 55).any() and (ends - starts <= 55).any()
    for d, text in enumerate(normalized.to_pylist()):
        spans = [bytes(buf[a:b]) for a, b in zip(starts[doc_offsets[d] : doc_offsets[d + 1]], ends[doc_offsets[d] :])]
        assert list(dict.fromkeys(s.decode() for s in spans)) == word_shingles(text, 5)
        expected = [int.from_bytes(hashlib.sha1(s).digest()[:4], "little") for s in spans]
        assert hashes[doc_offsets[d] : doc_offsets[d + 1]].tolist() == expected


def test_normalization_ignores_case_punctuation_digits_and_spacing():
    out = normalize_texts(pa.array(["Hello,  World! Page 2 of 3\n", "hello world page of"])).to_pylist()
    assert out[0] == out[1] == "hello world page of"


def test_union_find_picks_the_smallest_id_of_each_component():
    roots = duplicate_roots([("c", "b"), ("d", "c"), ("b", "a"), ("y", "x")])
    assert roots == {"b": "a", "c": "a", "d": "a", "y": "x"}


def _docs(texts: dict[str, str]) -> ray.data.Dataset:
    ds = ray.data.from_arrow(pa.table({"doc_id": list(texts), "text": list(texts.values())}))
    ds.context.shuffle_strategy = ShuffleStrategy(CurateConfig().shuffle_strategy)  # as run_curation does
    return ds


@pytest.mark.parametrize("single_task_max_docs", [0, 100], ids=["groupby", "single-task"])
def test_exact_dedup_keeps_the_smallest_doc_id(page_texts, ray_local, single_task_max_docs):
    names = list(page_texts)[:6]
    texts = {f"doc{i}": page_texts[n] for i, n in enumerate(names)}
    texts["doc9"] = "  " + texts["doc1"].upper().replace(".", " .") + "\n"  # same words, other formatting
    texts["doc0b"] = texts["doc0"]
    rows = mark_exact_duplicates(_docs(texts), 2, single_task_max_docs).take_all()
    reasons = {r["doc_id"]: (r["drop_reason"], r["exact_dup_of"]) for r in rows}
    expected = {d: (None, None) for d in texts}
    assert reasons == {**expected, "doc9": ("exact_duplicate", "doc1"), "doc0b": ("exact_duplicate", "doc0")}


def test_near_dedup_finds_real_lookalikes_and_small_edits(page_texts, ray_local):
    others = {n: t for n, t in page_texts.items() if n not in (HT_ORIGINAL, HT_UPDATE)}
    base_name, base = max(others.items(), key=lambda kv: len(kv[1]))
    words = base.split()
    edited = " ".join(words[:100] + ["(updated)"] + words[100:])  # one inserted word
    texts = {f"z-{n}": t for n, t in others.items()}
    texts.update({"a-ht-original": page_texts[HT_ORIGINAL], "b-ht-update": page_texts[HT_UPDATE],
                  "m-base": base, "n-edited": edited, "short": "Breaking news"})
    rows = mark_near_duplicates_stage(_docs(texts), DedupConfig(shuffle_partitions=2)).take_all()
    dropped = {r["doc_id"]: r["near_dup_of"] for r in rows if r["drop_reason"] == "near_duplicate"}
    # The near-identical base page is also in `others`; it and its edit collapse onto the smallest id, "m-base".
    assert dropped == {"b-ht-update": "a-ht-original", "n-edited": "m-base", f"z-{base_name}": "m-base"}
    assert {r["doc_id"] for r in rows} == set(texts)  # the one-shingle-less "short" doc passes through


def _components(pairs: list[tuple[str, str]]) -> tuple[dict[str, str], int, dict[int, int]]:
    edges = pa.table({"doc_id": [a for a, _ in pairs], "dup_of": [b for _, b in pairs]}, schema=EDGE_SCHEMA)
    ds = ray.data.from_arrow(edges)
    ds.context.shuffle_strategy = ShuffleStrategy(CurateConfig().shuffle_strategy)  # as run_curation does
    roots, rounds, sizes = connected_components(ds, DedupConfig(shuffle_partitions=2))
    return {r["doc_id"]: r["dup_of"] for r in roots.take_all()}, rounds, sizes


def test_distributed_components_match_union_find_on_long_chains(ray_local):
    """A path with shuffled labels (diameter 149: min-label propagation needs ~149 rounds), a cycle and a pair."""
    rng = random.Random(0)
    labels = [f"n{i:04d}" for i in range(300)]
    rng.shuffle(labels)
    paths, cycle, pair = labels[:150], labels[150:190], labels[190:192]
    links = list(zip(paths, paths[1:])) + list(zip(cycle, cycle[1:] + cycle[:1])) + [tuple(pair)]
    pairs = [(max(a, b), min(a, b)) for a, b in links]
    rng.shuffle(pairs)
    roots, rounds, sizes = _components(pairs)
    assert roots == duplicate_roots(pairs)
    assert star_components(pairs, 64) == (roots, rounds, sizes)  # the single-task path's components, round for round
    assert set(roots.values()) == {min(paths), min(cycle), min(pair)}
    assert sizes == {2: 1, len(cycle): 1, len(paths): 1}
    assert rounds <= 4 * math.ceil(math.log2(len(paths)))  # logarithmic in the diameter, not linear


def test_distributed_components_match_union_find_on_real_pages(all_page_texts, ray_local):
    """A permissive LSH (20 bands of 1 row) links many same-site pages: real, irregular components."""
    cfg = DedupConfig(num_bands=20, rows_per_band=1, shuffle_partitions=2)
    pairs = [(r["doc_id"], r["dup_of"]) for r in candidate_pairs(_docs(all_page_texts), cfg).take_all()]
    assert len(pairs) == len(set(pairs)) and all(a > b for a, b in pairs)  # each pair once, pointing down
    reference = duplicate_roots(pairs)
    assert len(set(reference.values())) >= 3 and len(reference) >= 10
    distributed = _components(pairs)
    assert distributed[0] == reference
    assert star_components(pairs, cfg.max_component_rounds) == distributed


def test_jaccard_check_drops_lsh_false_positives_and_reports_clusters(all_page_texts, ray_local, tmp_path):
    """20 bands x 2 rows over-match real pages; the exact check keeps the re-reported story and drops the rest.
    The groupbys and the single task give the same rows and the same report."""
    cfg = DedupConfig(num_bands=20, rows_per_band=2, shuffle_partitions=2, jaccard_threshold=0.5,
                      single_task_max_docs=0)
    docs = _docs(all_page_texts)
    pairs = [(r["doc_id"], r["dup_of"]) for r in candidate_pairs(docs, cfg).take_all()]
    rows, report_text = _stage_output(docs, cfg, tmp_path / "groupbys")
    assert (rows, report_text) == _stage_output(docs, cfg.model_copy(update={"single_task_max_docs": 10_000}),
                                                tmp_path / "single")
    report = json.loads(report_text)

    def jaccard(a: str, b: str) -> float:
        sa, sb = set(_shingles(all_page_texts[a])), set(_shingles(all_page_texts[b]))
        return len(sa & sb) / len(sa | sb)

    true_pairs = [(a, b) for a, b in pairs if jaccard(a, b) >= 0.5]
    assert 0 < len(true_pairs) < len(pairs)  # the setting really over-matches
    assert report["candidate_pairs"] == len(pairs)
    assert report["pairs_removed_by_jaccard"] == len(pairs) - len(true_pairs)
    dropped = {r["doc_id"]: r["near_dup_of"] for r in rows if r["drop_reason"] == "near_duplicate"}
    assert dropped == duplicate_roots(true_pairs)
    assert dropped[max(HT_ORIGINAL, HT_UPDATE)] == min(HT_ORIGINAL, HT_UPDATE)
    sizes = {int(k): v for k, v in report["cluster_sizes"].items()}
    assert sum(s * n for s, n in sizes.items()) == report["duplicates"] + report["clusters"] == len(dropped) + len(
        set(dropped.values()))


def _stage_output(docs: ray.data.Dataset, cfg: DedupConfig, workdir) -> tuple[list[dict], str]:
    """The stage's marked rows sorted by doc_id (the order the commit writes them in) and its report file's text."""
    layout = RunLayout(workdir)
    rows = sorted(mark_near_duplicates_stage(docs, cfg, layout).take_all(), key=lambda r: r["doc_id"])
    return rows, layout.stats("near_dedup_clusters").read_text()


def test_single_task_and_groupbys_mark_the_same_rows_on_real_pages(all_page_texts, ray_local, tmp_path):
    """20 bands of 1 row link dozens of real same-site pages into clusters that take several component rounds: both
    paths give every document back, with the same columns, marks and report."""
    cfg = DedupConfig(num_bands=20, rows_per_band=1, shuffle_partitions=3, single_task_max_docs=0)
    docs = _docs(all_page_texts)
    rows, report = _stage_output(docs, cfg, tmp_path / "groupbys")
    single = _stage_output(docs, cfg.model_copy(update={"single_task_max_docs": len(all_page_texts)}),
                           tmp_path / "single")
    assert (rows, report) == single  # every column of every row, and the cluster report (rounds included)
    assert [r["doc_id"] for r in rows] == sorted(all_page_texts)
    assert list(rows[0]) == ["doc_id", "text", "near_dup_of", "drop_reason"]
    dropped = {r["doc_id"]: r["near_dup_of"] for r in rows if r["drop_reason"] is not None}
    assert {r["drop_reason"] for r in rows} == {None, "near_duplicate"} and len(dropped) >= 20
    assert json.loads(report)["component_rounds"] >= 2


def test_groupby_join_gives_each_task_one_partition_of_the_roots(all_page_texts, ray_local):
    """The marking join: every call of the per-partition function sees one doc_id partition, with only that part's
    roots (no task holds the whole doc_id -> survivor map); its marks equal the broadcast lookup's."""
    cfg = DedupConfig(num_bands=20, rows_per_band=1, shuffle_partitions=4)
    table = pa.table({"doc_id": list(all_page_texts), "text": list(all_page_texts.values())})
    roots, _ = near_duplicates_in_process([table], cfg)
    assert roots.num_rows >= 20
    docs, root_rows = _docs(all_page_texts), ray.data.from_arrow(roots)

    def inputs_seen(group: pa.Table, columns: list[str]) -> pa.Table:  # nested: Ray pickles it by value
        is_root = group[JOIN_IS_ROOT].to_pylist()
        return pa.table({"partitions": [len(set(group[JOIN_PART].to_pylist()))], "roots": [sum(is_root)],
                         "docs": [len(is_root) - sum(is_root)], "columns": [",".join(columns)]})

    calls = join_near_duplicates(docs, root_rows, cfg, join_fn=inputs_seen).take_all()
    assert len(calls) == cfg.shuffle_partitions and all(c["partitions"] == 1 for c in calls)
    assert sum(c["roots"] for c in calls) == roots.num_rows and sum(c["docs"] for c in calls) == len(all_page_texts)
    assert max(c["roots"] for c in calls) < 0.5 * roots.num_rows  # a share, not the map
    assert {c["columns"] for c in calls} == {"doc_id,text"}

    joined = sorted(join_near_duplicates(docs, root_rows, cfg).take_all(), key=lambda r: r["doc_id"])
    broadcast = mark_near_duplicates(table, [ray.put(roots)]).sort_by("doc_id").to_pylist()
    assert joined == broadcast


class _CountCalls:
    """Wraps a Ray remote function: counts the driver's `.remote` calls, which is where a path is chosen."""

    def __init__(self, remote_fn):
        self.remote_fn, self.calls = remote_fn, 0

    def remote(self, *args, **kwargs):
        self.calls += 1
        return self.remote_fn.remote(*args, **kwargs)


class _GroupbyPath(Exception):
    pass


def test_single_task_threshold_switches_paths(page_texts, ray_local, monkeypatch):
    """At most `single_task_max_docs` documents: one task (exact and near); one more document: the groupbys."""
    texts = dict(page_texts)
    texts["zz-copy"] = page_texts[min(page_texts)]
    docs, n = _docs(texts), len(texts)
    exact_task = _CountCalls(dedup._survivors_task)
    monkeypatch.setattr(dedup, "_survivors_task", exact_task)
    by_path = {}
    for threshold in (n, n - 1, 0):
        rows = mark_exact_duplicates(docs, 2, threshold).take_all()
        by_path[threshold] = sorted(rows, key=lambda r: r["doc_id"]), exact_task.calls
    assert [calls for _, calls in by_path.values()] == [1, 1, 1]  # only the first ran the task
    assert by_path[n][0] == by_path[n - 1][0] == by_path[0][0]
    exact = {r["doc_id"]: r["exact_dup_of"] for r in by_path[n][0] if r["drop_reason"] == "exact_duplicate"}
    assert exact["zz-copy"] == min(page_texts)

    def groupbys(*_args, **_kwargs):
        raise _GroupbyPath

    near_task = _CountCalls(minhash._near_duplicates_task)
    monkeypatch.setattr(minhash, "_near_duplicates_task", near_task)
    monkeypatch.setattr(minhash, "candidate_pairs", groupbys)
    rows = mark_near_duplicates_stage(docs, DedupConfig(single_task_max_docs=n)).take_all()
    assert near_task.calls == 1 and len(rows) == n
    near = {r["doc_id"]: r["near_dup_of"] for r in rows if r["drop_reason"] == "near_duplicate"}
    assert near["zz-copy"] == min(page_texts) and near[max(HT_ORIGINAL, HT_UPDATE)] == min(HT_ORIGINAL, HT_UPDATE)
    for threshold in (n - 1, 0):
        with pytest.raises(_GroupbyPath):
            mark_near_duplicates_stage(docs, DedupConfig(single_task_max_docs=threshold))
    assert near_task.calls == 1
