"""13-gram decontamination against the real lm-eval tasks (data/eval), on real documents, through Ray Data.

Training documents are real SMS messages and real news pages; some get a passage copied from a real task doc. The
expected decisions come from a plain-Python re-implementation of the overlap test (tuples of normalized words in a
set), never from the module under test.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import regex

from athanor.config import DecontamConfig, load_config
from athanor.layout import RunLayout
from athanor.pipelines.commit import SHARD_MARKERS, STAGE_MARKER
from athanor.pipelines.curate import DECONTAM, FINAL, curation_stages, run_curation
from athanor.pipelines.decontam import SIGNAL, decontaminate, eval_ngrams
from athanor.pipelines.extract import html_to_text
from athanor.pipelines.stats import reason_counts

ROOT = Path(__file__).resolve().parents[1]
N = 13


@pytest.fixture(scope="module")
def tasks(data_dir) -> dict[str, list[dict]]:
    """The lm-eval task docs, built by scripts/build_eval_tasks.py if this data/ has none yet."""
    if not (data_dir / "eval" / "manifest.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "build_eval_tasks.py"), "--data", str(data_dir)],
                       check=True)
    return {name: [json.loads(line) for line in (data_dir / "eval" / f"{name}.jsonl").read_text().splitlines()]
            for name in ("athanor_cloze", "athanor_choice")}


def words(text: str) -> list[str]:
    """GPT-3 / DataTrove normalization, written plainly: lowercase, numbers -> 0, punctuation and symbols -> space,
    accents dropped, whitespace split."""
    text = regex.sub(r"\p{Nd}+(?:[.,]\p{Nd}+)?", "0", text.lower())
    text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    return "".join(ch for ch in unicodedata.normalize("NFD", text) if unicodedata.category(ch) != "Mn").split()


def grams(text: str) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i:i + N]) for i in range(len(w) - N + 1)}


@pytest.fixture(scope="module")
def eval_grams(tasks) -> set[tuple[str, ...]]:
    out: set[tuple[str, ...]] = set()
    for doc in tasks["athanor_cloze"]:
        out |= grams(doc["text"])
    for doc in tasks["athanor_choice"]:
        for choice in doc["choices"]:
            out |= grams(f"{doc['query']} {choice}")
    return out


@pytest.fixture(scope="module")
def sms(data_dir) -> list[str]:
    lines = [t for t in (data_dir / "quality" / "low" / "sms.txt").read_text().splitlines()[1:] if t.strip()]
    return [" ".join(lines[i:i + 12]) for i in range(0, 12 * 60, 12)]  # 60 documents of 12 real messages


def _copies(tasks) -> list[tuple[str, bool]]:
    """(passage from a task doc, whether it must count): whole passages, 13 and 12 words, shouted or re-punctuated,
    and one that runs from a choice query into one of its wrong choices."""
    cloze, choice = tasks["athanor_cloze"], tasks["athanor_choice"]
    w = [c["text"].split() for c in cloze[:6]]
    q, c = choice[3]["query"].split(), choice[3]["choices"][(choice[3]["label"] + 1) % 4].split()
    return [
        (cloze[0]["text"], True),
        (" ".join(w[1][10:23]).upper(), True),  # 13 words, other case
        ("-- ".join(w[2][5:18]) + "!!", True),  # 13 words, other punctuation
        (" ".join(w[3][20:32]), False),  # 12 words: under n
        (" ".join(q[-7:] + c[:6]), True),  # query end into a distractor
        (" ".join(w[4][0:30:2]), False),  # every other word
    ]


def test_eval_ngrams_are_the_tasks_ngrams(tasks, eval_grams):
    hashes = eval_ngrams(DecontamConfig())
    assert len(hashes) == len(eval_grams) > 50_000  # one distinct hash per distinct 13-gram: no collision here
    assert hashes.dtype.itemsize == 8 and (hashes[1:] > hashes[:-1]).all()


def test_exactly_the_copied_passages_are_contaminated(tasks, eval_grams, sms, ray_local):
    import ray

    docs = list(sms)
    planted = {}
    for i, (passage, counts) in enumerate(_copies(tasks)):
        k = 7 * i + 3
        docs[k] = f"{docs[k]} {passage} {sms[k + 1]}"
        planted[k] = counts
    expected = {i for i, d in enumerate(docs) if grams(d) & eval_grams}
    assert expected == {k for k, counts in planted.items() if counts}  # the copies, and nothing in the real SMS
    ids = [hashlib.sha1(str(i).encode()).hexdigest()[:24] for i in range(len(docs))]
    ds = ray.data.from_arrow(pa.table({"doc_id": ids, "text": docs})).repartition(4)
    marked = decontaminate(ds, DecontamConfig()).materialize()
    assert sum(reason_counts(marked).values()) == len(docs)
    assert reason_counts(marked)["contaminated"] == len(expected)
    rows = {r["doc_id"]: r for r in marked.take_all()}
    assert set(rows) == set(ids)  # every document once
    for i, doc_id in enumerate(ids):
        r = rows[doc_id]
        assert (r["drop_reason"] == "contaminated") == (i in expected) == (r[SIGNAL] > 0)
        w = words(docs[i])
        assert r[SIGNAL] == sum(1 for j in range(len(w) - N + 1) if tuple(w[j:j + N]) in eval_grams)


@pytest.fixture(scope="module")
def corpus(data_dir, tasks, tmp_path_factory):
    """Real news pages as JSONL text records, three with a task passage added as a paragraph; the task files copied,
    so a test can change them."""
    tmp = tmp_path_factory.mktemp("decontam")
    pages = sorted((data_dir / "html" / "news").iterdir())[:16]
    texts = [t for t in (html_to_text(p.read_bytes(), load_config().curate.extract)[0] for p in pages) if t][:12]
    cloze = tasks["athanor_cloze"]
    planted = {2: cloze[10]["text"], 5: cloze[11]["text"], 9: cloze[12]["text"]}
    lines = [json.dumps({"text": t + ("\n\n" + planted[i] + "." if i in planted else "")}) for i, t in enumerate(texts)]
    (tmp / "docs.jsonl").write_text("\n".join(lines) + "\n")
    for name in tasks:
        shutil.copy(data_dir / "eval" / f"{name}.jsonl", tmp / f"{name}.jsonl")
    return tmp, planted


def _config(tmp: Path, workdir: Path):
    files = ",".join(str(tmp / f"{n}.jsonl") for n in ("athanor_cloze", "athanor_choice"))
    return load_config(None, [f"data.jsonl_files=[{tmp / 'docs.jsonl'}]", "curate.quality.enabled=false",
                              "curate.dedup.minhash=false", "curate.docs_per_shard=4",
                              f"curate.decontam.task_files=[{files}]", f"run.workdir={workdir}"])


def _digests(layout: RunLayout) -> dict[str, str]:
    files = sorted(p for d in ("curated", "stats") for p in (layout.root / d).rglob("*") if p.is_file())
    return {str(p.relative_to(layout.root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files
            if p.name != "timings.json"}


def test_curation_drops_contaminated_documents_and_resumes(corpus, tasks, ray_local):
    tmp, planted = corpus
    cfg = _config(tmp, tmp / "run")
    layout = RunLayout.from_workdir(cfg.run.workdir)
    assert [name for name, _ in curation_stages(cfg, layout)][:2] == ["filter", DECONTAM]
    summary = run_curation(cfg, layout)
    stages = {s["stage"]: s for s in summary["stages"]}
    assert stages[DECONTAM]["in"] == stages["pii"]["kept"] and stages["exact_dedup"]["in"] == stages[DECONTAM]["kept"]
    dropped = pq.read_table(layout.dropped / DECONTAM).to_pylist()
    filtered = ({r["offset"] for r in pq.read_table(layout.dropped / "filter", columns=["offset"]).to_pylist()}
                if (layout.dropped / "filter").exists() else set())
    assert {r["offset"] for r in dropped} == set(planted) - filtered and len(dropped) >= 2
    assert stages[DECONTAM]["dropped"] == {"contaminated": len(dropped)} == {"contaminated": summary["dropped"][
        "contaminated"]}
    assert all(r["drop_reason"] == "contaminated" and r[SIGNAL] >= 1 and r["stage"] == DECONTAM for r in dropped)
    assert 'data-stage="decontam"' in (layout.stats_dir / "report.html").read_text()

    # killed mid-commit: decontam with some ranges committed, the later stages not at all
    before = _digests(layout)
    shard_markers = sorted((layout.curated(DECONTAM) / SHARD_MARKERS).glob("*.json"))
    assert len(shard_markers) >= 2
    (layout.curated(DECONTAM) / STAGE_MARKER).unlink()
    for stage in ("dedup", FINAL):
        shutil.rmtree(layout.curated(stage))
    shutil.rmtree(layout.dropped / "dedup", ignore_errors=True)
    for marker in shard_markers[::2]:
        marker.unlink()
        (layout.curated(DECONTAM) / marker.with_suffix(".parquet").name).unlink(missing_ok=True)
    run_curation(cfg, layout)
    assert _digests(layout) == before

    # a changed evaluation set recomputes the stage: one more task doc, holding the opening of a kept page's text
    fourth = pq.read_table(layout.curated(DECONTAM), columns=["text"])["text"][0].as_py()
    with (tmp / "athanor_cloze.jsonl").open("a") as f:
        f.write(json.dumps({"doc": -1, "source": "test", "text": " ".join(fourth.split()[:60])}) + "\n")
    again = run_curation(cfg, layout)
    assert {s["stage"]: s for s in again["stages"]}[DECONTAM]["dropped"] == {"contaminated": len(dropped) + 1}
