#!/usr/bin/env bash
# Evaluate a quickstart run: WikiText-2 perplexity of teacher and student, the student's threshold x time-step
# sweep, and zero-shot scores of both, written under results/quickstart/ (JSON + Markdown + plot), with a
# summary.md that collects the tables and the commands that made them.
#
#   scripts/eval_quickstart.sh RUN_DIR   # RUN_DIR holds teacher/ and student/ (save_pretrained + tokenizer, directly
#                                        # or in model/ as the quickstart writes them)
#
# Environment: PYTHON (default: python), OUT (default: results/quickstart), LIMIT (items per zero-shot task;
# default: all), MAX_TOKENS (first tokens of WikiText-2 for perplexity; default: all),
# THRESHOLDS (default: 0.5,0.7,0.85,1.0,1.25), TIME_STEPS (default: 1,2,4).
set -euo pipefail

RUN_DIR=${1:?usage: scripts/eval_quickstart.sh RUN_DIR}
PYTHON=${PYTHON:-python}
OUT=${OUT:-results/quickstart}
THRESHOLDS=${THRESHOLDS:-0.5,0.7,0.85,1.0,1.25}
TIME_STEPS=${TIME_STEPS:-1,2,4}
LIMIT_ARGS=()
[[ -n "${LIMIT:-}" ]] && LIMIT_ARGS=(--limit "$LIMIT")
TOKEN_ARGS=()
[[ -n "${MAX_TOKENS:-}" ]] && TOKEN_ARGS=(--max-tokens "$MAX_TOKENS")
declare -A DIR
for model in teacher student; do
    if [[ -f "$RUN_DIR/$model/config.json" ]]; then DIR[$model]="$RUN_DIR/$model"
    elif [[ -f "$RUN_DIR/$model/model/config.json" ]]; then DIR[$model]="$RUN_DIR/$model/model"   # quickstart layout
    else echo "error: neither $RUN_DIR/$model nor $RUN_DIR/$model/model is a save_pretrained folder" >&2; exit 2
    fi
done

run() {
    echo "+ $*" | tee -a "$OUT/commands.txt" >&2
    "$@"
}

mkdir -p "$OUT"
: > "$OUT/commands.txt"
for model in teacher student; do
    run "$PYTHON" -m bispikclm eval ppl --model "${DIR[$model]}" "${TOKEN_ARGS[@]}" --out "$OUT/$model"
    run "$PYTHON" -m bispikclm eval zeroshot --model "${DIR[$model]}" --tasks paper,extra "${LIMIT_ARGS[@]}" \
        --out "$OUT/$model"
done
run "$PYTHON" -m bispikclm eval sweep --model "${DIR[student]}" --thresholds "$THRESHOLDS" \
    --time-steps "$TIME_STEPS" "${TOKEN_ARGS[@]}" --out "$OUT/student"

{
    echo "# Quickstart evaluation"
    echo
    echo "Run folder: \`$RUN_DIR\`. Commands (in order):"
    echo
    echo '```'
    cat "$OUT/commands.txt"
    echo '```'
    for model in teacher student; do
        echo
        echo "## $model: WikiText-2 perplexity (raw test, non-overlapping windows)"
        echo
        cat "$OUT/$model/ppl.md"
        echo
        echo "## $model: zero-shot accuracy (%)"
        echo
        cat "$OUT/$model/zeroshot.md"
    done
    echo
    echo "## student: perplexity (firing rate) by threshold and time steps"
    echo
    cat "$OUT/student/sweep.md"
    echo
    echo "![sweep](student/sweep.png)"
} > "$OUT/summary.md"
echo "wrote $OUT/summary.md" >&2
