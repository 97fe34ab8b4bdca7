#!/usr/bin/env bash
# The long work of issues 29 and 26 as two one-thread lanes on this 2-core machine, each a queue that skips what is
# done, so one command starts (or, after a session ended them, resumes) both:
#
#   setsid nohup bench/lanes.sh > /dev/null 2>&1 &      # from the repo root; progress in $LANES_LOG
#   bench/lanes.sh status                               # the grid's cells and the seed runs' last held-out points
#
#   lane 1: the field grid's training phase (AST, AST-Boosted, ELSA, ELSA-L at budget=cpu), then ELSA at 90% with
#           seed 1 (the short recipe to step 320, issue 26 item 4), then ELSA-L with z in BF16, seed 1
#   lane 2: the grid's ELSA-from-SparseGPT phase, then ELSA-L (FP8 z, its default) at 90% with seed 1, then the
#           BF16-z run if lane 1 has not taken it
# The grid skips finished cells (bench/field_grid.sh: skip_done, a lock per phase, so two lanes never run one phase);
# a seed run resumes from its last 32-step checkpoint and stops after step 320's (bench/elsa_claim.sh), and takes a
# lock so that two lanes never run it twice. Pause both for a timing: kill -STOP -<pgid> / kill -CONT -<pgid>.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
LOG="${LANES_LOG:-/work/notes/lanes.log}"
CLAIM="${ELSA_CLAIM_DIR:-/work/elsa_claim}"
mkdir -p "$(dirname "$LOG")" "$CLAIM"
cd "$REPO"
if [ "${1:-}" = status ]; then
  bench/field_grid.sh status | tail -1
  bench/elsa_claim.sh status
  exit 0
fi
[ $# -eq 0 ] || { echo "usage: bench/lanes.sh [status]" >&2; exit 2; }

say() { echo "lanes: $*, $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg)" >> "$LOG"; }

seed_run() {   # one seed-1 run at 90% to step 320, unless another lane holds it
  local variant="$1"
  (
    flock -n 7 || { say "seed 1 $variant is running in the other lane; skipped"; exit 0; }
    say "seed 1 $variant: start or resume"
    SEED=1 bench/elsa_claim.sh 90 short "$variant" 320 || say "seed 1 $variant ended with an error (its log: $CLAIM)"
    say "seed 1 $variant: stopped (step 320 reached, or ended)"
  ) 7> "$CLAIM/.lane-seed1-$variant.lock"
}

lane() {   # a lane: its grid phases in order (a phase the other lane holds is skipped), then its seed-1 run, then
           # the BF16-z run unless the other lane holds or has done it
  local n="$1" phases="$2" seed="$3"
  say "lane $n: grid phases $phases"
  # shellcheck disable=SC2086 - the phases are words
  bench/field_grid.sh run $phases || say "lane $n: the grid ended with an error"
  seed_run "$seed"
  seed_run elsa_l_zbf16
  say "lane $n: done"
}

lane 1 "training elsa_sgpt maskllm leap" elsa &
sleep 20       # the grid's first lane takes its phase lock before the second looks
lane 2 "elsa_sgpt leap maskllm training" elsa_l &
wait
