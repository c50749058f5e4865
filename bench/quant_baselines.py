"""Library baselines for `athanor quantize`: quantize an exported HF Llama folder with a third-party library on CPU.

Run INSIDE a baseline virtualenv (never athanor's own: the libraries pin their own torch / transformers), as a
subprocess of bench/bench_quantize.py:

    python bench/quant_baselines.py --setup /tmp/qb-llmcompressor --lib llmcompressor     # once; idempotent
    /tmp/qb-llmcompressor/bin/python bench/quant_baselines.py --model HF_FOLDER --method llmcompressor-gptq \
        --calibration calib.npy --eval eval.npy --bits 4 --group-size 128 --out result.json [--generate-tokens 32]

calib.npy / eval.npy are int64 token arrays [n, seq]. GPTQ / AWQ calibrate on exactly calib.npy's rows. Only the
decoder-block projections (model.layers.*.{q,k,v,o,gate,up,down}_proj) are quantized, as athanor does: embeddings,
norms and lm_head stay in float32. The JSON holds the eval NLL (mean per next-token over all positions of every
eval row, fp32 logits) and perplexity, greedy CPU generation tokens/s (batch 1, after a warm-up), the bytes the
library saves, phase timings and the versions. `--method none` does the same for the unquantized folder.

Methods (library venv -> methods; `LIBS` pins the versions found to work on CPU, torch 2.13 CPU / py3.11):
    torchao       torchao-int8 (Int8WeightOnlyConfig, per-channel symmetric)
                  torchao-int4 (IntxWeightOnlyConfig int4, PerGroup, asymmetric: torchao's CPU int4 path)
    quanto        quanto-int8 (qint8, per-channel), quanto-int4 (qint4, group-wise, asymmetric via shift)
    llmcompressor llmcompressor-gptq (GPTQModifier), llmcompressor-awq (AWQModifier), both oneshot on CPU
    gptqmodel     gptqmodel-gptq, gptqmodel-awq (needs torch>=2.14.1: PyPI's CUDA wheel, runs on CPU, ~6 GB venv)
    autoawq       autoawq-awq (archived upstream; kept as a second AWQ reference)
Any venv runs `none`. This file imports only the standard library and numpy at module level.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from baseline_venv import ensure_venv  # bench/, this script's folder

# Pinned installs found to work on CPU (Python 3.11; torch 2.13.0+cpu is the local wheel). torch goes first so the
# library resolves against the CPU build instead of pulling a CUDA one.
LIBS: dict[str, dict] = {
    "torchao": {
        "torch": "torch==2.13.0",
        "packages": ["torchao==0.18.0", "transformers==5.24.0", "accelerate==1.15.0", "safetensors", "numpy"],
        "methods": ["torchao-int8", "torchao-int4"],
    },
    "quanto": {
        "torch": "torch==2.13.0",
        "packages": ["optimum-quanto==0.2.7", "transformers==5.24.0", "accelerate==1.15.0", "safetensors", "numpy"],
        "methods": ["quanto-int8", "quanto-int4"],
    },
    "llmcompressor": {
        # llmcompressor 0.14.0.1 pins transformers<=5.17.0 and compressed-tensors==0.19.0; its oneshot needs a
        # processor, so the folder's SentencePiece tokenizer must load (sentencepiece + protobuf).
        "torch": "torch==2.13.0",
        "packages": ["llmcompressor==0.14.0.1", "compressed-tensors==0.19.0", "transformers==5.17.0",
                     "sentencepiece", "protobuf", "numpy"],
        "methods": ["llmcompressor-gptq", "llmcompressor-awq"],
    },
    "gptqmodel": {
        # gptqmodel 7.7.0 requires torch>=2.14.1, which only PyPI's CUDA build provides here (it runs on CPU).
        "torch": "torch==2.14.1",
        "packages": ["gptqmodel==7.7.0", "transformers==5.24.0", "sentencepiece", "protobuf", "numpy"],
        "methods": ["gptqmodel-gptq", "gptqmodel-awq"],
    },
    "autoawq": {
        "torch": "torch==2.13.0",
        "packages": ["autoawq==0.2.9", "transformers==5.24.0", "numpy"],
        "methods": ["autoawq-awq"],
    },
}
METHODS = ["none"] + [m for lib in LIBS.values() for m in lib["methods"]]
BLOCK_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------------------------- venv setup
def setup_venv(venv: str | Path, lib: str, python: str | None = None, quiet: bool = True) -> Path:
    """Create (or reuse) a baseline venv for `lib` (see baseline_venv.py); returns its python."""
    if lib not in LIBS:
        raise SystemExit(f"unknown lib {lib!r}; one of {sorted(LIBS)}")
    spec = LIBS[lib]
    return ensure_venv(venv, [[spec["torch"]], [spec["torch"], *spec["packages"]]], python=python, quiet=quiet)


def lib_of(method: str) -> str | None:
    return next((lib for lib, s in LIBS.items() if method in s["methods"]), None)


# ----------------------------------------------------------------------------------------------- measuring
def _is_block_projection(name: str) -> bool:
    return name.startswith("model.layers.") and name.rsplit(".", 1)[-1] in BLOCK_PROJECTIONS


def eval_nll(model, ev, batch: int = 8) -> dict:
    """Mean next-token NLL over every position of every eval row (fp32 logits), and its perplexity."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():  # not inference_mode: quanto's qint4 matmul rejects inference tensors
        for i in range(0, len(ev), batch):
            x = torch.from_numpy(ev[i : i + batch]).long()
            logits = model(input_ids=x).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum")
            total += nll.item()
            count += x[:, 1:].numel()
    mean = total / count
    return {"mean_nll": mean, "perplexity": math.exp(mean), "n_windows": int(len(ev)), "seq_len": int(ev.shape[1]),
            "n_tokens": count}


def generation_speed(model, ev, new_tokens: int, prompt_len: int = 16) -> dict:
    """Greedy decoding, batch 1, exactly `new_tokens` new tokens, timed after a warm-up call."""
    import torch

    max_pos = getattr(model.config, "max_position_embeddings", None) or 10**9
    prompt_len = max(1, min(prompt_len, ev.shape[1], max_pos - 1))
    new_tokens = max(1, min(new_tokens, max_pos - prompt_len))
    prompt = torch.from_numpy(ev[:1, :prompt_len]).long()
    kw = dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens, attention_mask=torch.ones_like(prompt),
              pad_token_id=getattr(model.config, "pad_token_id", None) or 0)
    with torch.no_grad():  # not inference_mode: quanto's qint4 matmul rejects inference tensors
        model.generate(prompt, **{**kw, "min_new_tokens": min(4, new_tokens), "max_new_tokens": min(4, new_tokens)})
        t = time.perf_counter()
        out = model.generate(prompt, **kw)
        dt = time.perf_counter() - t
    made = out.shape[1] - prompt_len
    return {"prompt_tokens": prompt_len, "new_tokens": int(made), "seconds": dt, "tokens_per_s": made / dt,
            "threads": torch.get_num_threads(), "first_tokens": out[0, prompt_len : prompt_len + 8].tolist()}


def dir_size(path: str | Path | None) -> dict | None:
    if not path or not Path(path).exists():
        return None
    files = {str(p.relative_to(path)): p.stat().st_size for p in Path(path).rglob("*") if p.is_file()}
    weights = {k: v for k, v in files.items() if k.endswith((".safetensors", ".bin", ".pt", ".pth"))}
    return {"bytes_weights": sum(weights.values()), "bytes_total": sum(files.values()), "files": files}


def load_hf(folder, **kw):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32, **kw).eval()


# ----------------------------------------------------------------------------------------------- libraries
def q_none(args, calib, res):
    res["library"] = None
    model = load_hf(args.model)
    res["saved"] = str(args.model)
    return model


def q_torchao(args, calib, res):
    import torch
    import torchao
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType

    res["library"] = {"torchao": torchao.__version__}
    model = load_hf(args.model)
    if args.method == "torchao-int8":
        config = Int8WeightOnlyConfig()
        res["settings"] = {"config": "Int8WeightOnlyConfig()", "bits": 8, "granularity": "per-channel", "symmetric": True}
    else:
        # Int4WeightOnlyConfig's packings need mslk (CUDA), a CPU-less device (plain_int32) or bf16 (tile_packed_to_4d);
        # IntxWeightOnlyConfig is torchao's int4 weight-only path that runs on CPU in fp32.
        gran = PerGroup(args.group_size) if args.group_size > 0 else PerAxis(0)
        mapping = MappingType.SYMMETRIC if args.symmetric else MappingType.ASYMMETRIC
        config = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{args.bits}"), granularity=gran, mapping_type=mapping)
        res["settings"] = {"config": f"IntxWeightOnlyConfig(int{args.bits}, {gran}, {mapping.name})", "bits": args.bits,
                           "group_size": args.group_size, "symmetric": args.symmetric}
    t = time.perf_counter()
    quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and _is_block_projection(fqn))
    res["timings"]["quantize_s"] = time.perf_counter() - t
    res["quantized_modules"] = [n for n, m in model.named_modules()
                                if isinstance(m, torch.nn.Linear) and type(m.weight) is not torch.nn.Parameter]
    t = time.perf_counter()
    out = Path(args.save_dir) / "torchao"
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "pytorch_model.bin")  # torchao's documented way to save tensor subclasses
    res["timings"]["save_s"] = time.perf_counter() - t
    res["saved"] = str(out)
    return model


def q_quanto(args, calib, res):
    import optimum.quanto as oq
    from optimum.quanto import freeze, qint4, qint8, quantization_map, quantize
    from optimum.quanto.nn import QModuleMixin

    res["library"] = {"optimum-quanto": getattr(oq, "__version__", "?")}
    model = load_hf(args.model)
    bits = 8 if args.method == "quanto-int8" else 4
    t = time.perf_counter()
    quantize(model, weights=qint8 if bits == 8 else qint4, include=[f"model.layers.*.{p}" for p in BLOCK_PROJECTIONS])
    eff = {}
    for name, m in model.named_modules():
        if isinstance(m, QModuleMixin):
            if bits == 4:
                # quanto hard-codes group 128 and only when in_features > 128 (else per-channel); ask for ours.
                in_f = m.weight.shape[1]
                if args.group_size > 0 and in_f % args.group_size == 0:
                    m.weight_group_size = args.group_size
                elif args.group_size <= 0:
                    m.weight_group_size = None
            eff[name] = m.weight_group_size
    freeze(model)
    res["timings"]["quantize_s"] = time.perf_counter() - t
    res["quantized_modules"] = list(eff)
    res["settings"] = {"bits": bits, "qtype": f"qint{bits}", "symmetric": bits == 8,
                       "group_size_by_module": eff if bits == 4 else "per-channel"}
    t = time.perf_counter()
    out = Path(args.save_dir) / "quanto"
    model.save_pretrained(out, safe_serialization=True)  # what QuantizedModelForCausalLM.save_pretrained does
    (out / "quanto_qmap.json").write_text(json.dumps(quantization_map(model), indent=1))
    res["timings"]["save_s"] = time.perf_counter() - t
    res["saved"] = str(out)
    return model


def _llmc_scheme(args):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    group = args.group_size > 0
    weights = QuantizationArgs(num_bits=args.bits, type="int", symmetric=args.symmetric,
                               strategy="group" if group else "channel", group_size=args.group_size if group else None)
    return QuantizationScheme(targets=["Linear"], weights=weights)


def q_llmcompressor(args, calib, res):
    import compressed_tensors
    import llmcompressor
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot

    res["library"] = {"llmcompressor": llmcompressor.__version__, "compressed-tensors": compressed_tensors.__version__}
    if not torch.accelerator.is_available():
        # AWQ pins its cached activations for host-to-device copies, which raises without an accelerator (0.14.0.1).
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *a, **k: None
        res["notes"].append("patched llmcompressor IntermediatesCache.pin_memory to a no-op (CPU has no accelerator)")
    model = load_hf(args.model)
    ignore = ["lm_head"]  # embeddings are not Linear; only block projections remain
    if args.method == "llmcompressor-gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        recipe = GPTQModifier(config_groups={"group_0": _llmc_scheme(args)}, ignore=ignore)
    else:
        from llmcompressor.modifiers.awq import AWQModifier

        recipe = AWQModifier(config_groups={"group_0": _llmc_scheme(args)}, ignore=ignore)
    res["settings"] = {"recipe": repr(recipe), "bits": args.bits, "group_size": args.group_size,
                       "symmetric": args.symmetric}
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": [[1] * calib.shape[1]] * len(calib)})
    t = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(calib),
            max_seq_length=calib.shape[1], shuffle_calibration_samples=False, output_dir=None)
    res["timings"]["quantize_s"] = time.perf_counter() - t
    res["quantized_modules"] = [n for n, m in model.named_modules() if getattr(m, "quantization_scheme", None)]
    # The in-memory model runs fake-quantized (quantize-dequantize) weights; keep its NLL as a cross-check.
    res["eval_in_memory"] = eval_nll(model, args._ev)
    t = time.perf_counter()
    out = Path(args.save_dir) / "llmcompressor"
    model.save_pretrained(out, save_compressed=True)  # compressed-tensors pack-quantized, as athanor writes
    res["timings"]["save_s"] = time.perf_counter() - t
    res["saved"] = str(out)
    del model
    # Measure the artifact: transformers loads a compressed-tensors folder on CPU by decompressing to dense Linear.
    reloaded = load_hf(out)
    res["notes"].append("eval and generation run on the saved folder reloaded by transformers (decompressed to dense "
                        "fp32 nn.Linear on CPU)")
    return reloaded


def q_gptqmodel(args, calib, res):
    import gptqmodel
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig

    res["library"] = {"gptqmodel": gptqmodel.__version__}
    kw = dict(bits=args.bits, group_size=args.group_size if args.group_size > 0 else -1, sym=args.symmetric,
              desc_act=False)
    if args.method == "gptqmodel-awq":
        from gptqmodel.quantization import FORMAT, METHOD

        kw.update(quant_method=METHOD.AWQ, format=FORMAT.GEMM)
    qc = QuantizeConfig(**kw)
    res["settings"] = {"quantize_config": {k: str(v) for k, v in kw.items()}}
    # gptqmodel's AWQ CPU module (AwqTorchLinear) only takes fp16/bf16; its GPTQ path runs in fp32.
    dtype = torch.bfloat16 if args.method == "gptqmodel-awq" else torch.float32
    if dtype != torch.float32:
        res["notes"].append(f"model loaded and quantized in {dtype} (AwqTorchLinear rejects float32)")
    t = time.perf_counter()
    wrapper = GPTQModel.load(str(args.model), qc, device="cpu", dtype=dtype)
    res["timings"]["load_s"] = time.perf_counter() - t
    data = [{"input_ids": torch.from_numpy(r).long().unsqueeze(0), "attention_mask": torch.ones(1, len(r), dtype=torch.long)}
            for r in calib]
    t = time.perf_counter()
    wrapper.quantize(data, batch_size=1)
    res["timings"]["quantize_s"] = time.perf_counter() - t
    t = time.perf_counter()
    out = Path(args.save_dir) / "gptqmodel"
    wrapper.save(str(out))
    res["timings"]["save_s"] = time.perf_counter() - t
    res["saved"] = str(out)
    del wrapper
    t = time.perf_counter()
    # bfloat16: in float32 its AUTO backend picks TorchFusedLinear, which scores wrongly on CPU (NLL 4.03 where the
    # bf16 kernels TorchCpuAvx512Linear / TorchLinear agree on 3.877 and fp32 fake-quant gives ~3.88); BACKEND.TORCH
    # rejects float32 outright.
    reloaded = GPTQModel.load(str(out), device="cpu", dtype=torch.bfloat16)
    res["notes"].append("reloaded in bfloat16 (gptqmodel's float32 CPU kernel TorchFusedLinear gives wrong logits)")
    res["timings"]["reload_s"] = time.perf_counter() - t
    model = reloaded.model.eval()
    res["quantized_modules"] = [n for n, m in model.named_modules() if "QuantLinear" in type(m).__name__
                                or "Linear" in type(m).__name__ and type(m).__module__.startswith("gptqmodel")]
    res["kernel"] = sorted({type(m).__name__ for n, m in model.named_modules() if n in res["quantized_modules"]})
    res["notes"].append("eval and generation run on the saved folder reloaded by GPTQModel.load (its CPU kernel)")
    return model


def q_autoawq(args, calib, res):
    import awq
    from awq import AutoAWQForCausalLM

    res["library"] = {"autoawq": awq.__version__}
    import awq.modules.linear.gemm as awq_gemm
    import torch

    if not torch.cuda.is_available() and awq_gemm.TRITON_AVAILABLE:
        # triton is installed as a dependency, so WQLinear_GEMM picks its (GPU-only) kernels; use the torch fallback.
        awq_gemm.TRITON_AVAILABLE = False
        res["notes"].append("set awq.modules.linear.gemm.TRITON_AVAILABLE = False (CPU: torch dequantize fallback)")
    # AutoAWQ's default torch_dtype is float16; fp32 matches the other baselines and runs on CPU.
    wrapper = AutoAWQForCausalLM.from_pretrained(str(args.model), device_map="cpu", torch_dtype=torch.float32)
    qc = {"zero_point": not args.symmetric, "q_group_size": args.group_size, "w_bit": args.bits, "version": "GEMM"}
    res["settings"] = {"quant_config": qc}
    t = time.perf_counter()
    # Rows of exactly max_calib_seq_len tokens are concatenated and re-split into the same rows.
    wrapper.quantize(None, quant_config=qc, calib_data=calib.tolist(), max_calib_seq_len=calib.shape[1],
                     max_calib_samples=len(calib))
    res["timings"]["quantize_s"] = time.perf_counter() - t
    t = time.perf_counter()
    out = Path(args.save_dir) / "autoawq"
    wrapper.save_quantized(str(out))
    res["timings"]["save_s"] = time.perf_counter() - t
    res["saved"] = str(out)
    model = wrapper.model.eval()
    res["quantized_modules"] = [n for n, m in model.named_modules() if type(m).__name__.startswith("WQLinear")]
    res["kernel"] = sorted({type(m).__name__ for n, m in model.named_modules() if n in res["quantized_modules"]})
    return model


QUANTIZERS = {"none": q_none, "torchao": q_torchao, "quanto": q_quanto, "llmcompressor": q_llmcompressor,
              "gptqmodel": q_gptqmodel, "autoawq": q_autoawq}


def run(args) -> dict:
    import numpy as np

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    # gptqmodel builds a 'model_loader:cpu' pool of 2 workers under a 'cpu' pool of (cores+1)//2: 1 on 2 cores.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, (os.cpu_count() or 1) // 2)))
    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    calib = np.load(args.calibration) if args.calibration else None
    ev = np.load(args.eval)
    args._ev = ev
    lib = lib_of(args.method) or "none"
    if lib in ("llmcompressor", "gptqmodel", "autoawq") and calib is None:
        raise SystemExit(f"{args.method} needs --calibration")
    res = {"method": args.method, "model": str(args.model), "torch": torch.__version__,
           "transformers": transformers.__version__, "python": sys.version.split()[0], "timings": {}, "notes": []}
    cleanup = None
    if not args.save_dir:
        cleanup = args.save_dir = tempfile.mkdtemp(prefix="quant-baseline-")
    try:
        t0 = time.perf_counter()
        model = QUANTIZERS[lib](args, calib, res)
        res["timings"]["load_and_quantize_s"] = time.perf_counter() - t0
        if calib is not None:
            res["calibration"] = {"n": int(calib.shape[0]), "seq_len": int(calib.shape[1])}
        res["n_quantized_modules"] = len(res.get("quantized_modules", []))
        res["size"] = dir_size(res.get("saved"))
        res["model_dtype"] = str(next(p for p in model.parameters() if p.is_floating_point()).dtype)
        t = time.perf_counter()
        res["eval"] = eval_nll(model, ev)
        res["timings"]["eval_s"] = time.perf_counter() - t
        if args.generate_tokens > 0:
            res["generate"] = generation_speed(model, ev, args.generate_tokens)
    finally:
        if cleanup:
            shutil.rmtree(cleanup, ignore_errors=True)
            if str(res.get("saved", "")).startswith(cleanup):
                res["saved"] = f"(temporary, removed) {res['saved']}"
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setup", metavar="VENV", help="create/reuse a baseline venv for --lib and exit")
    p.add_argument("--lib", choices=sorted(LIBS))
    p.add_argument("--model", type=Path, help="HF LlamaForCausalLM folder (athanor export)")
    p.add_argument("--method", choices=METHODS)
    p.add_argument("--calibration", help="int64 [n, seq] .npy: GPTQ/AWQ calibration rows")
    p.add_argument("--eval", help="int64 [n, seq] .npy: evaluation windows")
    p.add_argument("--bits", type=int, default=4, help="GPTQ/AWQ/torchao-int4 bits (int8 methods use 8)")
    p.add_argument("--group-size", type=int, default=128, help="<= 0: per-channel")
    p.add_argument("--symmetric", action="store_true", help="symmetric int4 (default: asymmetric, as athanor int4)")
    p.add_argument("--generate-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--save-dir", help="keep the library's saved artifact here (default: a temp dir, removed)")
    p.add_argument("--out", help="result JSON (default: stdout)")
    args = p.parse_args(argv)
    if args.setup:
        if not args.lib:
            p.error("--setup needs --lib")
        print(setup_venv(args.setup, args.lib))
        return 0
    if not (args.model and args.method and args.eval):
        p.error("--model, --method and --eval are required")
    res = run(args)
    text = json.dumps(res, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
