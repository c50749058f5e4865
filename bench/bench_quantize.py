"""`athanor quantize` against library baselines: perplexity cost, size and CPU decoding speed, same model and data.

Athanor's side is the command a user runs, `athanor quantize --checkpoint MODEL --method int8|int4|gptq|awq
--group-size G --calibration N --output <scratch>/athanor/<method>`, each in a fresh process; its figures are the
ones the command writes into `athanor_quantization_report.json` in the folder it makes: full-precision and quantized
validation perplexity and bits per byte (scored on the run's val shards through `athanor eval`'s Ray Data path),
the weight files' bytes. int8 is per output channel (group size -1, as the int8 baselines); int4 (RTN, asymmetric),
GPTQ and AWQ use --bits and --group-size G and calibrate on the same --calibration windows.

The library side is bench/quant_baselines.py, run in each library's own virtualenv (they pin their own torch /
transformers) on the full-precision model exported by `athanor export --format hf`: `none` (the unquantized folder
in transformers: the fp anchor), torchao-int8, quanto-int8, torchao-int4, quanto-int4, llmcompressor-gptq,
llmcompressor-awq (gptqmodel-gptq / -awq with --with-gptqmodel, a ~6 GB venv; autoawq-awq with --with-autoawq). They
get exactly athanor's data: calib.npy holds the windows `athanor quantize` calibrated on (cluster/quantize.py
`calibration_tokens`, imported, same config and seed), eval.npy every window of the run's val split
(TokenShards(run, "val"), seq_len + 1 tokens each). The baseline's perplexity is the mean next-token NLL over all
positions of the eval.npy rows in transformers; athanor's is `athanor eval` on the same val shards. The two fp anchors
(athanor's full-precision perplexity and the library `none`) must agree; both are printed with their difference,
and each side's Δ is taken against its own anchor.

Generation speed (tokens/s columns): athanor's side loads each folder with
`athanor.cluster.inference.load_for_inference(path, device="cpu")` and times greedy `generate_batch`, batch 1, 64 new
tokens after the first 16 tokens of eval.npy's first row, after a warm-up call, with the same torch thread count as
the baselines; once with fp32 activations (the model as loaded) and once cast to bf16 (QuantizedLinear's fast aten
int8 / int4 kernels only run with bf16 activations on CPU). The baselines time HF `generate` the same way, with
whatever activation dtype the library uses (fp32: its row fills the fp32 column). Quantize seconds: athanor's is
the whole command's wall time (Ray start-up and the two evaluations included, so an upper bound); a baseline's is
its load-and-quantize time.

How to read: Δ vs fp is the perplexity cost of the method on its own side; GPTQ and AWQ should sit closer to fp than
int4 RTN at the same bits and group size; athanor int8 should cost under +0.5%. Size ratio is weight bytes on disk
over the fp32 weights' (athanor's export; a baseline's over the `none` folder's). The smoke model (dim 96, 2 layers)
is tiny: embeddings and head dominate its bytes, so its size ratios are far from 4x/8x, and at dim 96 only group
sizes of 32 or 96 divide the projections. Its ppl (~174) is so high that every method's cost is a few hundredths
of a percent, within noise: read it as a check that the pipeline and the anchors agree, not as a ranking. --model
may name any run folder with train/val shards and a checkpoint; the second model measured is a dim-256, 4-layer
(8 heads, 4 KV heads) model trained in a few minutes on a copy of the smoke run's shards (runs/demo had no
checkpoint; training configs/demo.yaml did not fit the time this was measured in), see the second command. Library tokens/s on these
tiny models is dominated by transformers' `generate` per-step overhead and is noisy run to run (tens to hundreds of
tokens/s); compare athanor's columns with each other.

    python bench/bench_quantize.py --model runs/smoke --group-size 32 --calibration 128 \\
        --venv torchao=/tmp/qb-torchao --venv quanto=/tmp/qb-quanto --venv llmcompressor=/tmp/qb-llmc
    mkdir -p /tmp/big && cp -r runs/smoke/{manifest.json,shards,tokenizer,stages} /tmp/big/
    athanor train configs/smoke.yaml --set run.workdir=/tmp/big --set model.dim=256 --set model.n_layers=4 \\
        --set model.n_heads=8 --set model.n_kv_heads=4 --set train.max_steps=600      # ~5 min on 2 CPUs
    python bench/bench_quantize.py --model /tmp/big --group-size 32 --calibration 128 --venv ...   # as above
    python bench/bench_quantize.py    # runs/smoke; baseline venvs built (once) under bench/.venv-quant-<lib>
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_bench import ROOT, athanor, wait  # noqa: E402

ATHANOR_METHODS = ("int8", "int4", "gptq", "awq")
BASELINES = ["none", "torchao-int8", "quanto-int8", "torchao-int4", "quanto-int4", "llmcompressor-gptq",
             "llmcompressor-awq"]
LIB_OF = {"none": "torchao", "torchao": "torchao", "quanto": "quanto", "llmcompressor": "llmcompressor",
          "gptqmodel": "gptqmodel", "autoawq": "autoawq"}
KIND = {"int8": "int8", "torchao-int8": "int8", "quanto-int8": "int8", "int4": "int4", "torchao-int4": "int4",
        "quanto-int4": "int4", "gptq": "gptq", "llmcompressor-gptq": "gptq", "gptqmodel-gptq": "gptq",
        "awq": "awq", "llmcompressor-awq": "awq", "gptqmodel-awq": "awq", "autoawq-awq": "awq"}


def athanor_quantize(method: str, args, model: Path, work: Path) -> dict:
    out = work / "athanor" / method
    group = -1 if method == "int8" else args.group_size
    cmd = ["quantize", "--checkpoint", str(model), "--method", method, "--group-size", str(group),
           "--calibration", str(args.calibration), "--output", str(out)]
    if method != "int8":
        cmd += ["--bits", str(args.bits)]
    log = work / f"quantize-{method}.log"
    print(f"athanor {' '.join(cmd)}", flush=True)
    t = time.perf_counter()
    wait(athanor(cmd, log), log, f"athanor quantize --method {method}")
    report = json.loads((out / "athanor_quantization_report.json").read_text())
    report["wall_s"] = time.perf_counter() - t
    return report


def dump_data(args, model: Path, work: Path, report: dict) -> tuple[Path, Path]:
    """calib.npy: the windows `athanor quantize` calibrated on; eval.npy: every val window of the run."""
    import numpy as np

    from athanor.cluster.inference import describe
    from athanor.cluster.quantize import calibration_tokens
    from athanor.config import load_config
    from athanor.pipelines.shards import TokenShards

    found = [p / "config.resolved.yaml" for p in (model, *model.parents)]
    cfg = load_config(next(p for p in found if p.is_file()), [f"quantize.calibration={args.calibration}"])
    calib = calibration_tokens(cfg, describe(str(model)), args.calibration).numpy()
    meta = report.get("calibration") or {}
    if meta and (meta.get("sequences"), meta.get("seq_len")) != calib.shape:
        raise SystemExit(f"calibration mismatch: athanor used {meta}, dumped {calib.shape}")
    val = TokenShards(cfg.run.workdir if (Path(cfg.run.workdir) / "manifest.json").exists() else model, "val")
    ev = np.stack([val[i] for i in range(len(val))]).astype(np.int64)
    np.save(work / "calib.npy", calib)
    np.save(work / "eval.npy", ev)
    print(f"calib.npy {calib.shape}, eval.npy {ev.shape}", flush=True)
    return work / "calib.npy", work / "eval.npy"


def baseline_python(lib: str, args) -> Path:
    if lib in args.venvs:
        return Path(args.venvs[lib]) / "bin" / "python"
    venv = ROOT / "bench" / f".venv-quant-{lib}"
    print(f"baseline venv for {lib}: {venv} (built once, reused)", flush=True)
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "quant_baselines.py"), "--setup", str(venv),
                          "--lib", lib], check=True, capture_output=True, text=True).stdout
    return Path(out.strip().splitlines()[-1])


def run_baseline(method: str, args, hf: Path, calib: Path, ev: Path, work: Path) -> dict | None:
    lib = LIB_OF[method.split("-")[0]]
    py = baseline_python(lib, args)
    out = work / "baselines" / f"{method}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(py), str(ROOT / "bench" / "quant_baselines.py"), "--model", str(hf), "--method", method,
           "--calibration", str(calib), "--eval", str(ev), "--bits", str(args.bits), "--group-size",
           str(args.group_size), "--out", str(out), "--generate-tokens", str(args.generate_tokens),
           "--threads", str(args.threads), "--save-dir", str(work / "baselines" / method)]
    print(f"baseline {method} ({py})", flush=True)
    log = work / "baselines" / f"{method}.log"
    with log.open("w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=out.parent).returncode  # llm-compressor: logs/ in cwd
    if rc:
        print(f"  {method} FAILED (exit {rc}); last lines of {log}:\n" + "\n".join(log.read_text().splitlines()[-8:]),
              flush=True)
        return None
    return json.loads(out.read_text())


def athanor_speed(path: Path, ev_path: Path, args) -> dict:
    """Greedy batch-1 decoding tokens/s of an athanor-loaded folder, fp32 and bf16 activations."""
    import numpy as np
    import torch

    from athanor.cluster.inference import load_for_inference
    from athanor.model.generate import generate_batch

    torch.set_num_threads(args.threads)
    prompt = np.load(ev_path)[0, : args.prompt_len].tolist()
    res = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load_for_inference(path, device="cpu").model.to(dtype)
        with torch.inference_mode():
            generate_batch(model, [prompt], 4, temperature=0.0)
            t = time.perf_counter()
            [new] = generate_batch(model, [prompt], args.generate_tokens, temperature=0.0)
            dt = time.perf_counter() - t
        res[str(dtype).split(".")[-1]] = len(new) / dt
    return res


def fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "runs" / "smoke",
                   help="athanor run folder / checkpoint with train+val shards (default runs/smoke)")
    p.add_argument("--group-size", type=int, default=32, help="int4/GPTQ/AWQ group size (dim 96: 32)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--calibration", type=int, default=128, help="calibration windows (athanor and baselines)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for every generation timing")
    p.add_argument("--generate-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--venv", action="append", default=[], metavar="LIB=PATH",
                   help="use this existing venv for LIB as is (default: bench/.venv-quant-<lib>, built via --setup)")
    p.add_argument("--with-gptqmodel", action="store_true", help="also gptqmodel-gptq/-awq (~6 GB venv)")
    p.add_argument("--with-autoawq", action="store_true", help="also autoawq-awq")
    p.add_argument("--skip-baselines", action="store_true")
    p.add_argument("--scratch", type=Path, help="working folder (default: a temp dir, kept)")
    args = p.parse_args(argv)
    args.venvs = dict(v.split("=", 1) for v in args.venv)
    model = args.model.resolve()
    work = (args.scratch or Path(tempfile.mkdtemp(prefix="bench-quantize-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"working folder {work}", flush=True)

    reports = {m: athanor_quantize(m, args, model, work) for m in ATHANOR_METHODS}
    calib, ev = dump_data(args, model, work, reports["gptq"])
    hf = work / "fp-hf"
    log = work / "export.log"
    wait(athanor(["export", "--checkpoint", str(model), "--format", "hf", "--out", str(hf)], log), log,
         "athanor export")
    fp_bytes = sum(f.stat().st_size for f in hf.rglob("*.safetensors"))

    baselines = {}
    if not args.skip_baselines:
        methods = list(BASELINES)
        if args.with_gptqmodel:
            methods += ["gptqmodel-gptq", "gptqmodel-awq"]
        if args.with_autoawq:
            methods += ["autoawq-awq"]
        for m in methods:
            baselines[m] = run_baseline(m, args, hf, calib, ev, work)

    print("timing athanor generation", flush=True)
    speed = {"fp": athanor_speed(hf, ev, args)}
    for m, r in reports.items():
        speed[m] = athanor_speed(Path(r["output"]), ev, args)

    fp = reports["int8"]["full_precision"]
    rows = [("fp32", "athanor", fp["perplexity"], None, fp["bits_per_byte"], reports["int8"]["full_precision_bytes"],
             1.0, speed["fp"]["float32"], speed["fp"]["bfloat16"], None)]
    for m, r in reports.items():
        q = r["quantized"]
        rows.append((r["tag"], "athanor", q["perplexity"], q["perplexity"] / fp["perplexity"] - 1, q["bits_per_byte"],
                     r["bytes"], r["bytes"] / r["full_precision_bytes"], speed[m]["float32"], speed[m]["bfloat16"],
                     r["wall_s"]))
    anchor = (baselines.get("none") or {}).get("eval", {}).get("perplexity")
    for m, r in baselines.items():
        if r is None:
            rows.append((m, "library", None, None, None, None, None, None, None, None))
            continue
        ppl = r["eval"]["perplexity"]
        size = (r.get("size") or {}).get("bytes_weights")
        if m == "none":
            size = fp_bytes
        rows.append((m, "library", ppl, None if m == "none" or not anchor else ppl / anchor - 1, None, size,
                     size / fp_bytes if size else None, (r.get("generate") or {}).get("tokens_per_s"), None,
                     None if m == "none" else r["timings"].get("load_and_quantize_s")))

    head = (f"{'method':<22}{'side':<9}{'ppl':>10}{'Δ vs fp':>9}{'bpb':>8}{'weight B':>11}{'ratio':>7}"
            f"{'tok/s f32':>11}{'tok/s bf16':>11}{'quant s':>9}")
    print(f"\nmodel {model}, bits {args.bits}, group {args.group_size} (int8: per channel), calibration "
          f"{args.calibration} windows, {args.threads} threads, {args.generate_tokens} new tokens after "
          f"{args.prompt_len}\n")
    print(head)
    print("-" * len(head))
    for name, side, ppl, d, bpb, size, ratio, t32, t16, qs in rows:
        print(f"{name:<22}{side:<9}{fmt(ppl, '.3f'):>10}{fmt(d, '+.2%'):>9}{fmt(bpb, '.4f'):>8}{fmt(size, ','):>11}"
              f"{fmt(ratio, '.3f'):>7}{fmt(t32, '.1f'):>11}{fmt(t16, '.1f'):>11}{fmt(qs, '.1f'):>9}")

    print("\nfp anchors: athanor eval (val shards) perplexity "
          f"{fp['perplexity']:.4f} over {fp['tokens']} tokens; library `none` (eval.npy, transformers) "
          + (f"{anchor:.4f} over {baselines['none']['eval']['n_tokens']} tokens; difference "
             f"{anchor / fp['perplexity'] - 1:+.4%}" if anchor else "not run"))
    d = {m: r["perplexity_change"] for m, r in reports.items()}
    lib_d = {KIND[n]: dd for n, side, _, dd, *_ in rows if side == "library" and n.startswith("llmcompressor")
             and dd is not None}
    checks = [("athanor int8 within +0.5% ppl of fp", d["int8"] <= 0.005, f"{d['int8']:+.3%}"),
              ("athanor GPTQ closer to fp than int4 RTN", abs(d["gptq"]) < abs(d["int4"]),
               f"{d['gptq']:+.3%} vs {d['int4']:+.3%}"),
              ("athanor AWQ closer to fp than int4 RTN", abs(d["awq"]) < abs(d["int4"]),
               f"{d['awq']:+.3%} vs {d['int4']:+.3%}")]
    if "gptq" in lib_d:
        checks.append(("athanor GPTQ no worse than llmcompressor GPTQ", d["gptq"] <= lib_d["gptq"],
                       f"{d['gptq']:+.3%} vs {lib_d['gptq']:+.3%}"))
    else:
        checks.append(("athanor GPTQ no worse than llmcompressor GPTQ", None, "llmcompressor-gptq not run"))
    print("\ngoal check:")
    for what, ok, detail in checks:
        print(f"  [{'PASS' if ok else 'n/a ' if ok is None else 'FAIL'}] {what}: {detail}")
    (work / "results.json").write_text(json.dumps({"athanor": reports, "baselines": baselines, "speed": speed},
                                                  indent=1, default=str) + "\n")
    print(f"\nall figures: {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
