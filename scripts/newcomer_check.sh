#!/usr/bin/env bash
# A new user's first hour, replayed: a fresh clone in a fresh venv under a temp dir, then README.md's
# commands (the blocks marked readme-command: set-up + first run, evaluation, tests) exactly as written,
# each timed. Exits non-zero at the first command that fails, with the end of its log.
#
#   scripts/newcomer_check.sh [SOURCE]     SOURCE: a git repository path or URL (default: this
#                                          checkout; its committed HEAD is what gets cloned)
#   PYTHON=python3.11 scripts/newcomer_check.sh     the interpreter the venv is made from
#
# It compiles advfast._C (with CUDA when a toolkit is found) and runs the whole test suite: expect
# 20-40 minutes on a 2-core machine. Logs and the clone stay in the temp dir it prints.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
source_repo=${1:-$here}
python=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/advfast-newcomer.XXXXXX")
echo "newcomer_check: working in $work"

git clone -q "$source_repo" "$work/clone"
cd "$work/clone"
echo "newcomer_check: cloned $source_repo at $(git rev-parse --short HEAD)"
"$python" -m venv "$work/venv"
# shellcheck disable=SC1091
source "$work/venv/bin/activate"
"$python" scripts/readme_commands.py > "$work/commands.txt"

timings=()
step=0
total_start=$(date +%s)
while IFS= read -r cmd; do
    step=$((step + 1))
    log="$work/step$step.log"
    echo "newcomer_check: [$step] $cmd"
    start=$(date +%s)
    if bash -c "$cmd" > "$log" 2>&1 < /dev/null; then
        took=$(( $(date +%s) - start ))
        timings+=("$(printf '%6d s  %s' "$took" "$cmd")")
        echo "newcomer_check: [$step] ok in $took s"
    else
        rc=$?
        echo "newcomer_check: [$step] FAILED (exit $rc) after $(( $(date +%s) - start )) s: $cmd" >&2
        tail -n 40 "$log" >&2
        echo "newcomer_check: full log: $log" >&2
        exit 1
    fi
done < "$work/commands.txt"

echo "newcomer_check: all $step README commands succeeded in $(( $(date +%s) - total_start )) s"
printf '%s\n' "${timings[@]}"
echo "torch $(python -c 'import torch; print(torch.__version__)'); advfast._C built with CUDA: $(cd / && python -c 'import torch, advfast._C; print(torch.ops.advfast.built_with_cuda())')"
