#!/usr/bin/env bash
# The GPU check, for a machine with torch, triton and transformers but no vLLM,
# no lm-eval and no network (see bench/README.md). Usage:
#   bench/gpu_check.sh [RESULTS_DIR]      (default: $OUT when set, else bench/results/gpu)
# It runs: the Triton-versus-torch kernel tests on CUDA (resident and streamed from pinned
# host memory); the merge-throughput table for 1B-like and 7B-like shapes; pinned against
# device apply time on an 8B-like shape; a resident evaluation of the toy family with the
# transformers runtime. Everything it prints is also kept in RESULTS_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-${OUT:-bench/results/gpu}}
mkdir -p "$RESULTS"
LAYERS_1B=${LAYERS_1B:-16}
LAYERS_7B=${LAYERS_7B:-16}
LAYERS_8B=${LAYERS_8B:-12}  # resident and pinned side by side: both copies must fit
TOY_CANDIDATES=${TOY_CANDIDATES:-100}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/hotmerge-site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/hotmerge-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

status=0
step() { echo; echo "== $*"; }

step "environment" | tee "$RESULTS/environment.txt"
{
    date -u
    nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__); print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
    git rev-parse HEAD 2>/dev/null || true
} 2>&1 | tee -a "$RESULTS/environment.txt"

step "Triton kernels against the torch path on CUDA" | tee "$RESULTS/kernels.txt"
"$PY" -m pytest tests/test_kernels.py tests/test_sources.py -q -p no:cacheprovider -k "cuda or compile" 2>&1 | tee -a "$RESULTS/kernels.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "merge throughput, 1B-like ($LAYERS_1B layers)"
"$PY" bench/merge_bench.py --preset 1b --layers "$LAYERS_1B" --repeats 20 \
    --out "$RESULTS/merge_1b.json" 2>&1 | tee "$RESULTS/merge_1b.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "merge throughput, 7B-like ($LAYERS_7B layers)"
"$PY" bench/merge_bench.py --preset 7b --layers "$LAYERS_7B" --repeats 20 \
    --out "$RESULTS/merge_7b.json" 2>&1 | tee "$RESULTS/merge_7b.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "pinned against device sources, 8B-like ($LAYERS_8B layers): apply time and the host-link floor"
"$PY" bench/merge_bench.py --preset 8b --layers "$LAYERS_8B" --sources both --repeats 10 \
    --methods linear,task_arithmetic,ties,dare_ties,della,slerp \
    --out "$RESULTS/merge_8b_pinned.json" 2>&1 | tee "$RESULTS/merge_8b_pinned.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "resident evaluation of the toy family (transformers runtime, $TOY_CANDIDATES candidates)"
{
    "$PY" -m hotmerge toy build .cache/toy &&
    "$PY" -m hotmerge eval configs/toy.yaml --x0 --output "$RESULTS/toy_x0.json" &&
    "$PY" bench/soak.py --config configs/toy.yaml --candidates "$TOY_CANDIDATES" --out "$RESULTS/toy_resident.json"
} 2>&1 | tee "$RESULTS/toy.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo
echo "results in $RESULTS (status $status)"
exit $status
