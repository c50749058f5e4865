"""PII masking on real Usenet posts (gensim's mini_newsgroup: headers, quoting and signatures with real addresses)."""

from __future__ import annotations

import io
import pickle
import zlib
import zipfile

import pyarrow as pa
import pytest

from athanor.config import PiiConfig
from athanor.pipelines.pii import EMAIL, mask_pii, pii_batch


class _BunchAsDict(pickle.Unpickler):
    """The file pickles an sklearn Bunch (a dict subclass); read it as a plain dict without sklearn."""

    def find_class(self, module, name):
        return dict if name == "Bunch" else super().find_class(module, name)


@pytest.fixture(scope="module")
def posts(data_dir) -> list[str]:
    wheel = next((data_dir / ".cache").glob("gensim-4.4.0-*.whl"))  # fetched by scripts/fetch_data.py
    with zipfile.ZipFile(wheel) as z:
        raw = zlib.decompress(z.read("gensim/test/test_data/mini_newsgroup"))
    return list(_BunchAsDict(io.BytesIO(raw)).load()["data"])


def test_every_email_address_in_real_posts_is_masked(posts):
    cfg = PiiConfig()
    out = pii_batch(pa.table({"text": posts}), cfg)
    masked = out["text"].to_pylist()
    assert out.num_rows == len(posts) and out["drop_reason"].null_count == len(posts)  # never a drop
    assert sum(out["pii_emails"].to_pylist()) >= len(posts)  # every post has at least its From: address
    assert not any(EMAIL.search(t) for t in masked)
    assert all(t.count(cfg.email_placeholder) >= n for t, n in zip(masked, out["pii_emails"].to_pylist()))
    author = "From: <EMAIL> (Benedikt Rosenau)"
    assert author in masked[0] and "I3150101@dbstu1.rz.tu-bs.de" in posts[0]
    body_words = [w for w in posts[0].split() if "@" not in w]
    assert all(w in masked[0] for w in body_words[-20:])  # the prose around addresses is untouched


def test_public_ips_are_masked_and_private_ones_kept(posts):
    with_ips = [p for p in posts if "138.203.8.26" in p or "131.96.5.29" in p]
    assert with_ips
    for post in with_ips:
        masked, _, ips = mask_pii(post, PiiConfig())
        assert ips >= 1 and "138.203.8.26" not in masked and "131.96.5.29" not in masked and "<IP>" in masked
    loopback = next(p for p in posts if "127.0.0.1" in p)
    assert "127.0.0.1" in mask_pii(loopback, PiiConfig())[0]
    assert "127.0.0.1" not in mask_pii(loopback, PiiConfig(public_ips_only=False))[0]


def test_ipv6_and_lookalikes():
    line = "Reach the mirror at 2001:4860:4860::8888 or 8.8.8.8, not at 10:30:00, in version 2.10.0 or ::1."
    masked, emails, ips = mask_pii(line, PiiConfig())
    assert (emails, ips) == (0, 2)
    assert masked == "Reach the mirror at <IP> or <IP>, not at 10:30:00, in version 2.10.0 or ::1."
