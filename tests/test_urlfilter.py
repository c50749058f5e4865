"""The URL block list: DataTrove's real lists (data/blocklists, from scripts/fetch_data.py) and the compact hash set."""

from __future__ import annotations

import shutil

import pyarrow as pa
import numpy as np
import pytest
import ray

from athanor.config import DataConfig, UrlFilterConfig
from athanor.pipelines.read import read_crawl
from athanor.pipelines.stats import kept_rows
from athanor.pipelines.urlfilter import UrlFilter, fnv1a, load_domain_hashes

SAMPLE_DOMAINS = 200_000  # the first lines of the real list: enough to test lookups without the 4.5 M load


def _fnv1a_reference(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) % 2**64
    return h


@pytest.fixture(scope="module")
def blocklist_dir(data_dir, tmp_path_factory):
    src, dst = data_dir / "blocklists", tmp_path_factory.mktemp("blocklists")
    with open(src / "domains", "rb") as f:
        (dst / "domains").write_bytes(b"".join(f.readline() for _ in range(SAMPLE_DOMAINS)))
    for name in ("urls", "banned_words.txt", "soft_banned_words.txt", "banned_subwords.txt"):
        shutil.copy(src / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def url_filter(blocklist_dir):
    return UrlFilter(UrlFilterConfig(blocklist_dir=str(blocklist_dir)))


def test_vectorized_hash_is_fnv1a(blocklist_dir):
    domains = (blocklist_dir / "domains").read_text().split()[:1000] + ["a", "x" * 300]
    assert [int(h) for h in fnv1a(domains)] == [_fnv1a_reference(d.encode()) for d in domains]
    hashes = load_domain_hashes(blocklist_dir / "domains")
    assert len(hashes) == SAMPLE_DOMAINS and (hashes[1:] > hashes[:-1]).all()  # sorted, no collisions


def test_listed_domains_subdomains_urls_and_words_are_blocked(blocklist_dir, url_filter):
    domains = (blocklist_dir / "domains").read_text().split()
    listed_url = (blocklist_dir / "urls").read_text().split()[0]
    cases = {
        f"http://{domains[0]}/": "domain",
        f"https://www.{domains[12345]}:8080/a?b=1": "domain",  # a subdomain of a listed domain
        f"http://{listed_url}": "url",
        "http://example.com/free-porn-videos": "banned_word",
        "http://www.iana.org/domains/root/db": None,
        "http://www.reuters.com/article/2013/07/19/us-egypt-protests": None,
        "http://[::1/broken": None,  # unparseable URLs are judged by their words, never crash
        None: None,  # rows without a URL pass
    }
    out = url_filter(pa.table({"url": pa.array(list(cases), pa.string())}))
    assert out["url_block_rule"].to_pylist() == list(cases.values())
    assert out["drop_reason"].to_pylist() == ["url_blocked" if r else None for r in cases.values()]


def test_domain_hashes_are_cached_beside_the_list_until_it_changes(blocklist_dir, tmp_path):
    lines = (blocklist_dir / "domains").read_bytes().splitlines(keepends=True)
    domains = tmp_path / "domains"
    domains.write_bytes(b"".join(lines[:5000]))
    first = load_domain_hashes(domains)
    (cache,) = tmp_path.glob(".domains.*.npy")
    assert (load_domain_hashes(domains) == first).all() and np.array_equal(np.load(cache), first)
    domains.write_bytes(b"".join(lines[:6000]))  # the list grew: hashed again, under a new cache name
    grown = load_domain_hashes(domains)
    assert len(grown) == 6000 and len(first) == 5000 and len(list(tmp_path.glob(".domains.*.npy"))) == 2


def test_missing_list_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="blocklist_dir"):
        UrlFilter(UrlFilterConfig(blocklist_dir=str(tmp_path)))


def test_real_crawl_through_an_actor_pool(data_dir, blocklist_dir, ray_local):
    records = read_crawl(DataConfig(warc_files=[str(data_dir / "warc" / "iana.warc.gz")]))
    ds = records.map_batches(kept_rows, batch_format="pyarrow")
    out = ds.map_batches(UrlFilter, fn_constructor_args=(UrlFilterConfig(blocklist_dir=str(blocklist_dir)),),
                         batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1)).take_all()
    assert len(out) == ds.count() > 0 and all(row["url"] for row in out)
    assert all(row["drop_reason"] is None for row in out)  # iana.org is on no block list


@pytest.mark.slow
def test_full_real_list_loads_compactly(data_dir):
    hashes = load_domain_hashes(data_dir / "blocklists" / "domains")
    assert len(hashes) > 4_500_000 and hashes.nbytes < 40 * 2**20
