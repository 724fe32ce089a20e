#!/usr/bin/env bash
# One-command GPU check: on a fresh CUDA machine (one H100 / H200-class GPU, Python 3.12, the package
# index and nothing else) install what is needed, run the Triton / CUDA tests on the GPU and the
# benchmark table, and write everything to one folder. Budget: under 8 minutes.
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--skip-install] [--quick] [--dry-run] [--print-packages]
#
#   --out DIR          results folder (default gpu_check_results/<UTC date-time>)
#   --skip-install     use the current environment as it is
#   --quick            one head (896 x 151936) instead of two
#   --dry-run          print the commands, run nothing
#   --print-packages   print the packages the install step installs, one a line, and exit
#
# The folder gets: env.txt (GPU, driver, pip freeze), install.log, tests.txt + tests.xml (pytest on
# the GPU: every Triton-backend test, now on CUDA tensors, and the cuda-marked ones), bench.md
# (tables: log-probs forward and forward + backward, GRPO loss; bf16; D = 896 / V = 151936 and
# D = 4096 / V = 128256; every provider installed) and bench.json (every measurement), summary.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

# What the install step installs. torch from the index is its CUDA build on Linux x86_64; the peers
# are the benchmark's providers (each is skipped with a reason if it fails to import).
PACKAGES=(
  "torch==2.13.0"
  "triton"
  "setuptools" "wheel" "ninja" "pybind11"
  "transformers" "tokenizers" "safetensors" "tqdm" "matplotlib" "numpy"
  "pytest" "pytest-benchmark"
  "liger-kernel"
  "cut-cross-entropy"
  "trl==1.16.0"
)

out=""
skip_install=0
quick=0
dry=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || { echo "gpu_check: --out needs a directory" >&2; exit 2; }; out="$2"; shift 2 ;;
    --out=*) out="${1#--out=}"; shift ;;
    --skip-install) skip_install=1; shift ;;
    --quick) quick=1; shift ;;
    --dry-run) dry=1; shift ;;
    --print-packages) printf '%s\n' "${PACKAGES[@]}"; exit 0 ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$out" ] || out="gpu_check_results/$(date -u +%Y%m%d-%H%M%S)"

heads=(896x151936 4096x128256)
PROVIDERS=(ours materialize liger liger-flce cce trl-chunked)
[ "$quick" = 1 ] && heads=(896x151936)
PY=${PYTHON:-python}

run() {  # run (or print) one step, logging its command and wall time to summary.txt
  local name="$1"; shift
  if [ "$dry" = 1 ]; then echo "[$name] $*"; return 0; fi
  local t0=$(date +%s) rc=0
  echo "[$name] $*" | tee -a "$out/summary.txt"
  "$@" || rc=$?
  echo "[$name] exit $rc after $(( $(date +%s) - t0 )) s" | tee -a "$out/summary.txt"
  return 0  # keep going: a failing step is in the summary, the later steps still report
}

[ "$dry" = 1 ] || mkdir -p "$out"
echo "gpu_check: results -> $out"

if [ "$skip_install" = 0 ]; then
  run install bash -c "$PY -m pip install ${PACKAGES[*]} > '$out/install.log' 2>&1 && \
    GRPO_KERNELS_NO_EXT=1 $PY -m pip install --no-build-isolation --no-deps -e . >> '$out/install.log' 2>&1"
fi
run env bash -c "{ nvidia-smi || true; $PY -c 'import torch, triton; print(torch.__version__, torch.version.cuda, \
torch.cuda.get_device_name(0), triton.__version__)'; $PY -m pip freeze; } > '$out/env.txt' 2>&1"
# The Triton backend's tests run on CUDA tensors when a GPU is there (tests/conftest.py sets
# TRITON_INTERPRET only without one); the ahead-of-time compile test is for CPU-only CI.
# Step budgets (seconds) keep the whole check under 8 minutes after an install of ~2 minutes; a step
# that runs out says so in summary.txt (exit 124) and the next one still runs.
run tests bash -c "timeout 150 $PY -m pytest tests -q -x -p no:cacheprovider -k 'triton or cuda' \
  --ignore tests/test_triton_compile.py --junitxml '$out/tests.xml' > '$out/tests.txt' 2>&1"
# ours-torch (the portable fallback) is left out of the GPU table to stay in budget.
run bench bash -c "timeout 270 $PY benchmarks/run.py --device cuda --ops logprobs_fwd logprobs_fwd_bwd grpo_fwd_bwd \
  --dtypes bf16 --sizes 4096 8x512 --heads ${heads[*]} --providers ${PROVIDERS[*]} --repeats 5 --timeout 90 \
  --out '$out/bench.json' > '$out/bench.md' 2> '$out/bench.log'"
[ "$dry" = 1 ] || { tail -n 3 "$out/tests.txt" >> "$out/summary.txt" 2>/dev/null || true; cat "$out/summary.txt"; }
