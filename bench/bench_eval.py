"""Ray Data's overhead on eval: `athanor eval` (evaluate()) against a plain single-process scoring loop, same windows.

Both sides score the same documents with the same model, tokenizer, context, stride and batch size, in the same
invocation, --repeats times and interleaved so machine noise hits them alike:
  - Ray: `athanor.cluster.evaluate.evaluate(cfg, checkpoint, inputs)`, the `athanor eval` path: read the files with
    the curation reader, cut BOS + tokens into sliding windows (Ray Data fuses that map into the actor), score them
    in a `WindowScorer` actor pool, sum nats, tokens and bytes per source on the driver, write summary.json and
    documents.parquet. Its time is evaluate()'s wall time: Ray Data's start, the actor's start-up and model load
    included (a fixed 3-4 s here, ~7 s for the first evaluate() of the process, so the ratio improves with more
    input), `ray.init` (once, before the first repeat) not. The scorer is WindowScorer wrapped only to note when
    each of its calls starts and ends (`TimedScorer`), which splits the wall time into start-up and scoring: a
    second row gives the tokens/s inside the actor's calls.
  - plain loop: what a user would write by hand in one process: load the same checkpoint, read the same files,
    tokenize each document as BOS + tokens, `sliding_windows`, one `score_windows` call over all windows with the
    same batch size, sum. Model and tokenizer loading are inside its time too.
Both sides must give the same number of scored tokens and the same total nats (to --rtol relative: the two batch the
windows differently, so padding widths, and with them float rounding, differ slightly); the table says whether they do.

Like with like on 2 CPUs: the Ray pool is 1 actor x 1 CPU (eval.actors=1, eval.cpus_per_actor=1; evaluate() refuses
a pool that takes every CPU: the reading needs one), so the model runs on one thread there, as in the
plain loop at 1 torch thread (tokenizing at 1 thread too): the ratio of that pair is Ray Data's overhead. The plain
loop at one thread per core (model and tokenizer) is a second row: what one process gets from the whole machine.

Model: configs/demo.yaml's shape (dim 256, 4 layers, 8 heads, 4 KV heads, context 256) with a 4,096-piece
SentencePiece BPE trained here, with athanor's settings, on the four books/news files of data/quality/high; the
weights are the seeded initialisation, saved with `save_model` (throughput does not depend on weight values).
Inputs (default): lcet10.txt as one document and lee_background.txt's 300 news articles as a JSONL file of 300
documents (many short documents: short last windows, padding), 229k tokens, about 30 s of scoring per side at one
thread here (~4.5 min for the default 3 repeats).

    python bench/bench_eval.py                      # after `make setup` (data/ fetched by scripts/fetch_data.py)
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

from athanor.cluster.checkpoint import TOKENIZER_FILE, save_model
from athanor.cluster.inference import WindowScorer
from athanor.cluster.train import model_config_for
from athanor.config import ModelConfig, load_config
from athanor.model.transformer import Transformer
from athanor.pipelines.tokenizer import BOS_ID, EOS_ID, MAX_SENTENCE_BYTES, PAD_ID, UNK_ID

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "quality" / "high"
DEMO = ROOT / "configs" / "demo.yaml"


def demo_tokenizer(out: Path, data_dir: Path = DATA, vocab_size: int | None = None) -> Path:
    """A SentencePiece BPE (configs/demo.yaml's vocab_size) trained, with athanor's tokenizer settings, on the
    non-blank lines of every .txt in data_dir (the real books and news of data/quality/high): about a second."""
    cfg = load_config(DEMO)
    lines = [line for path in sorted(data_dir.glob("*.txt")) for line in path.read_text().splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type=cfg.tokenize.model_type,
        vocab_size=vocab_size or cfg.tokenize.vocab_size, character_coverage=cfg.tokenize.character_coverage,
        byte_fallback=True, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True, input_sentence_size=0,
        shuffle_input_sentence=False, max_sentence_length=MAX_SENTENCE_BYTES, hard_vocab_limit=True, num_threads=1,
        minloglevel=2,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())
    return out


def demo_model(tokenizer: Path, train_steps: int = 0, seed: int = 0, data_dir: Path = DATA,
               train_len: int = 128, train_batch: int = 8) -> tuple[Transformer, ModelConfig]:
    """configs/demo.yaml's model (its shape resolved as `athanor train` resolves it), seeded initialisation, then
    `train_steps` AdamW steps on random `train_len`-token chunks of the books in data_dir (0: left as initialised)."""
    cfg = load_config(DEMO)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    mcfg = model_config_for(cfg, sp.vocab_size())
    torch.manual_seed(seed)
    model = Transformer(mcfg)
    if train_steps:
        ids = torch.tensor([t for path in sorted(data_dir.glob("*.txt")) for t in sp.encode(path.read_text())])
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
        g = torch.Generator().manual_seed(seed)
        for _ in range(train_steps):
            starts = torch.randint(0, len(ids) - train_len - 1, (train_batch,), generator=g)
            chunk = torch.stack([ids[s : s + train_len + 1] for s in starts])
            loss = model.loss(model(chunk[:, :-1]), chunk[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), mcfg


def write_inputs(out: Path, data_dir: Path, books: list[str], jsonl: list[str]) -> list[str]:
    """The eval inputs: each of `books` as a .txt file (one document), each of `jsonl` as a JSONL file with one
    document per non-blank line (lee_background.txt holds one news article per line)."""
    out.mkdir(parents=True, exist_ok=True)
    inputs = []
    for name in books:
        inputs.append(str(data_dir / name))
    for name in jsonl:
        lines = [line for line in (data_dir / name).read_text().splitlines() if line.strip()]
        path = out / f"{Path(name).stem}.jsonl"
        path.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
        inputs.append(str(path))
    return inputs


def read_documents(path: str) -> list[str]:
    """A .txt file as one document, a JSONL file as one per non-blank line: what evaluate()'s reader yields."""
    if path.endswith(".jsonl"):
        return [json.loads(line)["text"] for line in Path(path).read_text().splitlines() if line.strip()]
    return [Path(path).read_bytes().decode("utf-8")]  # as the reader decodes it: no newline translation


def plain_loop(checkpoint: Path, inputs: list[str], threads: int, batch_size: int, context: int,
               stride: int) -> tuple[int, float, float]:
    """(scored tokens, total nats, seconds) of the hand-written loop: load, read, tokenize, window, score, sum."""
    from athanor.cluster.inference import load_for_inference
    from athanor.model.scoring import score_windows, sliding_windows
    from athanor.pipelines.tokenizer import Tokenizer

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    m = load_for_inference(checkpoint, device="cpu")
    tok = Tokenizer(m.source / TOKENIZER_FILE, num_threads=threads)
    windows, n_scored = [], []
    for path in inputs:
        for ids in tok.encode(read_documents(path)):
            for window, n in sliding_windows([tok.bos_id, *ids], context, stride):
                windows.append(window)
                n_scored.append(n)
    scores = score_windows(m.model, windows, n_scored, tok.pad_id, batch_size)
    tokens, nats = sum(s.n_scored for s in scores), -math.fsum(s.logprob for s in scores)
    return tokens, nats, time.perf_counter() - t0


class TimedScorer(WindowScorer):
    """WindowScorer that appends when each call starts and ends, and the tokens it scored, to `log_path` (a class
    attribute: cloudpickle carries it to the actor with the class), to split evaluate()'s wall time into start-up and
    scoring. The scoring itself is WindowScorer's, untouched."""

    log_path = ""

    def __call__(self, batch):
        start = time.time()
        out = super().__call__(batch)
        with open(self.log_path, "a") as f:
            f.write(f"{start} {time.time()} {int(np.sum(batch['n_scored']))}\n")
        return out


def through_ray(cfg, checkpoint: Path, inputs: list[str], log: Path) -> dict:
    """Scored tokens, total nats and seconds of evaluate(), the `athanor eval` path (Ray already initialised), and
    the wall time's parts: to the first WindowScorer call, inside the calls, after the last."""
    from athanor.cluster import evaluate as ev

    log.unlink(missing_ok=True)
    TimedScorer.log_path = str(log)
    ev.WindowScorer = TimedScorer  # evaluate() looks the class up in its module at call time
    t0, wall0 = time.perf_counter(), time.time()
    summary = ev.evaluate(cfg, str(checkpoint), inputs)
    seconds, wall1 = time.perf_counter() - t0, time.time()
    for s in summary["sources"]:
        if s["errors"]:
            raise SystemExit(f"evaluate() dropped documents of {s['path']}: {s['errors']}")
    calls = [tuple(map(float, line.split())) for line in log.read_text().splitlines()]
    return {"tokens": sum(s["tokens"] for s in summary["sources"]),
            "nats": math.fsum(s["nats"] for s in summary["sources"]), "seconds": seconds,
            "to_first_call": min(c[0] for c in calls) - wall0, "in_calls": sum(c[1] - c[0] for c in calls),
            "after_last_call": wall1 - max(c[1] for c in calls), "calls": len(calls)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DATA, help="the real books and news (data/quality/high)")
    parser.add_argument("--books", nargs="*", default=["lcet10.txt"], help="files scored as one document each")
    parser.add_argument("--jsonl", nargs="*", default=["lee_background.txt"],
                        help="files scored as one document per non-blank line (written as JSONL)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16, help="windows per forward pass (eval.batch_size)")
    parser.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: the context)")
    parser.add_argument("--rtol", type=float, default=1e-6, help="relative tolerance of the total-nats check")
    args = parser.parse_args()
    if not (args.data_dir / "lcet10.txt").exists():
        raise SystemExit(f"{args.data_dir} has no books: run `make setup` (scripts/fetch_data.py fetches data/)")
    cores = os.cpu_count() or 1
    if cores < 2:
        raise SystemExit("evaluate() needs a CPU beside its actor for reading and windowing: run on >= 2 cores")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer = demo_tokenizer(tmp / "tokenizer.model", args.data_dir)
        model, mcfg = demo_model(tokenizer)
        context = load_config(DEMO).tokenize.seq_len
        stride = args.stride or context
        checkpoint = save_model(tmp / "run" / "checkpoints" / "checkpoint_00000000", model, mcfg, tokenizer, step=0,
                                seq_len=context)
        del model
        inputs = write_inputs(tmp / "inputs", args.data_dir, args.books, args.jsonl)
        docs = sum(len(read_documents(p)) for p in inputs)
        cfg = load_config(DEMO, [f"run.workdir={tmp / 'run'}", "eval.actors=1", "eval.cpus_per_actor=1",
                                 f"eval.batch_size={args.batch_size}", f"eval.stride={stride}",
                                 "eval.val_shards=false", "eval.run_name=bench"])
        from athanor.cluster.driver import init_ray

        init_ray(cfg)  # not timed: once per process, as `athanor eval` does before evaluate()

        def plain(threads: int) -> dict:
            tokens, nats, seconds = plain_loop(checkpoint, inputs, threads, args.batch_size, context, stride)
            return {"tokens": tokens, "nats": nats, "seconds": seconds}

        methods = [  # (name, threads column, run)
            ("plain loop", "1", lambda: plain(1)),
            ("athanor eval (Ray Data), evaluate() wall", "1 actor x 1 CPU",
             lambda: through_ray(cfg, checkpoint, inputs, tmp / "calls.txt")),
            ("plain loop", str(cores), lambda: plain(cores)),
        ]
        runs: list[list[dict]] = [[] for _ in methods]
        for r in range(args.repeats):
            for (name, threads, run), out in zip(methods, runs):
                out.append(run())
                o = out[-1]
                print(f"repeat {r + 1}: {name}, {threads} thread(s): {o['tokens']:,} tokens, {o['seconds']:.2f} s, "
                      f"{o['tokens'] / o['seconds']:,.0f} tokens/s, {o['nats']:.6f} nats", flush=True)
        import ray

        ray.shutdown()

    ref = runs[0][0]
    worst = max(abs(o["nats"] - ref["nats"]) / abs(ref["nats"]) for out in runs for o in out)
    same_tokens = all(o["tokens"] == ref["tokens"] for out in runs for o in out)
    print(f"\n{docs} documents ({', '.join(args.books) or 'none'} as .txt; {', '.join(args.jsonl) or 'none'} as "
          f"JSONL lines), context {context}, stride {stride}, batch {args.batch_size}; demo-shaped model "
          f"({mcfg.dim} dim, {mcfg.n_layers} layers, {mcfg.n_heads}/{mcfg.n_kv_heads} heads, vocab {mcfg.vocab_size}, "
          f"initialised weights); {cores} cores; median of {args.repeats} interleaved repeats, each ratio paired with "
          "the same repeat's 1-thread plain loop")
    print(f"same scored tokens on every run: {'yes' if same_tokens else 'NO'}; total nats agree to "
          f"{worst:.1e} relative ({'within' if worst <= args.rtol else 'OUTSIDE'} {args.rtol:g})\n")
    print("| side | threads | tokens | seconds | tokens/s | ratio to plain loop, 1 thread |")
    print("|---|---|---|---|---|---|")

    def row(name: str, threads: str, out: list[dict], key: str = "seconds") -> None:
        seconds = statistics.median(o[key] for o in out)
        ratio = statistics.median(b["seconds"] / o[key] for o, b in zip(out, runs[0]))
        tokens = out[0]["tokens"]
        print(f"| {name} | {threads} | {tokens:,} | {seconds:.2f} | {tokens / seconds:,.0f} | {ratio:.3f} |")

    for (name, threads, _), out in zip(methods, runs):
        row(name, threads, out)
        if "Ray" in name:
            row("  of which inside the actor's WindowScorer calls", "1", out, "in_calls")
    ray_runs = runs[1]

    def each(key: str) -> str:
        return ", ".join(f"{o[key]:.1f}" for o in ray_runs)

    print(f"\nevaluate(), per repeat: start to the first WindowScorer call (Ray Data start, actor start-up, model "
          f"load, reading) {each('to_first_call')} s; after the last call (results to the driver, sums, writing) "
          f"{each('after_last_call')} s; {ray_runs[0]['calls']} calls per run")
    if not same_tokens or worst > args.rtol:
        raise SystemExit("the two sides did not score the same windows alike")


if __name__ == "__main__":
    main()
