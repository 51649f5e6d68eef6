#!/usr/bin/env bash
# Everything wsurgery checks on a CUDA GPU, in one run with a time budget (GPU time is scarce here).
# In an environment with wsurgery installed (`pip install -e '.[dev]'`) on a machine with a GPU:
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # default benchmarks/results/gpu
#   DEADLINE_S=900 bash benchmarks/gpu_check.sh   # total budget in seconds (default 600)
#   SKIP="perf_compiled demo" bash benchmarks/gpu_check.sh   # leave out steps by name
#
# Steps, each with its own time limit, logged to OUT_DIR/<step>.log and summed up in OUT_DIR/summary.txt:
#   1. cuda_tests: tests/test_cuda.py and the CUDA cases of tests/test_perf_paths.py (torch.compile path);
#   2. perf: benchmarks/perf.py --device cuda (bf16 autocast, channels_last) -> OUT_DIR/perf_cuda.json,
#      and its opt-in section with whole models under torch.compile -> OUT_DIR/perf_cuda_compiled.json;
#   3. demo: `wsurgery demo` (real weights, real data; its fine-tune runs on the GPU) -> OUT_DIR/demo.json;
#   4. suite: the rest of the test suite (the architecture sweep included) with the GPU visible, in
#      whatever time is left.
set -uo pipefail
cd "$(dirname "$0")/.."
# a new dated folder by default: benchmarks/results/gpu holds the committed runs and their notes
OUT_DIR=${1:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}
DEADLINE_S=${DEADLINE_S:-600}
mkdir -p "$OUT_DIR"
start=$(date +%s)
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"

left() { echo $((DEADLINE_S - ($(date +%s) - start))); }

step() { # step NAME LIMIT_S CMD...: run with a time limit, log, record the exit code and the seconds taken
  local name=$1 limit=$2 t0 rc
  shift 2
  if [[ " ${SKIP:-} " == *" $name "* ]]; then
    echo "$name: skipped (SKIP)" | tee -a "$SUMMARY"
    return
  fi
  t0=$(date +%s)
  if ((limit > $(left))); then limit=$(left); fi
  if ((limit < 20)); then
    echo "$name: skipped, no time left" | tee -a "$SUMMARY"
    return
  fi
  PYTHONUNBUFFERED=1 timeout -k 10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  rc=$?
  echo "$name: rc=$rc in $(($(date +%s) - t0)) s (limit $limit s)" | tee -a "$SUMMARY"
  tail -n 12 "$OUT_DIR/$name.log"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__,
'|', torch.cuda.get_device_name(0), '| cuda devices:', torch.cuda.device_count(), '| nccl:', torch.cuda.nccl.version())"
  nproc
} 2>&1 | tee -a "$SUMMARY"

step cuda_tests 240 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_perf_paths.py -k "cuda"
step perf 300 python3 benchmarks/perf.py --device cuda --out "$OUT_DIR/perf_cuda.json"
step perf_compiled 240 python3 benchmarks/perf.py --device cuda --sections compiled --out "$OUT_DIR/perf_cuda_compiled.json"
demo_dir=$(mktemp -d)
step demo 150 python3 -m wsurgery demo -o "$demo_dir/demo"
cp "$demo_dir"/demo/*.json "$OUT_DIR/" 2>/dev/null
rm -rf "$demo_dir"
step suite 600 python3 -m pytest -q -p no:cacheprovider -n 12 --sweep --maxfail=30 -rf --ignore tests/test_cuda.py tests
echo "total $(($(date +%s) - start)) s" | tee -a "$SUMMARY"
