#!/usr/bin/env bash
# Issue 29 item 3: the field table regenerated from ONE commit, as one resumable sweep dir.
#
#   bench/field_grid.sh run [phase ...]   # run the phases in order (default: all), one thread, nice 19
#   bench/field_grid.sh status            # done / failed / missing cells per phase
#   bench/field_grid.sh report            # python -m elsa.report <dir> --out docs/field_<commit> (the old docs/field stays)
#
# The field protocol (conf/experiment/field.yaml: the default model, 32 x 512 wiki-train calibration windows, seed 0,
# perplexity on 8,192 wiki-test tokens) at 0.9, 0.5, 2:4 and 0.7. Every job's dir is named by its overrides, so a
# rerun skips finished cells (skip_done) and a session that ends mid-grid resumes where it stopped. The first run
# records main's commit in $ROOT/COMMIT and every later run uses that commit's code from a worktree ($ROOT/code):
# every row of the table comes from one commit (results.csv's git_sha column says which).
#
# The training methods run at budget=cpu (the budget at which docs/results.md shows AST-Boosted's and ELSA's
# claims against the one-shot methods on this machine; each row is labelled with the tokens it trained on), with
# their held-out history on the table's own test windows every 40 steps, so the report draws each as a curve on
# the frontier (ppl_vs_tokens_wiki.png). ELSA from the dense model at the claim's 10M tokens is bench/elsa_claim.sh
# (its own pinned commit); MaskLLM (N:M only) from SparseGPT's 2:4 solution at budget=quick (its budget=cpu needed
# 8.2 GB, more than this shared machine had), LEAP (ratios only) from Wanda's solution at budget=cpu.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
ROOT="${ELSA_FIELD_DIR:-/work/field2}"
SWEEP="$ROOT/sweep"
HISTORY=(++method.eval_every=40 ++method.eval_split=test ++method.eval_tokens=8192)
declare -A PHASES=(
  [oneshot]="method=magnitude,wanda,ria,dsnot,sparsegpt,oats,alps,ladmm,sparsellm"
  [safe]="method=safe budget=cpu"
  [training]="method=ast,ast_boosted,elsa,elsa_l budget=cpu ${HISTORY[*]}"
  [elsa_sgpt]="method=elsa start=sparsegpt budget=cpu ${HISTORY[*]}"
  [maskllm]="method=maskllm sparsity=2:4 start=sparsegpt ${HISTORY[*]}"
  [leap]="method=leap sparsity=0.5,0.7,0.9 start=wanda budget=cpu ${HISTORY[*]}"
)
ORDER=(oneshot safe training elsa_sgpt maskllm leap)
mkdir -p "$ROOT"
(
  flock 9
  [ -f "$ROOT/COMMIT" ] || git -C "$REPO" rev-parse HEAD > "$ROOT/COMMIT"
  [ -f "$ROOT/code/run.py" ] || git -C "$REPO" worktree add --detach "$ROOT/code" "$(cat "$ROOT/COMMIT")"
) 9> "$ROOT/.lock"
COMMIT="$(cat "$ROOT/COMMIT")"
PY="$REPO/.venv/bin/python"
cmd="${1:-status}"; shift || true
case "$cmd" in
  status)
    echo "commit $COMMIT, sweep $SWEEP"
    "$PY" - "$SWEEP" <<'EOF'
import json, sys
from collections import Counter
from pathlib import Path
root = Path(sys.argv[1])
count = Counter()
for r in root.glob("*/results.json"):
    d = json.loads(r.read_text())
    start = (d.get("start") or {}).get("name") if isinstance(d.get("start"), dict) else d.get("start")
    count[(str(d.get("method")), str(start or "dense"), str(d.get("status")), str(d.get("git_sha"))[:7])] += 1
for key, n in sorted(count.items()):
    print(" ".join(f"{k:12s}" for k in key), n)
print("cells with results:", sum(count.values()), "of 4 x 9 + 4 + 16 + 4 + 1 + 3 = 64")
EOF
    ;;
  report)
    cd "$ROOT/code"
    PYTHONPATH="$ROOT/code" "$PY" -m elsa.report "$SWEEP" --out "$REPO/docs/field_${COMMIT:0:7}"
    ;;
  run)
    phases=("$@"); [ ${#phases[@]} -gt 0 ] || phases=("${ORDER[@]}")
    cd "$ROOT/code"
    for phase in "${phases[@]}"; do
      [ -n "${PHASES[$phase]:-}" ] || { echo "elsa: error: phase=$phase: one of ${ORDER[*]}" >&2; exit 2; }
      echo "field_grid: phase $phase, code $COMMIT, $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg)" >> "$ROOT/grid.log"
      # shellcheck disable=SC2086 - the phase's overrides are words
      OMP_NUM_THREADS=1 WANDB_MODE=disabled PYTHONPATH="$ROOT/code" nice -n 19 "$PY" run.py -m experiment=field \
        ${PHASES[$phase]} logger=none hardware.threads=1 hydra.sweep.dir="$SWEEP" >> "$ROOT/grid.log" 2>&1 \
        || echo "field_grid: phase $phase ended with an error (see the job dirs' results.json)" >> "$ROOT/grid.log"
    done
    ;;
  *) echo "usage: bench/field_grid.sh run [phase ...] | status | report" >&2; exit 2 ;;
esac
