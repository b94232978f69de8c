#!/usr/bin/env bash
# The GPU device check in one script, for whoever has a CUDA machine at hand: what
# `purireid doctor` sees, the embedded demo DAG on CUDA, the Market-1501 recipe's DAG for 2
# epochs on a small synthetic set, benchmarks/bench_gpu.py (the recipe at Market-1501 size),
# pseudo labels at N = 12,936 and 32,621, exact query search over 100,000 x 2048, and the group
# BatchNorm step cost (benchmarks/bench_batchnorm.py), and the trainer's step (bench_training.py,
# eager, and compiled in train.compile's default and CUDA-graph modes). About 13 minutes on one
# H200 in all; each part has a timeout and the whole a budget (GPU_CHECK_BUDGET, default 540 s,
# so the last parts may be skipped: --only picks them): a part that would start with less than
# 20 s left is skipped, and says so.
#
#   bash benchmarks/gpu_check.sh              # from the repository's root
#   bash benchmarks/gpu_check.sh --dry-run    # the plan and cheap checks only (any machine)
#   bash benchmarks/gpu_check.sh --only bench_gpu,batchnorm
#   bash benchmarks/gpu_check.sh --only step,step_compiled,batchnorm   # the step's host work
#
# Writes to "${OUT:-benchmarks/out/gpu_check}": gpu_check.log (everything, part by part),
# summary.txt (each part's status and seconds) and bench_gpu.json; the runs' own files go to
# "${WORK:-/tmp/purireid_gpu_check}".
#
# Preparation (docs/gpu.md). The GPU machine needs torch with CUDA; the workflow's other needs
# that such a machine may lack (Snakemake and its dependencies, jsonschema) travel as wheels in
# .whl/ at the repository's root, installed here first when that folder exists. On a machine
# with network, in the repository's root (for the nvidia-h200 machines: Python 3.12, x86-64):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#     $(grep -v -e '^#' -e connection-pool benchmarks/gpu_wheels.txt)
#   python3 -m pip wheel --no-deps --no-binary :all: -w .whl connection-pool==0.0.3   # no wheel on PyPI
# (about 26 MB), then run this script there with .whl carried along.

set -uo pipefail

DRY_RUN=0
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --only) ONLY=",$2,"; shift ;;
    --only=*) ONLY=",${1#--only=},";;
    -h|--help) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (--dry-run, --only part,...)" >&2; exit 2 ;;
  esac
  shift
done

cd "$(dirname "$0")/.." || exit 1
REPO=$PWD
OUT=${OUT:-benchmarks/out/gpu_check}
WORK=${WORK:-/tmp/purireid_gpu_check}
BUDGET=${GPU_CHECK_BUDGET:-540}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK"
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.txt"
: > "$LOG"
: > "$SUMMARY"
export PYTHONUNBUFFERED=1
START=$(date +%s)

note() { echo "$*" | tee -a "$LOG"; }

# part NAME TIMEOUT_S COMMAND: run COMMAND (a bash string) with its output in the log, within
# its timeout and what is left of the budget.
part() {
  local name=$1 limit=$2 cmd=$3
  if [ -n "$ONLY" ] && [[ $ONLY != *",$name,"* ]]; then return 0; fi
  local left=$(( BUDGET - ($(date +%s) - START) ))
  [ "$left" -lt "$limit" ] && limit=$left
  note ""
  note "=== $name (timeout ${limit} s, $(( $(date +%s) - START )) s into the check) ==="
  note "\$ $cmd"
  if [ "$DRY_RUN" = 1 ]; then
    echo "$name planned ${limit}s" >> "$SUMMARY"
    return 0
  fi
  if [ "$limit" -lt 20 ]; then
    note "skipped: the budget of ${BUDGET} s is spent"
    echo "$name skipped (budget)" >> "$SUMMARY"
    return 0
  fi
  local tic=$(date +%s)
  timeout -k 15 "$limit" bash -c "$cmd" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  local took=$(( $(date +%s) - tic ))
  local status="ok"
  [ "$rc" -ne 0 ] && status="FAILED (exit $rc)"
  [ "$rc" -eq 124 ] && status="TIMED OUT"
  note "--- $name: $status, ${took} s"
  echo "$name $status ${took}s" >> "$SUMMARY"
}

# --- environment: the carried wheels, purireid from this tree
if [ -d .whl ] && [ "$DRY_RUN" = 0 ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | tee -a "$LOG"
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

note "# purireid gpu_check: $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), budget ${BUDGET} s"
part environment 60 "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; \
  $PY -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.is_available())'; \
  $PY -c 'import snakemake, jsonschema; print(\"snakemake\", snakemake.__version__)' || echo 'no snakemake: the DAG parts will fail (carry .whl, see the header)'; \
  nproc; free -g | head -2"

part doctor 60 "$PY -m purireid.serving.cli doctor"

# The trainer's own step (train_one_epoch) at the Market-1501 recipe's shape on random images
# already on the GPU, eager: the headline (>= 5,000 images/s with bn_groups 4). Under
# torch.compile (train.compile: default and reduce-overhead = CUDA graphs): part step_compiled.
part step 120 "$PY benchmarks/bench_training.py --device cuda --amp --channels-last --archs resnet50 \
  --batch 256 --instances 16 --steps 20 --bn-groups 4 1 --no-epoch"

# The embedded demo (config.yaml: ResNet-18 64x32, synthetic 60 + 30 identities) on CUDA.
part demo_dag 150 "$PY -m snakemake --cores all --config device=cuda results_dir=$WORK/demo/results \
  data_root=$WORK/demo/data"

# The Market-1501 recipe (ResNet-50 256x128, batch 256, bn_groups 4, bf16, channels_last) on a
# small synthetic set: every rule of the paper's DAG on the GPU, 2 short epochs each.
cat > "$WORK/market_small.yaml" <<EOF
dataset: synthetic
device: cuda
data_root: $WORK/market/data
results_dir: $WORK/market/results
synthetic: {num_train_ids: 200, num_test_ids: 50, images_per_id: 17}
prepare: {check_counts: false}
model: {pretrained: none}
data: {workers: 8}
train: {epochs: 2, iters: 10, eval_every: 2}
EOF
part market_dag 150 "$PY -m snakemake --cores all --configfile config/presets/market1501.yaml $WORK/market_small.yaml"

# The recipe at Market-1501 size (751 + 750 identities x 17 images), 30 steps per epoch
# (the full 200-step epochs: drop --iters; < 8 min alone).
part bench_gpu 240 "$PY benchmarks/bench_gpu.py --device cuda --iters 30 --out $WORK/bench_gpu --json $OUT/bench_gpu.json"

part pseudo_labels 120 "$PY benchmarks/bench_pseudo_labels.py --n 12936 && \
  $PY benchmarks/bench_pseudo_labels.py --n 32621 --eps 0.7"

part search 60 "$PY - <<'PYEOF'
import time
import numpy as np
import torch
from purireid.serving.search import GalleryIndex

rng = np.random.default_rng(0)
ids = rng.standard_normal((5000, 2048), dtype=np.float32)
def unit(x): return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
gallery = unit(ids[rng.integers(0, 5000, 100_000)] + 0.8 * rng.standard_normal((100_000, 2048), dtype=np.float32))
queries = unit(ids[rng.integers(0, 5000, 1000)] + 0.8 * rng.standard_normal((1000, 2048), dtype=np.float32))
tic = time.perf_counter(); index = GalleryIndex(gallery, device='cuda'); build = time.perf_counter() - tic
index.search(queries[:1], 10)
one = []
for i in range(20):
    tic = time.perf_counter(); index.search(queries[i:i + 1], 10); one.append(time.perf_counter() - tic)
tic = time.perf_counter(); index.search(queries, 10); many = time.perf_counter() - tic
print(f'exact search, gallery 100,000 x 2048 on {torch.cuda.get_device_name()} (backend {index.backend}): '
      f'index {build:.2f} s; 1 query {1e3 * float(np.median(one)):.2f} ms (median of 20); 1,000 queries {1e3 * many:.0f} ms')
PYEOF"

part batchnorm 120 "$PY benchmarks/bench_batchnorm.py --device cuda --amp --arch resnet50 --height 256 --width 128 \
  --batch 256 --steps 5 --warmup 2"

# The same step compiled, in both of train.compile's modes, at bn_groups 4 and 1 (each compiles
# first, a minute or two, untimed): last, as it may take what is left of the budget.
part step_compiled 300 "$PY benchmarks/bench_training.py --device cuda --amp --channels-last --archs resnet50 \
  --batch 256 --instances 16 --steps 20 --bn-groups 4 1 --compile default reduce-overhead --no-eager --no-epoch"

if [ "$DRY_RUN" = 1 ]; then  # the cheap checks: imports, the scripts' options, both DAGs' configs
  DRY_RUN=0
  part dry_run_checks 120 "$PY -c 'import purireid.stages, purireid.serving.search' && \
    $PY benchmarks/bench_gpu.py --help >/dev/null && $PY benchmarks/bench_batchnorm.py --help >/dev/null && \
    $PY benchmarks/bench_training.py --help >/dev/null && \
    $PY benchmarks/bench_pseudo_labels.py --help >/dev/null && echo 'scripts and imports: ok' && \
    $PY -m snakemake -n --quiet rules --config device=cuda results_dir=$WORK/demo/results data_root=$WORK/demo/data && \
    $PY -m snakemake -n --quiet rules --configfile config/presets/market1501.yaml $WORK/market_small.yaml"
fi

note ""
note "=== summary ($(( $(date +%s) - START )) s in all) ==="
tee -a "$LOG" < "$SUMMARY"
grep -qE "FAILED|TIMED OUT" "$SUMMARY" && exit 1
exit 0
