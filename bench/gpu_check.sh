#!/usr/bin/env bash
# One-command GPU check: build, GPU tests, kernel benchmarks, method benchmarks; every result and log
# goes to bench/results/<device>-<date>-*, with a summary of what passed. Meant to finish in under
# 8 minutes on an H100 (each stage has its own time limit; see bench/results/README.md for the subset
# it runs and why). Exits non-zero if any stage fails or runs out of time, after writing what it has.
#
#   bench/gpu_check.sh                 # from anywhere; runs in the repository root
#   bench/gpu_check.sh --skip-build    # advfast already installed (e.g. pip install -e .)
#   bench/gpu_check.sh --dry-run       # print the commands and write nothing (works without a GPU)
#
# Environment: PYTHON (default python), GPU_CHECK_METHODS (default acl), GPU_CHECK_DEVICE_NAME
# (the short name in file names; default from nvidia-smi, e.g. h100), GPU_CHECK_BUDGET_<STAGE> in
# seconds for build, gpu_tests, kernels, methods (defaults 170, 90, 80, 120: 7m40s in all; the time
# a stage leaves unused goes to the next one).
set -u -o pipefail

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }

DRY=0
SKIP_BUILD=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        --skip-build) SKIP_BUILD=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown option '$arg' (use --dry-run, --skip-build or --help)" >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python}
METHODS=${GPU_CHECK_METHODS:-acl}
BUDGET_build=${GPU_CHECK_BUDGET_BUILD:-170}
BUDGET_gpu_tests=${GPU_CHECK_BUDGET_GPU_TESTS:-90}
BUDGET_kernels=${GPU_CHECK_BUDGET_KERNELS:-80}
BUDGET_methods=${GPU_CHECK_BUDGET_METHODS:-120}
SLACK=0  # seconds earlier stages left unused

# "NVIDIA H100 80GB HBM3" -> h100, "NVIDIA A100-SXM4-80GB" -> a100; anything else: the whole name, sanitised
short_device_name() {
    local name
    name=$(printf '%s' "$1" | tr '[:upper:]' '[:lower:]' | sed -E 's/nvidia//; s/[^a-z0-9]+/-/g; s/^-+|-+$//g')
    if [[ "$name" =~ ^([a-z]+[0-9]+)(-|$) ]]; then
        printf '%s' "${BASH_REMATCH[1]}"
    else
        printf '%s' "${name:-unknown-gpu}"
    fi
}

if [[ -n "${GPU_CHECK_DEVICE_NAME:-}" ]]; then
    GPU_NAME=$GPU_CHECK_DEVICE_NAME
elif GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1) && [[ -n "$GPU_NAME" ]]; then
    :
elif [[ $DRY == 1 ]]; then
    GPU_NAME="dry-run"
else
    echo "gpu_check.sh: no NVIDIA GPU found (nvidia-smi failed); this check needs one (try --dry-run)" >&2
    exit 2
fi
DEV=$(short_device_name "$GPU_NAME")
OUT=bench/results
P="$OUT/$DEV-$(date -u +%F)"
SUMMARY="$P-summary.md"
FAILED=0
BUILD_FAILED=0
START=$SECONDS

# run_stage NAME LOG CMD...: CMD under the stage's time limit (its budget plus what earlier stages left),
# its output in LOG, one summary row.
run_stage() {
    local name=$1 log=$2
    shift 2
    local budget_var="BUDGET_$name"
    local budget=$(( ${!budget_var} + SLACK ))
    if [[ $DRY == 1 ]]; then
        printf '[%s, %ss] ' "$name" "$budget"; printf '%q ' "$@"; printf '> %s\n' "$log"
        return 0
    fi
    if [[ $BUILD_FAILED == 1 ]]; then
        printf '| %s | skipped (the build failed: it would test a stale install) | 0 | |\n' "$name" >> "$SUMMARY"
        return 1
    fi
    echo "== $name (limit ${budget}s): $(printf '%q ' "$@")" >&2
    local t0=$SECONDS rc status
    timeout --signal=INT --kill-after=15 "$budget" "$@" > "$log" 2>&1
    rc=$?
    case $rc in
        0) status="ok" ;;
        124|137) status="TIMED OUT after ${budget}s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    [[ $rc == 0 ]] || FAILED=1
    SLACK=$(( budget > SECONDS - t0 ? budget - (SECONDS - t0) : 0 ))
    printf '| %s | %s | %d | `%s` |\n' "$name" "$status" $((SECONDS - t0)) "$(basename "$log")" >> "$SUMMARY"
    echo "   $name: $status in $((SECONDS - t0))s (log: $log)" >&2
    tail -n 3 "$log" >&2
    return $rc
}

if [[ $DRY == 0 ]]; then
    mkdir -p "$OUT"
    {
        echo "# GPU check: $GPU_NAME, $(date -u '+%F %H:%M UTC')"
        echo
        echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with local changes)'); methods benchmarked: $METHODS"
        echo
        echo '```'
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
        "$PY" -c "import torch, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| cudnn', torch.backends.cudnn.version(), '| device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA DEVICE VISIBLE TO TORCH')" 2>&1
        "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
        echo '```'
        echo
        echo "| stage | result | seconds | log |"
        echo "| --- | --- | --- | --- |"
    } > "$SUMMARY"
fi

if [[ $SKIP_BUILD == 0 ]]; then
    # -v: the log shows the nvcc arch flags; MAX_JOBS: ninja may use every core
    MAX_JOBS=${MAX_JOBS:-$(nproc)} run_stage build "$P-build.log" \
        "$PY" -m pip install -v --no-build-isolation . || BUILD_FAILED=1
    if [[ $DRY == 0 && $BUILD_FAILED == 0 ]]; then
        # the build must have produced the CUDA kernels, not a CPU-only extension
        if ! "$PY" -c "import torch, advfast._C; assert torch.ops.advfast.built_with_cuda(), 'advfast._C was built without CUDA'" >> "$P-build.log" 2>&1; then
            printf '| build | FAILED (advfast._C has no CUDA kernels: is nvcc on PATH / CUDA_HOME set?) | 0 | `%s` |\n' \
                "$(basename "$P-build.log")" >> "$SUMMARY"
            FAILED=1
            BUILD_FAILED=1
        fi
    fi
fi

# from the repository root the tests import the installed package (pyproject: --import-mode=importlib)
run_stage gpu_tests "$P-gpu-tests.log" "$PY" -m pytest -m gpu tests -q -p no:cacheprovider \
    --junitxml="$P-gpu-tests.xml"

# the kernels: pgd_step, ema_update, contrastive losses at B512 and K4096/K65536, augmentation at 32x32
# (76 of the 126 benchmarks; the per-method throughput is the next stage)
run_stage kernels "$P-kernels.log" "$PY" -m pytest bench --benchmark-only -q -p no:cacheprovider \
    --ignore=bench/test_bench_methods.py -k "not B256 and not K32768 and not 96" \
    --bench-summary "$P-kernels.md" --benchmark-json "$P-kernels.json"

# a representative subset (see bench/results/README.md): fewer repeats than the default, warm-up enough
# for compilation and for the CUDA graphs' capture (2 eager calls, then capture)
run_stage methods "$P-methods.log" "$PY" -m advfast.bench.cli --methods "$METHODS" \
    --configs eager,fast,fast-graphs --warmup 3 --steps 5 --repeats 3 \
    --json "$P-methods.json" --markdown "$P-methods.md"

if [[ $DRY == 1 ]]; then
    echo "dry run: results would go to $P-*" >&2
    exit 0
fi
[[ $BUILD_FAILED == 1 ]] && FAILED=1
{
    echo
    echo "total: $((SECONDS - START)) s; $([[ $FAILED == 0 ]] && echo 'every stage passed' || echo 'SOME STAGES FAILED')"
} >> "$SUMMARY"
echo "gpu_check.sh: $((SECONDS - START)) s; summary in $SUMMARY" >&2
cat "$SUMMARY"
exit $FAILED
