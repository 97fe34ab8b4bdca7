#!/usr/bin/env bash
# Issue 26's claim: ELSA from the DENSE model with the paper's recipe (conf/method/elsa.yaml: next-token loss,
# coupled proximal term lam 0.01, interval 32, lr 2e-4 linear to 0, AdamW (0.9, 0.95), clip 1.0), only the steps,
# batch and sequence length scaled to this CPU: 8 windows x 512 tokens a step (batch_size 2 x grad_accum 4, the
# paper's 8 sequences), 2442 steps = 10.0M training tokens, bf16 autocast (the reference trains under bf16).
# The history evaluates the projected weights every 32 steps (131k tokens) on the field table's protocol
# (8192 wiki test tokens, eval=quick), so each point compares with the one-shot cells of docs/field.
#
#   bench/elsa_claim.sh 90            # start or resume the 90% run (one thread, nice 19), log in $ROOT/s90.log
#   bench/elsa_claim.sh 70
#   bench/elsa_claim.sh 90 short      # the same tokens with ELSA's short-budget recipe (conf/method_budget/cpu/elsa.yaml:
#                                     # decoupled pull lam 0.02, interval 8, KL from the dense model, the last quarter
#                                     # on z's frozen support, lr 5e-4 with 10 warm-up steps), from the dense model:
#                                     # the knob changed for a 135M model, beside the paper's recipe (docs/results.md)
#   bench/elsa_claim.sh 90 short elsa_l   # ELSA-L (8-bit state) with the same recipe and tokens, for its figure
#                                     # at ELSA's crossing budget (issue 26: within 2% of ELSA there)
#   bench/elsa_claim.sh 90 short elsa_adamw8bit 160   # the A/B that locates ELSA-L's gap at 90%: ELSA with
#   bench/elsa_claim.sh 90 short elsa_l_adamw 160     # ELSA-L's 8-bit AdamW only, ELSA-L with fp32 AdamW (its
#   bench/elsa_claim.sh 90 short elsa_l_zbf16 160     # FP8 z and BF16 u only), ELSA-L with z in BF16 (the
#   bench/elsa_claim.sh 90 short elsa_l_ufp32 320     # sparse_bf16 codec's numerics), ELSA-L with u in fp32;
#                                     # the last argument stops the run after that step's
#                                     # checkpoint (the schedules still span the 2442 steps, as in the full runs)
#   SEED=1 bench/elsa_claim.sh 90 short elsa 320      # any of the above with another seed (the order of its
#                                     # training windows): the run's dir gets a _seed1 suffix; the spread between seeds
#                                     # is what a within-2% comparison at 90% has to beat
#   bench/elsa_claim.sh status        # where each run stands (last held-out points)
#
# Longer than a session (hours at one thread): it resumes from $ROOT/s<N>/checkpoints/elsa.pt (every 32 steps).
# The code is pinned: the first start records main's commit in $ROOT/COMMIT and every later start runs that
# commit's code from a worktree ($ROOT/code), so the curve comes from one commit across sessions. The pin also
# lives in the repo (bench/results/elsa_claim/COMMIT: d2dd635, the code of every run in docs/results.md), so a
# fresh clone on another machine runs the same code; the checkpoints stay on this machine's disk only.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
ROOT="${ELSA_CLAIM_DIR:-/work/elsa_claim}"
PIN="$REPO/bench/results/elsa_claim/COMMIT"
mkdir -p "$ROOT"
if [ "${1:-}" = status ]; then
  for f in "$ROOT"/s*.log; do
    [ -e "$f" ] || continue
    echo "== $f"; grep -a "heldout_ppl\|perplexity of the initial\|resumed\|results in" "$f" | tail -4 || true
  done
  exit 0
fi
S="${1:?usage: bench/elsa_claim.sh 70|90|status [paper|short] [elsa|elsa_l|elsa_adamw8bit|elsa_l_adamw|elsa_l_zbf16|elsa_l_ufp32] [stop-step]}"
RECIPE="${2:-paper}"
METHOD="${3:-elsa}"
UNTIL="${4:-}"
ARMS=()
case "$RECIPE" in
  paper) RUN="s$S"; EXTRA=() ;;
  short) RUN="s${S}_short"; EXTRA=(budget=cpu) ;;
  *) echo "elsa: error: recipe=$RECIPE: paper or short" >&2; exit 2 ;;
esac
SEED="${SEED:-0}"
case "$SEED" in ''|*[!0-9]*) echo "elsa: error: SEED=$SEED: a whole number >= 0" >&2; exit 2 ;; esac
case "$METHOD" in
  elsa) ;;
  elsa_l) RUN="${RUN}_elsa_l" ;;
  elsa_adamw8bit) RUN="${RUN}_$METHOD"; METHOD=elsa; ARMS=(method.optimizer=adamw8bit) ;;
  elsa_l_adamw) RUN="${RUN}_$METHOD"; METHOD=elsa_l; ARMS=(method.optimizer=adamw) ;;
  elsa_l_zbf16) RUN="${RUN}_$METHOD"; METHOD=elsa_l; ARMS=(method.z_dtype=bf16) ;;
  elsa_l_ufp32) RUN="${RUN}_$METHOD"; METHOD=elsa_l; ARMS=(method.u_dtype=fp32) ;;
  *) echo "elsa: error: method=$METHOD: elsa, elsa_l, elsa_adamw8bit, elsa_l_adamw, elsa_l_zbf16 or elsa_l_ufp32" >&2; exit 2 ;;
esac
(
  flock 9   # two runs started together create the pinned worktree once
  if [ ! -f "$ROOT/COMMIT" ]; then
    if [ -f "$PIN" ]; then cp "$PIN" "$ROOT/COMMIT"; else git -C "$REPO" rev-parse HEAD > "$ROOT/COMMIT"; fi
  fi
  [ -f "$ROOT/code/run.py" ] || git -C "$REPO" worktree add --detach "$ROOT/code" "$(cat "$ROOT/COMMIT")"
) 9> "$ROOT/.lock"
[ "$SEED" = 0 ] || RUN="${RUN}_seed$SEED"      # seed 0: the runs of before, their dirs unchanged
COMMIT="$(cat "$ROOT/COMMIT")"
PY="$REPO/.venv/bin/python"
# The runs train under bf16 autocast (every documented curve did). A CPU without bf16 instructions (AVX2 only: the
# AMD EPYC of 2026-12-07 ran a bf16 matmul at 0.3 GFLOP/s against fp32's 87) would take months: refuse there.
SPEEDUP="$(cd "$REPO" && OMP_NUM_THREADS=1 "$PY" -c 'import torch; torch.set_num_threads(1)
from elsa.engines.precision import bf16_speedup; print(round(bf16_speedup("cpu"), 3))')"
if ! awk -v s="$SPEEDUP" 'BEGIN { exit !(s >= 1) }'; then
  echo "elsa: error: method.autocast_bf16=true: a bf16 matmul runs at ${SPEEDUP}x fp32's speed on this CPU (one thread);" \
       "the claim runs are bf16 runs and need a CPU with bf16 units (AVX-512 BF16 or AMX)" >&2
  exit 2
fi
cd "$ROOT/code"
echo "elsa_claim: sparsity 0.$S, recipe $RECIPE, code $COMMIT, $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg)" >> "$ROOT/$RUN.log"
OMP_NUM_THREADS=1 WANDB_MODE=disabled PYTHONPATH="$ROOT/code" nice -n 19 "$PY" run.py \
  method=$METHOD "${EXTRA[@]}" "${ARMS[@]}" seed=$SEED sparsity=0.$S seqlen=512 eval=quick logger=none hardware.threads=1 \
  method.steps=2442 method.batch_size=2 method.grad_accum=4 method.autocast_bf16=true \
  method.eval_every=32 method.eval_split=test method.eval_tokens=8192 method.checkpoint_every=32 \
  save_model=true output_dir="$ROOT/$RUN" >> "$ROOT/$RUN.log" 2>&1 &
pid=$!
while [ -n "$UNTIL" ] && kill -0 "$pid" 2>/dev/null; do
  if grep -aq "checkpoint saved at step $UNTIL:" "$ROOT/$RUN.log"; then
    kill "$pid"; echo "elsa_claim: stopped after step $UNTIL's checkpoint, $(date -u +%FT%TZ)" >> "$ROOT/$RUN.log"; break
  fi
  sleep 20
done
wait "$pid" || [ -n "$UNTIL" ]
