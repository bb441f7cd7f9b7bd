#!/usr/bin/env bash
# The GPU check: run on a bare GPU machine (torch + CUDA + nvcc, no internet, no FlashInfer)
# from the repository root, with the bundle built here beforehand (`make gpu-bundle`, carried
# as gpu-bundle/, under 48 MiB). Steps, each time-boxed so the whole run stays under 8 minutes:
#   1. environment report (GPU, driver, torch)                      -> $OUT/env.txt
#   2. install the bundle (FlashInfer + its sm_90a modules, tvm-ffi, the CUDA helpers), and
#      build the native CPU ops against the machine's torch
#   3. the fuzz properties against the GPU paths, reference in float64 on the GPU,
#      and the CPU tests of the GPU path                            -> $OUT/fuzz.log, fuzz.xml
#   4. the kernel benchmark                              -> $OUT/kernels.json, kernels.txt, kernels.png
#   5. the page for docs/gpu-results.md                             -> $OUT/gpu-results.md
# Every step's start time goes to $OUT/steps.log; the exit status is the first failure's.
#
#   scripts/gpu_check.sh             the real run (OUT defaults to ./gpu-out)
#   scripts/gpu_check.sh --dry-run   the same steps on this machine's CPU: the bundle's checksums
#                                    are verified (if one is built) instead of installed, the GPU
#                                    properties skip, the benchmark runs its reduced CPU grid
# Environment: OUT, PYTHON (default python3), TREE_PRUNED_GPU_BUNDLE (default gpu-bundle),
# TREE_PRUNED_FUZZ_EXAMPLES (default 60, 5 in a dry run).
set -uo pipefail
cd "$(dirname "$0")/.."

dry_run=0
case "${1:-}" in
  --dry-run) dry_run=1 ;;
  "") ;;
  *) echo "usage: scripts/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac

OUT="${OUT:-./gpu-out}"
PYTHON="${PYTHON:-python3}"
BUNDLE="${TREE_PRUNED_GPU_BUNDLE:-gpu-bundle}"
SITE="${TMPDIR:-/tmp}/tree-pruned-site"
mkdir -p "$OUT"
# JIT off: the bundle carries every module the GPU path loads, and no kernel sources to compile.
export PYTHONUNBUFFERED=1 FLASHINFER_DISABLE_JIT=1 PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "$dry_run" = 1 ]; then
  export TREE_PRUNED_FUZZ_EXAMPLES="${TREE_PRUNED_FUZZ_EXAMPLES:-5}"
  bench_args=(--device cpu --batches 1,2 --tree-nodes 8 --contexts 64)
else
  export TREE_PRUNED_FUZZ_EXAMPLES="${TREE_PRUNED_FUZZ_EXAMPLES:-60}"
  bench_args=(--device cuda)
fi

start=$(date +%s)
status=0
step() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$OUT/steps.log"; }
record() {  # record STEP_NAME EXIT_CODE
  if [ "$2" != 0 ]; then
    step "$1 FAILED (exit $2)"
    [ "$status" = 0 ] && status=$2
  fi
}

step "environment (dry run: $dry_run)"
{
  date -u
  "$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  command -v nvcc >/dev/null && nvcc --version | tail -1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ "$dry_run" = 1 ]; then
  if [ -f "$BUNDLE/MANIFEST.json" ]; then
    step "verify the bundle in $BUNDLE and load its modules here"
    timeout 120 "$PYTHON" -m tree_attn_backend.ops.gpu_bundle install "$BUNDLE" --site "$SITE" --check-only 2>&1 | tee "$OUT/install.log"
    record "verify bundle" "${PIPESTATUS[0]}"
  else
    step "no bundle at $BUNDLE (make gpu-bundle builds one): nothing to verify"
  fi
else
  step "install the bundle from $BUNDLE"
  timeout 60 "$PYTHON" -m tree_attn_backend.ops.gpu_bundle install "$BUNDLE" --site "$SITE" 2>&1 | tee "$OUT/install.log"
  record "install" "${PIPESTATUS[0]}"
  "$PYTHON" -c 'import flashinfer; print("flashinfer", flashinfer.__version__)' 2>&1 | tee -a "$OUT/install.log"
  record "import flashinfer" "${PIPESTATUS[0]}"
fi

step "build the native CPU ops for this torch (the metadata builder's fast path; plan_us depends on it)"
timeout 90 "$PYTHON" -m tree_attn_backend.ops.csrc_build cpu 2>&1 | tail -3 | tee "$OUT/csrc_build.log"
record "csrc build" "${PIPESTATUS[0]}"

step "fuzz: GPU properties ($TREE_PRUNED_FUZZ_EXAMPLES examples each) and the GPU path's tests"
timeout 180 "$PYTHON" -m pytest -q -p no:cacheprovider fuzz/test_gpu_props.py tests/test_gpu_path.py \
  --junitxml "$OUT/fuzz.xml" 2>&1 | tee "$OUT/fuzz.log"
record "fuzz" "${PIPESTATUS[0]}"

step "kernel benchmark (${bench_args[*]})"
timeout 120 "$PYTHON" -m tree_attn_backend.cli bench kernels --json "${bench_args[@]}" > "$OUT/kernels.json" 2> "$OUT/bench.log"
record "bench" "$?"
"$PYTHON" -m tree_attn_backend.bench.kernels "$OUT/kernels.json" --plot "$OUT" | tee "$OUT/kernels.txt"
record "bench report" "${PIPESTATUS[0]}"

# What docs/gpu-results.md gets (with kernels.png) once a real run passes.
{
  echo "# GPU results: \`scripts/gpu_check.sh\` ($(date -u +%F))"
  echo
  echo '```'
  cat "$OUT/env.txt"
  echo '```'
  echo
  echo "## Fuzz (${TREE_PRUNED_FUZZ_EXAMPLES} examples per property)"
  echo
  echo '```'
  tail -5 "$OUT/fuzz.log"
  echo '```'
  echo
  echo "## Kernels (\`tree-pruned bench kernels\`, microseconds per layer)"
  echo
  grep -v '^wrote ' "$OUT/kernels.txt"
  echo
  echo '![kernels](kernels.png)'
} > "$OUT/gpu-results.md"

step "done: exit $status; results in $OUT"
exit "$status"
