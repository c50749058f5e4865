#!/usr/bin/env bash
# The GPU check: one prepared script for a lent GPU machine, at most ~8 minutes on one GPU, one table at the end.
#
#   bash bench/gpu_check.sh --prepare   # here, with the project's .venv: real shards packed at 2048 tokens in .gpu/,
#                                       # and in .whl/ the wheels the GPU image lacks (pydantic); both git-ignored
#   bash bench/gpu_check.sh             # there (the device tool: carry [".gpu", ".whl"]; README "GPU check")
#
# There it runs (1) the GPU tests, (2) the bf16 training benchmark of the 350m and 1b presets with flash-attn (when
# it imports) and SDPA, (3) a 2-rank training smoke run on the one GPU (bench/gpu_smoke.py), and prints their table.
# The GPU image has PyTorch but not Ray, whose wheel is larger than what can be carried there, so the benchmark
# reads pre-packed shards and the smoke run uses the loop's own pieces over gloo instead of Ray Train.
set -uo pipefail
cd "$(dirname "$0")/.."
SEQ_LEN=${SEQ_LEN:-2048}

if [[ "${1:-}" == "--prepare" ]]; then
    set -e
    PY=.venv/bin/python
    for d in /.gpu/ /.whl/; do grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
    if [[ ! -f runs/demo/tokenizer/tokenizer.model ]]; then   # the demo's corpus and tokenizer, without training
        .venv/bin/athanor curate configs/demo.yaml && .venv/bin/athanor tokenize configs/demo.yaml
    fi
    rm -rf .gpu && mkdir -p .gpu
    PYTHONPATH=bench $PY -c "import sys; from pathlib import Path; import bench_gpu; \
bench_gpu.pack(Path('runs/demo/curated/final'), Path('runs/demo/tokenizer/tokenizer.model'), $SEQ_LEN, \
Path('.gpu/shards'))"
    rm -rf .gpu/shards/curated                     # the packed shards and manifest are what travels
    rm -rf .whl && $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        "pydantic==$($PY -c 'import pydantic; print(pydantic.VERSION)')" \
        "pydantic-core==$($PY -c 'import importlib.metadata as m; print(m.version("pydantic-core"))')" \
        "annotated-types==0.8.0" "typing-inspection==0.4.5"
    du -sh .gpu .whl
    exit 0
fi

OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
[[ -f .gpu/shards/manifest.json ]] || { echo "no .gpu/shards: run bash bench/gpu_check.sh --prepare first"; exit 2; }
nvidia-smi -L
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

# (1) the GPU tests: only the files that have some (collecting the others would import Ray and MLflow)
gpu_files=$(grep -l "mark.gpu" tests/test_*.py | tr '\n' ' ')
timeout 180 $PY -m pytest -q -m gpu -p no:cacheprovider $gpu_files 2>&1 | tee "$OUT/gpu_tests.txt"
tests_line=$(grep -E "passed|failed|error" "$OUT/gpu_tests.txt" | tail -1)

# (2) bf16 training throughput and MFU, flash-attn (if importable) and SDPA; 989 TFLOP/s is the dense bf16 peak
# of both the H100 SXM and the H200
timeout 330 $PY bench/bench_gpu.py --shards .gpu/shards --seq-len "$SEQ_LEN" --presets 350m 1b --steps 10 \
    --warmup 3 --peak-tflops 989 2>&1 | tee "$OUT/bench_gpu.txt"

# (3) two ranks training on the one GPU
timeout 150 $PY bench/gpu_smoke.py --shards .gpu/shards --device cuda --steps 30 2>&1 | tee "$OUT/smoke.txt"
smoke_line=$(grep '^{' "$OUT/smoke.txt" | tail -1)

echo
echo "| check | result |"
echo "|---|---|"
echo "| GPU tests (\`pytest -m gpu\`) | ${tests_line:-did not finish} |"
grep -E '^\| (350m|1b) ' "$OUT/bench_gpu.txt" | sed 's/^| /| bench_gpu: /' | cut -c1-200 | \
    awk -F'|' '{printf "| %s %s | %s tok/s, %s TFLOP/s, MFU %s, %s GiB |\n", $2, $4, $5, $7, $8, $9}'
echo "| 2-rank smoke (gloo, DDP, one GPU) | ${smoke_line:-did not finish} |"
