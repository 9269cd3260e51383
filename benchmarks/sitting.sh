#!/usr/bin/env bash
# One device sitting of the benchmarks that span sessions, inside a time budget, resumable.
#
#   JOB_SECONDS=1500 TOKENS=/data/tokens TOKENIZER=/data/gpt2-tokenizer \
#     ROWS="0.2 sparse_gpt2_fit_domain;0.4 sparse_gpt2_all" bash benchmarks/sitting.sh
#   SMOKE=1 JOB_DIR=/tmp/sitting bash benchmarks/sitting.sh        # the same steps on the CPU, tiny (a minute)
#   HOST_STEPS= SPEED="ffn --ffn-args '--ratios 0.4'; decode --decode-args '--modes cuda_graphs'" ...  # speed only
#
# Steps, in order, each stopped by its share of the budget (a step cut short leaves what it finished):
#   1. host work per block (profile_host, eager and --compile: its narrow compiled default), capped; the
#      profiles in HOST_STEPS ("eager compiled" by default, empty: none);
#   2. the healing curve: the committed healing_curve.json is copied into $JOB_DIR/curve (once: a second
#      call in the same JOB_DIR resumes it), the dense reference is trained or reused in $JOB_DIR/ref and
#      checked against the stored rows'; each item of ROWS ("RATIO METHOD", ';'-separated) then heals as
#      its own call until TAIL_S seconds are left. If the retrained reference is refused (it drifted), the
#      rows go into $JOB_DIR/curve_new, a new curve, instead;
#   3. EXTRA_STEPS: any other commands (';'-separated, each its own step extra_N, run by bash in the
#      repository with $JOB_DIR set; e.g. a kernel sweep or the kernel tests on the GPU);
#   4. the speed rows: one bench_all call per item of SPEED (';'-separated, each "SECTIONS [FLAGS...]" with
#      shell quoting, e.g. "ffn --ffn-args '--ratios 0.4'"), in that order, each with what is left.
# Everything lands in $JOB_DIR: logs (sitting.log, one per step), host_cost*.json, curve/, speed_N.json
# (N: the item of SPEED).
# Commit what it measured by copying those into docs/benchmarks/results/ and the curve folder.
#
# Environment: JOB_SECONDS (budget, default 1500), JOB_DIR (default ./sitting), TOKENS (a folder with
# train.npy and validation.npy, or .npy.xz, from `sparse-gpt2 prepare-tokens`), TOKENIZER (GPT-2's BPE
# folder, to train the reference), ROWS, TAIL_S (seconds kept for steps 3-4, default 170), HOST_STEPS, EXTRA_STEPS, SPEED
# (default "decode,e2e"), WHEELS (optional folder of wheels installed
# first with --no-deps into $JOB_DIR/site, for a machine image that lacks some of the dependencies).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
START=$(date +%s)
JOB_SECONDS=${JOB_SECONDS:-1500}
JOB_DIR=$(realpath -m "${JOB_DIR:-sitting}")
export JOB_DIR  # EXTRA_STEPS write their outputs under it
TAIL_S=${TAIL_S:-170}
HOST_STEPS=${HOST_STEPS-eager compiled}
SPEED=${SPEED-decode,e2e}
SMOKE=${SMOKE:-}
LOG=$JOB_DIR/sitting.log

die() { echo "sitting.sh: $*" >&2; exit 2; }  # bad input, before anything is written
left() { echo $((JOB_SECONDS - ($(date +%s) - START))); }
say() { echo "[$(date +%T) +$(($(date +%s) - START))s] $*" | tee -a "$LOG"; }
step() {  # step NAME CAP_SECONDS COMMAND...: the command with its output in NAME.log, killed after CAP_SECONDS
    local name=$1 cap=$2
    shift 2
    [ "$cap" -le "$(left)" ] || cap=$(left)
    if [ "$cap" -le 5 ]; then
        say "$name: skipped, budget spent"
        return 1
    fi
    say "$name: start (cap ${cap}s): $*"
    timeout --signal=INT --kill-after=20 "$cap" "$@" >"$JOB_DIR/$name.log" 2>&1
    local rc=$?
    say "$name: rc=$rc"
    return $rc
}

if [ -n "$SMOKE" ]; then
    CURVE_FLAGS=(--smoke --tokens 64,128 --calibration_samples 10 --max_eval_tokens 256)
    HOST_FLAGS=(--smoke)
    SPEED_FLAGS=(--tiny --device cpu)
    SEED_CURVE=""  # a tiny random reference: the committed rows are not its rows
else
    [ -n "${TOKENS:-}" ] || die "TOKENS: not set (a folder with train.npy and validation.npy, or .npy.xz)"
    for split in train validation; do
        [ -f "$TOKENS/$split.npy" ] || [ -f "$TOKENS/$split.npy.xz" ] || die "TOKENS: no $split.npy or $split.npy.xz in $TOKENS"
    done
    [ -n "${TOKENIZER:-}" ] && [ -f "$TOKENIZER/vocab.json" ] || die "TOKENIZER: not a folder with GPT-2's vocab.json and merges.txt"
    XZ_TOKENS=""
    if [ ! -f "$TOKENS/train.npy" ]; then  # compressed: decompressed below, once, into $JOB_DIR/tokens
        XZ_TOKENS=$TOKENS TOKENS=$JOB_DIR/tokens
    fi
    CURVE_FLAGS=(--train_tokens "$TOKENS/train.npy" --validation_tokens "$TOKENS/validation.npy"
                 --tokenizer_name_or_path "$TOKENIZER" --loss_impl liger)
    HOST_FLAGS=(--device cuda --rounds 4)
    SPEED_FLAGS=()
    SEED_CURVE=docs/benchmarks/results/healing_curve/healing_curve.json
fi

for host in $HOST_STEPS; do
    [ "$host" = eager ] || [ "$host" = compiled ] || die "HOST_STEPS: '$host' is neither eager nor compiled"
done
IFS=';' read -ra speed_items <<<"$SPEED"
speed_words=()  # one line per item: its words, tab-separated, as the shell would split them
for item in "${speed_items[@]}"; do
    [ -n "${item// /}" ] || continue
    words=$(python3 -c 'import shlex, sys; print("\t".join(shlex.split(sys.argv[1])))' "$item" 2>/dev/null) \
        || die "SPEED: cannot split '$item' into words (unbalanced quotes?)"
    speed_words+=("$words")
done
[ -z "${WHEELS:-}" ] || compgen -G "$WHEELS/*.whl" >/dev/null || die "WHEELS: no .whl files in $WHEELS"
mkdir -p "$JOB_DIR" || die "JOB_DIR: cannot create $JOB_DIR"
if [ -n "${WHEELS:-}" ]; then
    python -m pip install -q --no-deps --target "$JOB_DIR/site" "$WHEELS"/*.whl >>"$LOG" 2>&1 || { say "WHEELS: could not install the wheels in $WHEELS"; exit 2; }
fi
export PYTHONPATH="${WHEELS:+$JOB_DIR/site:}$REPO${PYTHONPATH:+:$PYTHONPATH}"
say "sitting in $JOB_DIR, budget ${JOB_SECONDS}s, commit $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo ' + uncommitted changes')"

if [ -n "${XZ_TOKENS:-}" ]; then
    mkdir -p "$TOKENS"
    for split in train validation; do
        src=$XZ_TOKENS/$split.npy.xz dst=$TOKENS/$split.npy
        [ -f "$dst" ] || { xz -dc "$src" >"$dst.tmp" && mv "$dst.tmp" "$dst"; } || { say "TOKENS: could not decompress $src"; exit 2; }
    done
fi
CURVE_FLAGS+=(--work_dir "$JOB_DIR/ref")

# 1. host work per block
for host in $HOST_STEPS; do
    if [ "$host" = eager ]; then
        step host_eager 100 python -m benchmarks.profile_host "${HOST_FLAGS[@]}" --output "$JOB_DIR/host_cost.json"
    elif [ -z "$SMOKE" ]; then  # compiling its variants takes minutes: not in a smoke run
        step host_compiled 170 python -m benchmarks.profile_host "${HOST_FLAGS[@]}" --compile --output "$JOB_DIR/host_cost_compiled.json"
    fi
done

# 2. the healing curve
CURVE=$JOB_DIR/curve
mkdir -p "$CURVE"
if [ -n "$SEED_CURVE" ] && [ ! -f "$CURVE/healing_curve.json" ]; then
    cp "$SEED_CURVE" "$CURVE/"
fi
if [ -n "${ROWS:-}" ]; then
    # the reference: trained (or reused) and checked against the stored rows', healing nothing yet
    items=()
    if step curve_reference $(($(left) - TAIL_S)) python benchmarks/bench_healing_curve.py "${CURVE_FLAGS[@]}" \
        --out_dir "$CURVE" --methods prune_ls --ratios 0.4 --budget_s 1; then
        IFS=';' read -ra items <<<"$ROWS"
    elif grep -qs "differs by" "$JOB_DIR/curve_reference.log"; then
        say "the retrained reference drifted from the stored rows': this sitting's rows go to a new curve, $JOB_DIR/curve_new"
        CURVE=$JOB_DIR/curve_new
        IFS=';' read -ra items <<<"$ROWS"
    else
        say "no reference checked (see curve_reference.log): no curve rows this sitting"
    fi
    for item in "${items[@]}"; do
        read -r ratio method <<<"$item"
        [ -n "${method:-}" ] || { say "ROWS: '$item' is not 'RATIO METHOD'"; continue; }
        budget=$(($(left) - TAIL_S))  # the row stops itself (with a checkpoint) by its budget; the cap is a guard
        [ "$budget" -gt 5 ] || { say "curve_${method}_$ratio: skipped, budget spent"; continue; }
        step "curve_${method}_$ratio" $((budget + 60)) python benchmarks/bench_healing_curve.py "${CURVE_FLAGS[@]}" \
            --out_dir "$CURVE" --methods "$method" --ratios "$ratio" --budget_s "$budget" || true
    done
fi

# 3. other commands
IFS=';' read -ra extra_items <<<"${EXTRA_STEPS:-}"
n=0
for item in "${extra_items[@]}"; do
    [ -n "${item// /}" ] || continue
    n=$((n + 1))
    step "extra_$n" $(($(left) - 20)) bash -c "$item" || true
done

# 4. the speed rows
n=0
for words in "${speed_words[@]}"; do
    n=$((n + 1))
    IFS=$'\t' read -ra item <<<"$words"
    step "speed_$n" $(($(left) - 20)) python -m benchmarks.bench_all "${SPEED_FLAGS[@]}" --sections "${item[0]}" \
        --budget-s $(($(left) - 60)) --output "$JOB_DIR/speed_$n.json" "${item[@]:1}" || true
done
say "sitting done, $(left)s of the budget left"
