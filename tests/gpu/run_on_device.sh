#!/usr/bin/env bash
# The device check: ONE command for a session lent a GPU (now an H200, 15 minutes of
# device time in all, at most 10 minutes a command, at most 8 files back):
#
#     bash tests/gpu/run_on_device.sh                 # everything, in at most 8 minutes
#     bash tests/gpu/run_on_device.sh --budget 300    # a shorter global budget (seconds)
#     bash tests/gpu/run_on_device.sh --only bench,ncu   # some steps (names below)
#     bash tests/gpu/run_on_device.sh --rehearse      # no GPU needed: every pytest command
#                                                     # collects, every step's command parses
#     bash tests/gpu/run_on_device.sh --list
#
# Steps, in this order, each capped by its own timeout AND by what is left of the
# global budget (a step that no longer fits is skipped and named in the summary);
# the caps add up to the default budget:
#
#   env        nvidia-smi, versions (Python, NumPy, CuPy, CUDA, driver, PyTorch, cuDNN),
#              tool paths, and a trivial RawKernel smoke test (compile, launch, read back)
#   kernels    every gpucnn kernel against the NumPy path on odd shapes: the cupy legs
#              of tests/test_kernels_conv.py, tests/test_kernels_step.py, tests/test_functional.py,
#              tests/test_kernels_tc.py and tests/test_precision.py (the tensor-core GEMMs in each
#              mode) and tests/test_folds.py (the fused loss and dense backward against the
#              unfused kernels), after compiling the four tensor-core modules in parallel
#   gpu-tests  python3 -m pytest -m gpu --timeout=60 (everything else marked gpu)
#   bench      gpucnn bench --device cuda, batch 64/256/1024: gpucnn eager, its train loop (eager)
#              and its CUDA graph against PyTorch eager (FP32 and its TF32 default)
#              and PyTorch as a CUDA graph; each conv kernel against cuDNN on the same shape
#   bench-kernels  gpucnn bench --device cuda --kernels, batch 64/1024, every precision mode: each GEMM
#              of a lenet5 step (conv fwd, bwd-input, bwd-weight; dense likewise), predicted (the static
#              model) and measured (CUDA-graph replays) beside PyTorch + cuDNN/cuBLAS; ~15-30 s
#   tta        gpucnn bench --time-to-accuracy 0.99: lenet5 on MNIST, the data on the GPU, 3 seeds
#   ncu        ncu --clock-control none on the conv kernels of a lenet5 step at batch 1024
#   memcheck   compute-sanitizer --tool memcheck on tests/gpu/sanitizer_cases.txt
#   racecheck  compute-sanitizer --tool racecheck on the same
#
# Everything goes to $OUT (the device tool brings it back; default /tmp/gpucnn-device),
# at most 8 files, named to be committed as they came back under
# bench/results/<gpu>-<date>/ (run.txt and the summary name that directory):
#   summary.txt   the steps' verdicts and the lines worth reading first (also printed last)
#   run.txt       the exact command, the git revision, the date, the host
#   versions.txt  the env step's output (GPU, driver, CUDA, CuPy, PyTorch, cuDNN)
#   bench.json, bench-kernels.json, tta.json, ncu-conv.txt, logs.tar.gz (every step's log and JUnit XML)
# The git revision is $GPUCNN_GIT_REV when set (the device tool copies the working tree, and
# whatever .git travels with it can be stale), else `git rev-parse HEAD`.
# Without a GPU (or a tool) a step says "skipped: ..." instead of failing.  nsys is not
# used (it does not work on the lent machine).
# Exit status: 0 when no step failed (skips are not failures), 1 otherwise, 2 for a usage error.
set -u
set -o pipefail

ALL_STEPS=(env kernels gpu-tests bench bench-kernels tta ncu memcheck racecheck)
# bench's cap gave 40 s to bench-kernels (bench took 17-26 s in the five H200 runs): the budget stays 480 s
declare -A CAP=([env]=30 [kernels]=75 [gpu-tests]=90 [bench]=80 [bench-kernels]=40 [tta]=40 [ncu]=50 [memcheck]=45 [racecheck]=30)
declare -A MIN=([env]=5 [kernels]=30 [gpu-tests]=30 [bench]=60 [bench-kernels]=20 [tta]=20 [ncu]=30 [memcheck]=25 [racecheck]=20)

BUDGET=0
for s in "${ALL_STEPS[@]}"; do BUDGET=$(( BUDGET + ${CAP[$s]} )); done   # 480 s
REHEARSE=0
COMMAND="bash tests/gpu/run_on_device.sh${*:+ $*}"
STEPS=("${ALL_STEPS[@]}")
while [ $# -gt 0 ]; do
    case "$1" in
        --budget) shift; BUDGET="${1:-}" ;;
        --budget=*) BUDGET="${1#--budget=}" ;;
        --only) shift; IFS=',' read -r -a STEPS <<< "${1:-}" ;;
        --only=*) IFS=',' read -r -a STEPS <<< "${1#--only=}" ;;
        --list) printf '%s\n' "${ALL_STEPS[@]}"; exit 0 ;;
        --rehearse) REHEARSE=1 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
case "$BUDGET" in ''|*[!0-9]*) echo "--budget needs a number of seconds, got '$BUDGET'" >&2; exit 2 ;; esac
for s in "${STEPS[@]}"; do
    case " ${ALL_STEPS[*]} " in *" $s "*) ;; *) echo "unknown step '$s'; steps: ${ALL_STEPS[*]}" >&2; exit 2 ;; esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT" || exit 2
OUT_DIR="${OUT:-/tmp/gpucnn-device}"
mkdir -p "$OUT_DIR/logs" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONDONTWRITEBYTECODE=1
PY="${PYTHON:-python3}"
SUMMARY="$OUT_DIR/summary.txt"
START=$SECONDS
FAILED=0
: > "$SUMMARY"

find_tool() {  # name -> path (PATH, then the usual CUDA install dirs)
    local p
    p="$(command -v "$1" 2>/dev/null)" && { echo "$p"; return 0; }
    for p in /usr/local/cuda/bin/"$1" /usr/local/cuda-*/bin/"$1" /usr/local/cuda*/compute-sanitizer/"$1" \
             /opt/nvidia/nsight-compute/*/"$1" /usr/local/cuda*/nsight-compute*/"$1"; do
        [ -x "$p" ] && { echo "$p"; return 0; }
    done
    return 1
}

HAVE_GPU=0
GPU_REASON="$("$PY" -c '
from gpucnn import backend
if backend.cuda_available():
    name = backend.cupy.cuda.runtime.getDeviceProperties(0)["name"]
    print("ok " + (name.decode() if isinstance(name, bytes) else name))
else:
    print(backend.cuda_unavailable_reason())' 2>&1 | tail -n 1)"
case "$GPU_REASON" in "ok "*) HAVE_GPU=1; GPU_NAME="${GPU_REASON#ok }" ;; *) GPU_NAME="no-gpu" ;; esac
[ "$REHEARSE" = 1 ] && HAVE_GPU=1   # every step rehearses its command, GPU or not
# where the results are committed: bench/results/<gpu>-<date>/, e.g. nvidia-h200-2026-12-04
RESULTS_NAME="$(echo "$GPU_NAME" | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9.' '-' | sed 's/^-*//; s/-*$//')-$(date -u +%F)"
REV="${GPUCNN_GIT_REV:-$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)}"
{
    echo "command   $COMMAND"
    echo "revision  $REV$( [ -n "${GPUCNN_GIT_REV:-}" ] && echo " (GPUCNN_GIT_REV: the device tool copies the working tree, its .git may be stale)")"
    echo "date      $(date -u +%FT%TZ)"
    echo "host      $(hostname), $(nproc) CPUs"
    echo "gpu       $GPU_NAME"
    echo "budget    ${BUDGET}s; steps ${STEPS[*]}"
    echo "results   bench/results/$RESULTS_NAME/ (commit this directory as it came back)"
} > "$OUT_DIR/run.txt"

# --------------------------------------------------------------------------- steps
# Each runs with $T (its timeout) and may set SKIP to report a skip.
tmo() { timeout -k 10 "$T" "$@"; }

step_env() {
    echo "date $(date -u +%FT%TZ)  host $(hostname)  cpus $(nproc)  git $REV"
    local smi; smi="$(find_tool nvidia-smi)" && tmo "$smi" --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
    for t in ncu compute-sanitizer; do echo "$t: $(find_tool "$t" || echo 'not found')"; done
    tmo "$PY" - <<'EOF'
import platform, sys
import numpy as np
print(f"python {sys.version.split()[0]} {platform.platform()}; numpy {np.__version__}")
try:
    import torch
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
          f"available {torch.cuda.is_available()}")
except Exception as exc:
    print(f"torch: {type(exc).__name__}: {exc}")
try:
    import cupy as cp
    cp.cuda.runtime.getDeviceCount()
except Exception as exc:
    print(f"no GPU for this run: {type(exc).__name__}: {exc}")
    sys.exit(0)
p = cp.cuda.runtime.getDeviceProperties(0)
name = p["name"].decode() if isinstance(p["name"], bytes) else p["name"]
print(f"cupy {cp.__version__}; runtime {cp.cuda.runtime.runtimeGetVersion()}, driver "
      f"{cp.cuda.runtime.driverGetVersion()}, nvrtc {cp.cuda.nvrtc.getVersion()}; {name}, cc "
      f"{p['major']}.{p['minor']}, {p['multiProcessorCount']} SMs, {p['totalGlobalMem'] / 2**30:.0f} GiB")
k = cp.RawKernel(r'extern "C" __global__ void twice(const float* x, float* y, int n) {'
                 r' int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) y[i] = 2.0f * x[i]; }', "twice")
x = cp.arange(1000, dtype=cp.float32)
y = cp.empty_like(x)
k((4,), (256,), (x, y, np.int32(1000)))
assert float(abs(y - 2 * x).max()) == 0.0
print("RawKernel smoke test: ok")
from gpucnn.cuda import loader
print(f"gpucnn kernels compiled: {len(loader.warmup())}")
EOF
}

PARITY=(tests/test_kernels_conv.py tests/test_kernels_step.py tests/test_functional.py tests/test_kernels_tc.py
        tests/test_precision.py tests/test_folds.py)
SANITIZER_CASES=()
while IFS= read -r line; do
    case "$line" in ''|'#'*) ;; *) SANITIZER_CASES+=("$line") ;; esac
done < "$ROOT/tests/gpu/sanitizer_cases.txt"

pytest_gpu() {  # the suite's pytest, marked gpu; --rehearse: collect only
    if [ "$REHEARSE" = 1 ]; then
        "$PY" -m pytest -q -p no:cacheprovider -m gpu --collect-only "$@" > /dev/null || return $?
        echo "collected: pytest -m gpu $*" | cut -c1-160
        return 0
    fi
    tmo "$PY" -m pytest -q -p no:cacheprovider -m gpu "$@"
}

gpucnn_bench() {  # gpucnn bench; --rehearse: the arguments parse (argparse stops at --help)
    if [ "$REHEARSE" = 1 ]; then "$PY" -m gpucnn bench "$@" --help > /dev/null && echo "parsed: gpucnn bench $*"; return; fi
    tmo "$PY" -m gpucnn bench "$@"
}

step_kernels() {
    # the four tensor-core modules take NVRTC ~15-20 s each: compile them side by side first
    # (into CuPy's on-disk cache, which the tests and bench-kernels then hit)
    if [ "$REHEARSE" != 1 ]; then
        local f
        for f in gemm_tc_tf32.cu gemm_tc_3xtf32.cu gemm_tc_bf16.cu gemm_tc_f16.cu; do
            tmo "$PY" -c "from gpucnn.cuda import loader; loader.get_module('$f')" &
        done
        wait
    fi
    pytest_gpu --timeout=60 --maxfail=10 --junitxml="$OUT_DIR/logs/kernels.xml" "${PARITY[@]}"
}

step_gpu_tests() {
    local deselect=()
    for f in "${PARITY[@]}"; do deselect+=(--ignore="$f"); done
    pytest_gpu --timeout=60 --durations=10 --junitxml="$OUT_DIR/logs/gpu-tests.xml" "${deselect[@]}" tests
}

step_bench() {
    gpucnn_bench --device cuda --batch-sizes 64 256 1024 --repeats 30 --warmup 5 --json "$OUT_DIR/bench.json"
}

step_bench_kernels() {
    gpucnn_bench --device cuda --kernels --batch-sizes 64 1024 --precision fp32,tf32,bf16,3xtf32,fp16 \
        --repeats 10 --warmup 3 --json "$OUT_DIR/bench-kernels.json"
}

step_tta() {
    gpucnn_bench --device cuda --time-to-accuracy 0.99 --seeds 3 --json "$OUT_DIR/tta.json"
}

NCU_STEPS_PY='
import sys, numpy as np, gpucnn
from gpucnn import backend, losses, models, optim
cp = backend.cupy
gpucnn.seed(0)
model = models.build("lenet5", device="cuda")
opt, loss = optim.SGD(model, lr=0.05, momentum=0.9), losses.SoftmaxCrossEntropy(check_labels=False)
tr = gpucnn.train.Trainer(model, loss, opt, batch_size=1024)
gpucnn.precision.using(sys.argv[2] if len(sys.argv) > 2 else "fp32").__enter__()
rng = np.random.default_rng(0)
x = cp.asarray(rng.standard_normal((1024, 1, 28, 28)).astype(np.float32))
y = cp.asarray(rng.integers(0, 10, 1024))
for _ in range(int(sys.argv[1])):
    tr.step(x, y)
cp.cuda.Device().synchronize()
print("lenet5 steps at batch 1024 done, precision", gpucnn.precision.current())
'

step_ncu() {
    if [ "$REHEARSE" = 1 ]; then "$PY" -c "import ast, sys; ast.parse(sys.argv[1])" "$NCU_STEPS_PY" && echo "parsed: the ncu script"; return; fi
    local ncu; ncu="$(find_tool ncu)" || { SKIP="ncu not found"; return 0; }
    # one step: conv1 fwd, conv2 fwd, conv2 bwd-weight (partial + reduce), conv2 bwd-input,
    # conv1 bwd-weight (partial + reduce) = 7 conv launches
    tmo "$ncu" --clock-control none -k regex:conv_ --launch-skip 7 --launch-count 7 \
        --section SpeedOfLight --section LaunchStats --section Occupancy --section MemoryWorkloadAnalysis \
        "$PY" -c "$NCU_STEPS_PY" 2 > "$OUT_DIR/ncu-conv.txt" 2>&1
    local rc=$?
    # then the tensor-core conv GEMMs of a bf16 step (5: conv1/conv2 forward and weight gradient,
    # conv2 input gradient), appended, in what is left of the cap (its own rc is only reported)
    echo "=== bf16: the tensor-core conv GEMMs of one lenet5 step at batch 1024" >> "$OUT_DIR/ncu-conv.txt"
    timeout -k 5 20 "$ncu" --clock-control none -k regex:gemm_tc_.*conv --launch-skip 5 --launch-count 5 \
        --section SpeedOfLight --section LaunchStats --section Occupancy \
        "$PY" -c "$NCU_STEPS_PY" 2 bf16 >> "$OUT_DIR/ncu-conv.txt" 2>&1 || echo "(bf16 ncu: rc $?)"
    grep -q ERR_NVGPUCTRPERM "$OUT_DIR/ncu-conv.txt" && { SKIP="no access to the performance counters"; return 0; }
    grep -E "conv_|gemm_tc_|Duration|Compute \(SM\) Throughput|Memory Throughput|Achieved Occupancy|Registers Per" \
        "$OUT_DIR/ncu-conv.txt" | head -n 80
    return $rc
}

step_sanitizer() {  # memcheck | racecheck
    if [ "$REHEARSE" = 1 ]; then pytest_gpu "${SANITIZER_CASES[@]}"; return; fi
    local san; san="$(find_tool compute-sanitizer)" || { SKIP="compute-sanitizer not found"; return 0; }
    # CuPy's memory pool off (tests/conftest.py): each array its own allocation, so an
    # out-of-bounds access is not hidden inside a larger pooled block
    GPUCNN_TEST_NO_CUPY_POOL=1 tmo "$san" --tool "$1" --error-exitcode 86 --print-limit 30 \
        "$PY" -m pytest -q -p no:cacheprovider -m gpu "${SANITIZER_CASES[@]}"
}

# --------------------------------------------------------------------------- driver
declare -A RESULT=()
for name in "${STEPS[@]}"; do
    left=$(( BUDGET - (SECONDS - START) ))
    log="$OUT_DIR/logs/$name.log"
    T=${CAP[$name]}; [ "$T" -gt "$left" ] && T=$left
    SKIP=""
    if [ "$name" != env ] && [ "$HAVE_GPU" != 1 ]; then
        SKIP="no GPU ($GPU_REASON)"
    elif [ "$T" -lt "${MIN[$name]}" ]; then
        SKIP="budget: ${left}s left of ${BUDGET}s"
    fi
    t0=$SECONDS
    if [ -z "$SKIP" ]; then
        echo "=== $name (timeout ${T}s)"
        case "$name" in
            env) step_env ;; kernels) step_kernels ;; gpu-tests) step_gpu_tests ;; bench) step_bench ;;
            bench-kernels) step_bench_kernels ;; tta) step_tta ;; ncu) step_ncu ;; memcheck) step_sanitizer memcheck ;;
            racecheck) step_sanitizer racecheck ;;
        esac > "$log" 2>&1
        rc=$?
        [ "$name" = env ] && cp "$log" "$OUT_DIR/versions.txt"
        tail -n 25 "$log"
    else
        rc=0
    fi
    dt=$(( SECONDS - t0 ))
    if [ -n "$SKIP" ]; then status="skipped: $SKIP"
    elif [ "$rc" -eq 0 ]; then status="ok"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMEOUT after ${T}s"; FAILED=1
    else status="FAILED (rc $rc)"; FAILED=1
    fi
    printf '%-10s %-52s %4ss\n' "$name" "$status" "$dt" >> "$SUMMARY"
done

# The lines worth reading first: pytest tallies, bench ratios, sanitizer verdicts.
{
    echo
    echo "results for bench/results/$RESULTS_NAME/ ($( [ "$REHEARSE" = 1 ] && echo "REHEARSAL: nothing ran on a GPU; " )revision $REV)"
    echo "total ${SECONDS}s of a ${BUDGET}s budget; logs in logs.tar.gz"
    for f in "$OUT_DIR"/logs/kernels.log "$OUT_DIR"/logs/gpu-tests.log; do
        [ -f "$f" ] && echo "$(basename "$f" .log): $(grep -E '[0-9]+ (passed|failed)' "$f" | tail -n 1)"
    done
    [ -f "$OUT_DIR/logs/bench.log" ] && grep -E '^\[|forward\+loss|train loop|CUDA graphs|TF32' "$OUT_DIR/logs/bench.log"
    [ -f "$OUT_DIR/logs/bench-kernels.log" ] && grep -E '^\[|GEMMs of a train step|MISMATCH|failed' \
        "$OUT_DIR/logs/bench-kernels.log"
    [ -f "$OUT_DIR/logs/tta.log" ] && grep -E 'seed [0-9]+:|reached in' "$OUT_DIR/logs/tta.log"
    for t in memcheck racecheck; do
        [ -f "$OUT_DIR/logs/$t.log" ] && echo "$t: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT_DIR/logs/$t.log" | tail -n 1)"
    done
} >> "$SUMMARY"
tar -czf "$OUT_DIR/logs.tar.gz" -C "$OUT_DIR" logs 2>/dev/null && rm -rf "$OUT_DIR/logs"
echo
echo "===================== summary ($OUT_DIR)"
cat "$SUMMARY"
exit $FAILED
