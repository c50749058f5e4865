"""Batched generation: `generate_batch` on 32 prompts at once against the one-prompt loop and transformers' generate.

Every side continues the same prompts with the same weights and settings, in the same process at the same torch
thread count (--threads), --repeats times and interleaved so machine noise hits them alike, after one untimed
warm-up pass of each:
  - athanor, batched: one `athanor.model.generate.generate_batch` call on all --batch prompts (left-padded into one
    KV-cache batch, each row ending on its own at EOS);
  - athanor, one prompt at a time: the same function called once per prompt (no padding: the unmasked path);
  - transformers: `generate` on the `export_hf` folder of the same model (LlamaForCausalLM, float32, loaded with
    HF_HUB_OFFLINE=1), the same batch left-padded with its attention mask, do_sample=False, the same
    max_new_tokens, pad and EOS ids;
  - with --beams N (default 4; 0 skips): beam search, `generate_batch(num_beams=N)` against transformers'
    num_beams=N, the same batch, length_penalty 1, early_stopping False on both.
Greedy decoding on the same weights must give the same tokens on every side: the table says for how many of the
prompts each side matches the batched athanor output (a mismatch would come from a float near-tie in an argmax, and
the first differing step is printed). tokens/s counts the tokens each side returns (EOS included, nothing after it;
for beam search the returned best beam's, not every beam's), over the wall time of the call(s).

Prompts: openings of real paragraphs from the books of data/quality/high (Alice, the LOC workshop proceedings,
Paradise Lost), 32 paragraphs spread over the three, cut at 4 to 60 words so their lengths differ (7-90 tokens),
each BOS + its SentencePiece pieces as `athanor generate` encodes a prompt.
Model: configs/demo.yaml's shape (dim 256, 4 layers, 8 heads, 4 KV heads, vocab 4096 from a SentencePiece BPE trained
here on the books and news of data/quality/high), seeded initialisation then --train-steps AdamW steps on the books
(default 60, ~10-20 s: enough that greedy outputs are not one repeated token; throughput does not depend on the
weights). Its training text holds no EOS, so the model rarely if ever emits it and rows run to max_new_tokens; EOS is
still passed to every side.

    python bench/bench_generate.py                  # after `make setup` (data/ fetched by scripts/fetch_data.py)
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers reads it at import: the export folder is all it needs

import sentencepiece as spm  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eval import DATA, demo_model, demo_tokenizer  # noqa: E402 - the same tokenizer and model as bench_eval

from athanor.model.generate import generate_batch  # noqa: E402
from athanor.model.hf_export import export_hf  # noqa: E402

BOOKS = ("alice29.txt", "lcet10.txt", "plrabn12.txt")


def prompt_texts(data_dir: Path, n: int) -> list[str]:
    """Openings of n real paragraphs spread evenly over the books, cut at 4 to 60 words (lengths vary with i)."""
    paragraphs = []
    for name in BOOKS:
        text = (data_dir / name).read_bytes().decode("utf-8").replace("\r\n", "\n")
        for para in re.split(r"\n\s*\n", text):
            words = para.split()
            letters = sum(c.isalpha() for c in para)
            # prose or verse, not headings, tables or the licence's capitals
            if len(words) >= 12 and letters > 0.7 * len(para.replace(" ", "")) and not para.isupper():
                paragraphs.append(words)
    picked = [paragraphs[(2 * i + 1) * len(paragraphs) // (2 * n)] for i in range(n)]
    return [" ".join(words[: 4 + (i * 13) % 57]) for i, words in enumerate(picked)]


def athanor_batched(model, prompts, max_new, eos, pad, beams) -> list[list[int]]:
    return generate_batch(model, prompts, max_new, num_beams=beams, eos_id=eos, pad_id=pad)


def athanor_one_by_one(model, prompts, max_new, eos, pad, beams) -> list[list[int]]:
    return [generate_batch(model, [p], max_new, num_beams=beams, eos_id=eos, pad_id=pad)[0] for p in prompts]


def transformers_batched(hf, prompts, max_new, eos, pad, beams) -> list[list[int]]:
    """transformers' generate on the left-padded batch; each row's new tokens up to and including its first EOS."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False, num_beams=beams,
                          length_penalty=1.0, early_stopping=False, eos_token_id=eos, pad_token_id=pad)
    rows = []
    for row in out[:, width:].tolist():
        rows.append(row[: row.index(eos) + 1] if eos is not None and eos in row else row)
    return rows


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DATA, help="the real books and news (data/quality/high)")
    parser.add_argument("--batch", type=int, default=32, help="prompts per batch")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same on every side")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--beams", type=int, default=4, help="beam-search rows with this many beams; 0: none")
    parser.add_argument("--train-steps", type=int, default=60, help="AdamW steps on the books before generating")
    parser.add_argument("--no-eos", action="store_true", help="give no EOS id to any side")
    args = parser.parse_args()
    if not (args.data_dir / "alice29.txt").exists():
        raise SystemExit(f"{args.data_dir} has no books: run `make setup` (scripts/fetch_data.py fetches data/)")
    import transformers

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = demo_tokenizer(Path(tmp) / "tokenizer.model", args.data_dir)
        t0 = time.perf_counter()
        model, mcfg = demo_model(tokenizer, train_steps=args.train_steps, data_dir=args.data_dir)
        trained_s = time.perf_counter() - t0
        hf_dir = export_hf(model, mcfg, tokenizer, Path(tmp) / "hf")
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True,
                                                               dtype=torch.float32).eval()
        sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    texts = prompt_texts(args.data_dir, args.batch)
    prompts = [[sp.bos_id(), *sp.encode(t)] for t in texts]
    eos, pad = (None if args.no_eos else sp.eos_id()), sp.pad_id()

    n = len(prompts)
    sides = [  # (name, beams, function, model)
        (f"athanor generate_batch, batch {n}", 1, athanor_batched, model),
        ("athanor generate_batch, one prompt at a time", 1, athanor_one_by_one, model),
        (f"transformers generate, batch {n}", 1, transformers_batched, hf),
    ]
    if args.beams > 1:
        sides += [(f"athanor generate_batch, batch {n}, {args.beams} beams", args.beams, athanor_batched, model),
                  (f"transformers generate, batch {n}, {args.beams} beams", args.beams, transformers_batched, hf)]
    for _, beams, fn, m in sides:  # warm-up: first-call costs (kernel selection, lazy imports) stay out of the timing
        fn(m, prompts[:2], 2, eos, pad, beams)
    outputs: list[list[list[int]]] = [[] for _ in sides]
    seconds: list[list[float]] = [[] for _ in sides]
    for r in range(args.repeats):
        for (name, beams, fn, m), outs, secs in zip(sides, outputs, seconds):
            t0 = time.perf_counter()
            outs.append(fn(m, prompts, args.max_new_tokens, eos, pad, beams))
            secs.append(time.perf_counter() - t0)
            tokens = sum(map(len, outs[-1]))
            print(f"repeat {r + 1}: {name}: {tokens} tokens, {secs[-1]:.2f} s, {tokens / secs[-1]:,.0f} tokens/s",
                  flush=True)

    lengths = sorted(map(len, prompts))
    print(f"\n{len(prompts)} prompts of {lengths[0]}-{lengths[-1]} tokens (median {statistics.median(lengths):g}), "
          f"max_new_tokens {args.max_new_tokens}, greedy, EOS id {eos}, pad id {pad}; demo-shaped model "
          f"({mcfg.dim} dim, {mcfg.n_layers} layers, {mcfg.n_heads}/{mcfg.n_kv_heads} heads, vocab {mcfg.vocab_size}, "
          f"{args.train_steps} training steps in {trained_s:.0f} s); torch {torch.__version__}, transformers "
          f"{transformers.__version__}, {args.threads} thread(s) on every side; median of {args.repeats} interleaved "
          "repeats, each ratio paired within its repeat")
    ended = sum(bool(o) and o[-1] == eos for o in outputs[0][0])
    print(f"rows ending at EOS (batched greedy): {ended} of {len(prompts)}")
    deterministic = all(o == outs[0] for outs in outputs for o in outs)
    print(f"every side returned the same tokens in every repeat: {'yes' if deterministic else 'NO'}\n")

    reference = {1: outputs[0][0]}  # greedy: the batched athanor output; beams: the batched athanor beam output
    for (_, beams, _, _), outs in zip(sides, outputs):
        reference.setdefault(beams, outs[0])
    print("| side | tokens | seconds | tokens/s | vs one-prompt loop | vs transformers (same search) | "
          "same tokens as athanor batched |")
    print("|---|---|---|---|---|---|---|")
    one_by_one = seconds[1]
    hf_of = {1: seconds[2], **({args.beams: seconds[4]} if args.beams > 1 else {})}
    mismatches = []
    for (name, beams, _, _), outs, secs in zip(sides, outputs, seconds):
        tokens = sum(map(len, outs[0]))
        median = statistics.median(secs)
        vs_loop = statistics.median(b / s for s, b in zip(secs, one_by_one)) if beams == 1 else None
        vs_hf = statistics.median(b / s for s, b in zip(secs, hf_of[beams]))
        same = sum(a == b for a, b in zip(outs[0], reference[beams]))
        for i, (a, b) in enumerate(zip(outs[0], reference[beams])):
            if a != b:
                mismatches.append(f"{name}, prompt {i} ({len(prompts[i])} tokens): first differs at new token "
                                  f"{first_difference(a, b)} of {len(b)}")
        loop = f"{vs_loop:.2f}x" if vs_loop is not None else "-"
        print(f"| {name} | {tokens:,} | {median:.2f} | {tokens / median:,.0f} | {loop} | {vs_hf:.2f}x | "
              f"{same}/{len(prompts)} |")
    for line in mismatches:
        print("mismatch:", line)


if __name__ == "__main__":
    main()
