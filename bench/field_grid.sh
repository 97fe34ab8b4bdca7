#!/usr/bin/env bash
# Issue 29 item 3: the field table regenerated from ONE commit, as one resumable sweep dir.
#
#   bench/field_grid.sh run [phase ...]   # run the phases in order (default: all), one thread, nice 19;
#                                         # a phase another lane is running is skipped (a lock per phase)
#   bench/field_grid.sh status            # done / failed / missing cells per phase
#   bench/field_grid.sh save              # copy the finished cells' results.json into the repo (commit them)
#   bench/field_grid.sh report            # python -m elsa.report <cells> --out docs/field (the mixed-commit table
#                                         # that stood there is docs/field_mixed); the report code is this checkout's,
#                                         # the cells the pin's; refuses unless all 64 cells are in, every one the pin's
#   bench/field_grid.sh report --partial [dir]   # the cells there are, drawn into dir (default /tmp/field_partial)
#
# The field protocol (conf/experiment/field.yaml: the default model, 32 x 512 wiki-train calibration windows, seed 0,
# perplexity on 8,192 wiki-test tokens) at 0.9, 0.5, 2:4 and 0.7. Every job's dir is named by its overrides, so a
# rerun skips finished cells (skip_done) and a session that ends mid-grid resumes where it stopped. The first run
# records main's commit in $ROOT/COMMIT and every later run uses that commit's code from a worktree ($ROOT/code):
# every row of the table comes from one commit (results.csv's git_sha column says which).
#
# The sweep dir is scratch on this machine, and a session may be handed another machine (2026-12-06: the first
# 20 cells, pinned at 485577d, were lost that way). So the pin and every finished cell live in the repo too,
# under bench/results/field_grid/ (COMMIT; cells/<job dir>/results.json and machine.txt, the CPU it ran on):
# `save` copies the cells that finished since the last save, `run` seeds an empty sweep dir from them before it
# starts (skip_done then skips them), so a fresh clone on any machine resumes the same grid. Commit after `save`.
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
CELLS="4 x 9 + 4 + 16 + 4 + 1 + 3 = 64"   # the phases' cells: one-shot, SAFE, training, elsa_sgpt, MaskLLM, LEAP
STORE="$REPO/bench/results/field_grid"
mkdir -p "$ROOT" "$STORE/cells"
(
  flock 9
  if [ ! -f "$ROOT/COMMIT" ]; then
    if [ -f "$STORE/COMMIT" ]; then cp "$STORE/COMMIT" "$ROOT/COMMIT"; else git -C "$REPO" rev-parse HEAD > "$ROOT/COMMIT"; fi
  fi
  [ -f "$STORE/COMMIT" ] || cp "$ROOT/COMMIT" "$STORE/COMMIT"
  cmp -s "$ROOT/COMMIT" "$STORE/COMMIT" || { echo "elsa: error: $ROOT/COMMIT ($(cat "$ROOT/COMMIT")) is not the repo's pin $STORE/COMMIT ($(cat "$STORE/COMMIT")): one grid, one commit" >&2; exit 2; }
  [ -f "$ROOT/code/run.py" ] || git -C "$REPO" worktree add --detach "$ROOT/code" "$(cat "$ROOT/COMMIT")"
) 9> "$ROOT/.lock"
COMMIT="$(cat "$ROOT/COMMIT")"
PY="$REPO/.venv/bin/python"
cmd="${1:-status}"; shift || true
case "$cmd" in
  status)
    echo "commit $COMMIT, sweep $SWEEP"
    "$PY" - "$SWEEP" "$CELLS" <<'EOF'
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
print("cells with results:", sum(count.values()), "of", sys.argv[2])
EOF
    ;;
  save)
    machine="$(cd "$REPO" && "$PY" -c 'import torch; from elsa.machine import cpu_id, cpu_name; print(f"{cpu_name()}, cpu id {cpu_id()}, torch {torch.__version__}")')"
    n=0
    for r in "$SWEEP"/*/results.json; do
      [ -f "$r" ] || continue
      job="$(basename "$(dirname "$r")")"
      [ -f "$STORE/cells/$job/results.json" ] && continue
      "$PY" -c 'import json, sys; sys.exit(json.load(open(sys.argv[1])).get("status") != "done")' "$r" || continue
      mkdir -p "$STORE/cells/$job"
      cp "$r" "$STORE/cells/$job/results.json"
      echo "$machine (saved $(date -u +%FT%TZ))" > "$STORE/cells/$job/machine.txt"
      n=$((n + 1))
    done
    echo "field_grid: saved $n new cell(s) under $STORE/cells ($(ls "$STORE/cells" | wc -l) in all); commit them"
    ;;
  report)
    # the cells are the pinned commit's (results.csv's git_sha column says so, one sha for every row); the table
    # and plots are drawn by this checkout's report, whose labels leave out the keys that only observe a run
    # (eval_every, eval_split, ...: report.OBSERVING, after the pin)
    # one commit, every cell: a report of a partial grid or of a cell from another commit would read as the table
    # the issue asks for; `report --partial` draws what is there (for a look, not for docs/)
    cd "$REPO"
    out="$REPO/docs/field"
    [ "${1:-}" = "--partial" ] && out="${2:-/tmp/field_partial}"
    "$PY" - "$STORE/cells" "$COMMIT" "${1:-}" "${CELLS##* }" <<'EOF'
import json, sys
from pathlib import Path
cells, commit, partial, total = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "--partial", int(sys.argv[4])
records = [json.loads(p.read_text()) for p in sorted(cells.glob("*/results.json"))]
other = sorted({str(r.get("git_sha")) for r in records} - {commit})
error = None
if other:
    error = f"cells from commit(s) {', '.join(other)} in {cells}: the grid is one commit ({commit})"
elif len(records) != total and not partial:
    error = (f"{len(records)} of the grid's {total} cells are in {cells}: `bench/field_grid.sh run` the rest, or "
             "`report --partial [dir]` for a look")
if error:
    print(f"elsa: error: {error}", file=sys.stderr)
    sys.exit(2)
EOF
    "$PY" -m elsa.report "$STORE/cells" --out "$out"
    ;;
  run)
    phases=("$@"); [ ${#phases[@]} -gt 0 ] || phases=("${ORDER[@]}")
    for d in "$STORE"/cells/*/; do
      [ -f "$d/results.json" ] || continue
      job="$(basename "$d")"
      [ -f "$SWEEP/$job/results.json" ] || { mkdir -p "$SWEEP/$job"; cp "$d/results.json" "$SWEEP/$job/results.json"; }
    done
    cd "$ROOT/code"
    for phase in "${phases[@]}"; do
      [ -n "${PHASES[$phase]:-}" ] || { echo "elsa: error: phase=$phase: one of ${ORDER[*]}" >&2; exit 2; }
      # one lane per phase: two lanes in one phase would both start its next unfinished cell
      exec 8> "$ROOT/.phase-$phase.lock"
      if ! flock -n 8; then
        echo "field_grid: phase $phase is running in another lane; skipped here" | tee -a "$ROOT/grid.log" >&2
        continue
      fi
      echo "field_grid: phase $phase, code $COMMIT, $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg)" >> "$ROOT/grid.log"
      # shellcheck disable=SC2086 - the phase's overrides are words
      OMP_NUM_THREADS=1 WANDB_MODE=disabled PYTHONPATH="$ROOT/code" nice -n 19 "$PY" run.py -m experiment=field \
        ${PHASES[$phase]} logger=none hardware.threads=1 hydra.sweep.dir="$SWEEP" >> "$ROOT/grid.log" 2>&1 \
        || echo "field_grid: phase $phase ended with an error (see the job dirs' results.json)" >> "$ROOT/grid.log"
      exec 8>&-
    done
    ;;
  *) echo "usage: bench/field_grid.sh run [phase ...] | status | save | report" >&2; exit 2 ;;
esac
