#!/usr/bin/env bash
# One command for a session that has a CUDA GPU (e.g. the lent H100):
#
#     bash tests/gpu/run_on_device.sh              # everything that fits in --budget seconds
#     bash tests/gpu/run_on_device.sh --quick      # env + the gpu tests + memcheck only
#     bash tests/gpu/run_on_device.sh --only bench,nsys,ncu   # a second call for what was left
#     bash tests/gpu/run_on_device.sh --list       # the steps, in order
#
# Steps, in priority order (each guarded by `timeout`, each with a log under
# ${OUT:-/tmp/gpucnn-device}, so that the device tool brings them back):
#
#   env         nvidia-smi, Python / NumPy / CuPy / PyTorch versions, tool paths
#   gpu-tests   PYTHONPATH=. python3 -m pytest -m gpu            (tests/test_gpu.py, the
#               cupy half of tests/test_kernels_sim.py, the MNIST epoch; junit XML)
#   memcheck    compute-sanitizer --tool memcheck  python3 -m pytest -m gpu tests/test_functional.py ...
#   racecheck   ... --tool racecheck
#   initcheck   ... --tool initcheck
#   synccheck   ... --tool synccheck
#   suite       the rest of the suite: pytest -m "not gpu and (cudasim or not slow)"
#               (with gpu-tests this is the whole `gpu or cudasim or not slow` selection)
#   bench       python3 -m gpucnn bench --device cuda --batch-sizes 64 256 1024 (if gpucnn/bench.py)
#   nsys        nsys profile of `python3 -m gpucnn train --device cuda --epochs 1 --subset 4096 --nvtx`
#   ncu         ncu (speed of light, occupancy, memory, warp stats) on the conv2d kernels of
#               one lenet5 training step at batch 256 (8 launches)
#
# Time: a device call may run at most 10 minutes, so the script keeps a budget
# (--budget, default 560 s) and skips steps that no longer fit; the summary
# prints the `--only ...` command that runs what was skipped, for a second call.
# Each step's timeout is also capped by the time left.
#
# Without a GPU (or without a tool) every step that needs it reports
# "skipped: no GPU" / "skipped: <tool> not found" instead of failing.
# Exit status: 0 when no step failed (skips are not failures), 1 otherwise,
# 2 for a usage error.
set -u
set -o pipefail

ALL_STEPS=(env gpu-tests memcheck racecheck initcheck synccheck suite bench nsys ncu)
QUICK_STEPS=(env gpu-tests memcheck)

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

BUDGET=560
STEPS=("${ALL_STEPS[@]}")
SKIP_LIST=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) STEPS=("${QUICK_STEPS[@]}") ;;
        --only) shift; [ $# -gt 0 ] || { echo "--only needs a comma-separated list" >&2; exit 2; }
                IFS=',' read -r -a STEPS <<< "$1" ;;
        --only=*) IFS=',' read -r -a STEPS <<< "${1#--only=}" ;;
        --skip) shift; SKIP_LIST=",${1:-},";;
        --skip=*) SKIP_LIST=",${1#--skip=},";;
        --budget) shift; BUDGET="${1:-}";;
        --budget=*) BUDGET="${1#--budget=}";;
        --list) printf '%s\n' "${ALL_STEPS[@]}"; exit 0 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
case "$BUDGET" in ''|*[!0-9]*) echo "--budget needs a number of seconds, got '$BUDGET'" >&2; exit 2;; esac
for s in "${STEPS[@]}"; do
    case " ${ALL_STEPS[*]} " in *" $s "*) ;; *) echo "unknown step '$s'; steps: ${ALL_STEPS[*]}" >&2; exit 2;; esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT" || exit 2
OUT_DIR="${OUT:-/tmp/gpucnn-device}"
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
PY="${PYTHON:-python3}"
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
START=$SECONDS

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------
find_tool() {  # name -> path on stdout (PATH, then the usual CUDA / Nsight install dirs)
    local name="$1" p
    p="$(command -v "$name" 2>/dev/null)" && { echo "$p"; return 0; }
    for p in /usr/local/cuda/bin/"$name" /usr/local/cuda-*/bin/"$name" \
             /usr/local/cuda*/compute-sanitizer/"$name" \
             /opt/nvidia/nsight-systems/*/bin/"$name" /opt/nvidia/nsight-compute/*/"$name" \
             /usr/local/cuda*/nsight-compute*/"$name" /usr/local/cuda*/nsight-systems*/bin/"$name"; do
        [ -x "$p" ] && { echo "$p"; return 0; }
    done
    return 1
}

GPU_REASON=""
detect_gpu() {
    local msg
    msg="$("$PY" - <<'EOF' 2>&1
import sys
try:
    from gpucnn import backend
except Exception as exc:
    print(f"cannot import gpucnn: {exc!r}"); sys.exit(1)
if backend.cupy is None:
    print("CuPy is not installed"); sys.exit(1)
if not backend.cuda_available():
    print("CuPy sees no CUDA device"); sys.exit(1)
print("ok")
EOF
)"
    if [ $? -eq 0 ]; then HAVE_GPU=1; else HAVE_GPU=0; GPU_REASON="$(echo "$msg" | tail -n 1)"; fi
}

remaining() { echo $(( BUDGET - (SECONDS - START) )); }

# Each step function runs with $LOG as its log, $T as its timeout (seconds) and may set
# SKIP_REASON and return 0 to report a skip.  timeout(1) exits 124 (or 137 after -k).
tmo() { timeout -k 15 "$T" "$@"; }

declare -A STATUS=() SECS=() LOGS=()
STEP_NO=0
FAILED=0
LEFT_FOR_TIME=()

record() {  # step status seconds log
    STATUS[$1]="$2"; SECS[$1]="$3"; LOGS[$1]="$4"
    printf '%-10s  %-44s %5ss  %s\n' "$1" "$2" "$3" "${4#$OUT_DIR/}" >> "$SUMMARY"
}

# ---------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------
step_env() {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)   host: $(hostname)   cpus: $(nproc 2>/dev/null)"
    echo "repo: $ROOT   git: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo n/a)"
    local smi; smi="$(find_tool nvidia-smi)"
    if [ -n "$smi" ]; then
        tmo "$smi" || echo "nvidia-smi failed (rc $?)"
        tmo "$smi" --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit \
            --format=csv || true
    else
        echo "nvidia-smi: not found"
    fi
    tmo "$PY" - <<'EOF'
import platform, sys
print(f"python {sys.version.split()[0]} ({platform.platform()})")
def ver(mod):
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "?")
    except Exception as exc:
        return f"not importable ({type(exc).__name__}: {exc})"
for mod in ("numpy", "pytest", "hypothesis", "tqdm", "nvtx"):
    print(f"{mod}: {ver(mod)}")
try:
    import cupy as cp
    print(f"cupy: {cp.__version__}")
    try:
        n = cp.cuda.runtime.getDeviceCount()
        print(f"  devices: {n}; CUDA runtime {cp.cuda.runtime.runtimeGetVersion()}, "
              f"driver {cp.cuda.runtime.driverGetVersion()}")
        for i in range(n):
            p = cp.cuda.runtime.getDeviceProperties(i)
            name = p["name"].decode() if isinstance(p["name"], bytes) else p["name"]
            print(f"  [{i}] {name}: cc {p['major']}.{p['minor']}, {p['totalGlobalMem'] / 2**30:.1f} GiB, "
                  f"{p['multiProcessorCount']} SMs")
        print(f"  nvrtc {cp.cuda.nvrtc.getVersion()}")
    except Exception as exc:
        print(f"  no usable device: {type(exc).__name__}: {exc}")
except Exception as exc:
    print(f"cupy: not importable ({type(exc).__name__}: {exc})")
try:
    import torch
    print(f"torch: {torch.__version__}, CUDA {torch.version.cuda}, available {torch.cuda.is_available()}"
          + (f", {torch.cuda.get_device_name(0)}, cuDNN {torch.backends.cudnn.version()}"
             if torch.cuda.is_available() else ""))
except Exception as exc:
    print(f"torch: not importable ({type(exc).__name__}: {exc})")
try:
    import gpucnn
    from gpucnn import backend
    print(f"gpucnn {gpucnn.__version__}: cuda_available={backend.cuda_available()}")
except Exception as exc:
    print(f"gpucnn: not importable ({type(exc).__name__}: {exc})")
EOF
    local t p
    for t in compute-sanitizer nsys ncu; do
        if p="$(find_tool "$t")"; then
            echo "$t: $p ($("$p" --version 2>/dev/null | grep -iE 'version|[0-9]{4}\.[0-9]' | tail -n 1))"
        else
            echo "$t: not found"
        fi
    done
    echo "gpu for this run: $([ "$HAVE_GPU" = 1 ] && echo yes || echo "no ($GPU_REASON)")"
    return 0
}

step_gpu_tests() {
    tmo "$PY" -m pytest -q -m gpu -p no:cacheprovider --durations=15 --continue-on-collection-errors \
        --junitxml="$OUT_DIR/pytest-gpu.xml" tests
}

step_suite() {
    tmo "$PY" -m pytest -q -m "not gpu and (cudasim or not slow)" -p no:cacheprovider --durations=10 \
        --continue-on-collection-errors \
        --junitxml="$OUT_DIR/pytest-suite.xml" tests
}

SANITIZER=""
SAN_FLAGS=()
sanitizer_flags() {  # probe once which options this compute-sanitizer understands
    [ ${#SAN_FLAGS[@]} -gt 0 ] && return 0
    local help; help="$("$SANITIZER" --help 2>&1)"
    SAN_FLAGS=(--print-limit 50)
    case "$help" in *--error-exitcode*) SAN_FLAGS+=(--error-exitcode 86) ;; esac
}

step_sanitizer() {  # tool
    local tool="$1" extra=() help
    help="$("$SANITIZER" --help 2>&1)"
    if [ "$tool" = memcheck ]; then
        case "$help" in *--padding*) extra+=(--padding 64) ;; esac    # guard bytes after each allocation
    fi
    sanitizer_flags
    # every kernel on odd shapes: the GPU leg of the backend-parametrised op tests, pool off
    local cmd=("$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_functional.py tests/test_softmax_xent_kernels.py)
    echo "+ CUPY_GPU_MEMORY_LIMIT= $SANITIZER --tool $tool ${SAN_FLAGS[*]} ${extra[*]-} ${cmd[*]}"
    tmo "$SANITIZER" --tool "$tool" "${SAN_FLAGS[@]}" ${extra[@]+"${extra[@]}"} "${cmd[@]}"
}

step_bench() {
    tmo "$PY" -m gpucnn bench --device cuda --batch-sizes 64 256 1024 --json "$OUT_DIR/bench.json"
}

# A few lenet5 SGD steps on random data at batch 256 (no dataset, no tqdm): the
# workload for ncu, and for nsys when `gpucnn train` cannot run (tqdm missing).
TRAIN_STEPS_PY='
import sys, numpy as np, gpucnn
from gpucnn import backend, losses, models, nvtx, optim
cp = backend.cupy
nvtx.enable("--nvtx" in sys.argv)
gpucnn.seed(0)
model = models.build("lenet5", device="cuda")
opt, loss = optim.SGD(model, lr=0.05, momentum=0.9), losses.SoftmaxCrossEntropy(check_labels=False)
rng = np.random.default_rng(0)
x = cp.asarray(rng.standard_normal((256, 1, 28, 28)).astype(np.float32))
y = cp.asarray(rng.integers(0, 10, 256))
for step in range(int(sys.argv[1])):
    with nvtx.nvtx_range("train_step"):
        L = loss.forward(model.forward(x), y)
        model.backward(loss.backward(), input_grad=False)
        opt.step()
cp.cuda.Device().synchronize()
print(f"{sys.argv[1]} lenet5 steps at batch 256, last loss {float(L):.4f}")
'

have_tqdm() { "$PY" -c "import tqdm" >/dev/null 2>&1; }

step_nsys() {
    local nsys run rc
    nsys="$(find_tool nsys)" || { SKIP_REASON="nsys not found (PATH, /opt/nvidia/nsight-systems, /usr/local/cuda*)"; return 0; }
    run="$(mktemp -d)"
    local prog=("$PY" -m gpucnn train --device cuda --epochs 1 --subset 4096 --test-subset 1000 --nvtx
                --no-progress --out "$run/run" --overwrite)
    if ! have_tqdm; then
        echo "tqdm is not installed, so \`gpucnn train\` cannot run: profiling 50 training steps instead"
        prog=("$PY" -c "$TRAIN_STEPS_PY" 50 --nvtx)
    fi
    echo "+ nsys profile ... ${prog[*]:0:8}"
    tmo "$nsys" profile --trace=cuda,nvtx,osrt --sample=none --force-overwrite=true \
        -o "$OUT_DIR/nsys-train" "${prog[@]}"
    rc=$?
    if [ -f "$OUT_DIR/nsys-train.nsys-rep" ]; then
        # report names changed across nsys versions: try the new ones, then the old ones
        T=120 tmo "$nsys" stats --force-export=true --report cuda_gpu_kern_sum,nvtx_sum,cuda_api_sum \
            "$OUT_DIR/nsys-train.nsys-rep" \
        || T=120 tmo "$nsys" stats --report gpukernsum,nvtxsum,cudaapisum "$OUT_DIR/nsys-train.nsys-rep" \
        || echo "nsys stats failed (the .nsys-rep is in $OUT_DIR)"
        rm -f "$OUT_DIR"/nsys-train.sqlite
    fi
    rm -rf "$run"
    return $rc
}

step_ncu() {
    local ncu rc
    ncu="$(find_tool ncu)" || { SKIP_REASON="ncu not found (PATH, /opt/nvidia/nsight-compute, /usr/local/cuda*)"; return 0; }
    # the conv kernels of one lenet5 training step at batch 256 (real shapes): forward
    # conv1/conv2, then backward weight + bias of conv2, backward input of conv2, backward
    # weight + bias of conv1 (7 launches a step; 8 = one step and the next forward)
    tmo "$ncu" -k regex:conv2d --launch-count 8 --force-overwrite -o "$OUT_DIR/ncu-conv2d" \
        --section SpeedOfLight --section LaunchStats --section Occupancy \
        --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
        --section WarpStateStats --section SchedulerStats \
        "$PY" -c "$TRAIN_STEPS_PY" 2
    rc=$?
    if grep -q "ERR_NVGPUCTRPERM" "$LOG" 2>/dev/null; then
        SKIP_REASON="no access to GPU performance counters (ERR_NVGPUCTRPERM)"; return 0
    fi
    if [ -f "$OUT_DIR/ncu-conv2d.ncu-rep" ]; then
        T=120 tmo "$ncu" --import "$OUT_DIR/ncu-conv2d.ncu-rep" --page details \
            || echo "ncu --import failed (the .ncu-rep is in $OUT_DIR)"
    fi
    return $rc
}

# step -> "needs" (gpu, a tool) and default timeout (seconds); minimum time worth starting
declare -A NEEDS=([env]="" [gpu-tests]=gpu [memcheck]="gpu compute-sanitizer" [racecheck]="gpu compute-sanitizer"
                  [initcheck]="gpu compute-sanitizer" [synccheck]="gpu compute-sanitizer" [suite]=gpu
                  [bench]=gpu [nsys]=gpu [ncu]=gpu)
declare -A TIMEOUT=([env]=60 [gpu-tests]=360 [memcheck]=240 [racecheck]=240 [initcheck]=240 [synccheck]=240
                    [suite]=300 [bench]=240 [nsys]=240 [ncu]=240)
declare -A MIN_TIME=([env]=5 [gpu-tests]=120 [memcheck]=60 [racecheck]=60 [initcheck]=60 [synccheck]=60
                     [suite]=120 [bench]=90 [nsys]=90 [ncu]=60)

run_step() {
    local name="$1" log need left t0 rc status
    STEP_NO=$(( STEP_NO + 1 ))
    log="$OUT_DIR/$(printf '%02d' "$STEP_NO")-$name.log"
    LOG="$log"; SKIP_REASON=""
    echo "=== [$name] $(date -u +%H:%M:%S)  (elapsed $(( SECONDS - START )) s of $BUDGET s)"

    case ",$SKIP_LIST," in *",$name,"*) record "$name" "skipped: --skip" 0 "-"; echo "    skipped: --skip"; return;; esac
    for need in ${NEEDS[$name]}; do
        if [ "$need" = gpu ] && [ "$HAVE_GPU" != 1 ]; then
            record "$name" "skipped: no GPU ($GPU_REASON)" 0 "-"; echo "    skipped: no GPU ($GPU_REASON)"; return
        fi
        if [ "$need" = compute-sanitizer ]; then
            SANITIZER="$(find_tool compute-sanitizer)" || {
                record "$name" "skipped: compute-sanitizer not found" 0 "-"
                echo "    skipped: compute-sanitizer not found (PATH, /usr/local/cuda*/bin)"; return; }
        fi
    done
    left=$(remaining)
    if [ "$left" -lt "${MIN_TIME[$name]}" ]; then
        record "$name" "skipped: out of time budget" 0 "-"; LEFT_FOR_TIME+=("$name")
        echo "    skipped: ${left}s left of the ${BUDGET}s budget, needs ~${MIN_TIME[$name]}s"; return
    fi
    T=${TIMEOUT[$name]}
    [ "$T" -gt $(( left - 5 )) ] && T=$(( left - 5 ))

    t0=$SECONDS
    case "$name" in
        env) step_env ;;
        gpu-tests) step_gpu_tests ;;
        suite) step_suite ;;
        memcheck|racecheck|initcheck|synccheck) step_sanitizer "$name" ;;
        bench) step_bench ;;
        nsys) step_nsys ;;
        ncu) step_ncu ;;
    esac > "$log" 2>&1
    rc=$?
    local dt=$(( SECONDS - t0 ))
    if [ -n "$SKIP_REASON" ]; then
        status="skipped: $SKIP_REASON"
    elif [ $rc -eq 0 ]; then
        status="PASS"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        status="FAIL: timeout after ${T}s"; FAILED=1
    else
        status="FAIL: rc $rc"; FAILED=1
    fi
    # one-line extracts worth having in the summary
    local extra=""
    case "$name" in
        gpu-tests|suite) extra="$(grep -E '[0-9]+ (passed|failed|skipped|errors?|deselected)' "$log" | tail -n 1 | tr -d '=' | sed 's/^ *//; s/ *$//')" ;;
        memcheck|racecheck|initcheck|synccheck)
            extra="$(grep -E 'ERROR SUMMARY|checks passed' "$log" | sed -E 's/=+ ?//; s/^exercise_kernels \[[a-z]+\]: //; s/ in [0-9.]+ s$//' | tr '\n' ';' | sed 's/;$//; s/;/; /g')" ;;
    esac
    [ -n "$extra" ] && status="$status [${extra:0:120}]"
    record "$name" "$status" "$dt" "$log"
    echo "    $status  (${dt}s, log ${log#$OUT_DIR/})"
    if [ "$name" = env ] || [ "${status:0:4}" = FAIL ]; then
        tail -n 40 "$log" | sed 's/^/    | /'
    fi
}

# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------
detect_gpu
echo "gpucnn device run: steps ${STEPS[*]}; budget ${BUDGET}s; logs in $OUT_DIR"
[ "$HAVE_GPU" = 1 ] || echo "no GPU here ($GPU_REASON): every GPU step will be skipped"
for s in "${STEPS[@]}"; do
    run_step "$s"
done

echo
echo "================================ summary ================================"
printf '%-10s  %-44s %6s  %s\n' step status time log
cat "$SUMMARY"
echo "total $(( SECONDS - START ))s; logs and reports in $OUT_DIR"
if [ ${#LEFT_FOR_TIME[@]} -gt 0 ]; then
    joined="$(IFS=,; echo "${LEFT_FOR_TIME[*]}")"
    echo "left out for time; run them in another call:  bash tests/gpu/run_on_device.sh --only $joined"
    echo "--only $joined" > "$OUT_DIR/rerun.txt"
fi
if [ "$FAILED" -ne 0 ]; then
    echo "RESULT: some steps FAILED"
    exit 1
fi
echo "RESULT: no step failed"
exit 0
