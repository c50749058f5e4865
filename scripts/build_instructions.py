"""Instruction pairs written by people: the questions and answers of the Python FAQ, from Debian's python3.11-doc.

The package ships the reST sources of its HTML (`html/_sources/faq/*.rst.txt`). Each FAQ section whose title is a
question ("How do I ...?") becomes one `{prompt, response}` pair: the title is the prompt, the section body (until
the next title) the response, with reST markup reduced to the text a reader sees (roles and links to their words,
directives dropped, literal blocks kept as indented code). About 170 pairs; a seeded hash of the question puts
about one in eight into a held-out file.

    python scripts/build_instructions.py --data data          # -> data/instructions/python_faq.{train,heldout}.jsonl

Source: Debian package python3.11-doc (Python Software Foundation License); the FAQ text is the PSF's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

PACKAGE = "python3.11-doc"
HELDOUT_EIGHTHS = 1  # questions whose hash mod 8 falls below this are held out
TITLE_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+])\1{3,}\s*$")
ROLE = re.compile(r":[\w:+-]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")  # :func:`name` / :ref:`text <target>` -> name / text
LINK = re.compile(r"`([^`<]+?)\s*<[^>]+>`__?")  # `text <url>`_ -> text
INLINE_LITERAL = re.compile(r"``([^`]+)``")
DIRECTIVE = re.compile(r"^\s*\.\. [\w:-]+::.*$")
LABEL = re.compile(r"^\s*\.\. _[^:]+:\s*$")
FIELD = re.compile(r"^\s*:[\w-]+:(\s.*)?$")  # a directive option such as `:tocdepth: 2` (not a role)


def fetch_pydoc(data: Path) -> Path:
    """data/pydoc/html from Debian's python3.11-doc (apt-get download + dpkg-deb; `apt-get update` if needed)."""
    html = data / "pydoc" / "html"
    if html.exists():
        return html
    with tempfile.TemporaryDirectory() as tmp:
        download = ["apt-get", "download", PACKAGE]
        if subprocess.run(download, cwd=tmp).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], check=True)
            subprocess.run(download, cwd=tmp, check=True)
        deb = next(Path(tmp).glob(f"{PACKAGE}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), f"{tmp}/root"], check=True)
        html.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(f"{tmp}/root/usr/share/doc/python3.11/html", html)
    return html


def plain_text(lines: list[str]) -> str:
    """reST -> what a reader sees: roles and links become their words, directives, labels and fields go."""
    out = []
    skip_indent = None  # inside a directive's options/body that is not meant as text (e.g. `.. only:: html`)
    for line in lines:
        if skip_indent is not None:
            if line.strip() and len(line) - len(line.lstrip()) <= skip_indent:
                skip_indent = None
            else:
                continue
        if LABEL.match(line) or FIELD.match(line):
            continue
        if DIRECTIVE.match(line):
            name = line.strip()[3:].split("::")[0]
            if name in ("code-block", "sourcecode", "code"):
                out.append("")  # its body is indented code: keep it
            else:
                skip_indent = len(line) - len(line.lstrip())
            continue
        out.append(line.rstrip())
    text = "\n".join(out)  # roles and links may span lines: substituted on the whole text
    text = INLINE_LITERAL.sub(r"\1", LINK.sub(r"\1", ROLE.sub(r"\1", text))).replace("::", ":")
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def faq_pairs(rst: str) -> list[tuple[str, str]]:
    """(question, answer) for every section titled with a question."""
    lines = rst.splitlines()
    titles = [i - 1 for i in range(1, len(lines)) if TITLE_UNDERLINE.match(lines[i]) and lines[i - 1].strip()
              and len(lines[i].strip()) >= len(lines[i - 1].strip())]
    pairs = []
    for n, t in enumerate(titles):
        question = lines[t].strip()
        end = titles[n + 1] if n + 1 < len(titles) else len(lines)
        if not question.endswith("?"):
            continue
        answer = plain_text(lines[t + 2 : end])
        if len(answer.split()) >= 3:
            pairs.append((question, answer))
    return pairs


def held_out(question: str) -> bool:
    return int(hashlib.sha256(question.encode()).hexdigest(), 16) % 8 < HELDOUT_EIGHTHS


def build(data: Path, out: Path) -> dict:
    sources = sorted((fetch_pydoc(data) / "_sources" / "faq").glob("*.rst.txt"))
    out.mkdir(parents=True, exist_ok=True)
    files = {"train": out / "python_faq.train.jsonl", "heldout": out / "python_faq.heldout.jsonl"}
    counts = {"train": 0, "heldout": 0}
    with open(files["train"], "w") as train, open(files["heldout"], "w") as heldout:
        for src in sources:
            for question, answer in faq_pairs(src.read_text(encoding="utf-8")):
                split = "heldout" if held_out(question) else "train"
                record = {"prompt": question, "response": answer, "source": f"{PACKAGE}:faq/{src.name}"}
                (heldout if split == "heldout" else train).write(json.dumps(record, ensure_ascii=False) + "\n")
                counts[split] += 1
    summary = {"source": f"Debian {PACKAGE} (PSF License), html/_sources/faq/*.rst.txt", "pairs": counts,
               "files": {k: str(v) for k, v in files.items()}}
    (out / "SOURCES.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("data"))
    ap.add_argument("--out", type=Path, default=None, help="default: DATA/instructions")
    args = ap.parse_args()
    print(json.dumps(build(args.data, args.out or args.data / "instructions"), indent=2))


if __name__ == "__main__":
    main()
