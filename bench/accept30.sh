#!/usr/bin/env bash
# Issue 30's acceptance figures in one command, for a quiet machine (the other jobs paused):
#   bash bench/accept30.sh [OUT.jsonl]        (THREADS=2 by default; PYTHON=python)
# Two runs of the model bench (the same command twice: plans compared across the runs), one at 90% with every
# model compiled, the 7B-shaped matrices at 90%, then the figures against the targets (bench_sparse.py accept).
# Writes a new file each time (default bench/results/accept30-<UTC time>.jsonl), so the table holds this
# invocation's rows only.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results/accept30-$(date -u +%Y%m%dT%H%M%S).jsonl}
threads=${THREADS:-2}
py=${PYTHON:-python}
if [ -e "$out" ]; then echo "elsa: error: $out exists: the table must hold this run's rows only" >&2; exit 2; fi
uptime
for run in 1 2; do
    "$py" bench/bench_sparse.py model --threads "$threads" --sparsities 0.9,0.7,2:4,0.5 --rounds 5 --new-tokens 32 --out "$out" > /dev/null
    uptime
done
# 90% with every model under torch.compile (the best dense baseline: compiled dense fp32 and bf16 decode faster
# than eager; the sparse kernels enter the graph as the C++ op elsa::compressed_mv); ~4 min of compiling
"$py" bench/bench_sparse.py model --threads "$threads" --sparsities 0.9 --rounds 5 --new-tokens 32 --compile --no-stock \
    --no-ceiling --out "$out" > /dev/null
uptime
"$py" bench/bench_sparse.py matrices --threads "$threads" --sparsities 0.9 --reps 31 --out "$out" > /dev/null
uptime
# the same with the caches evicted before every call, as in a model's decode (bench_sparse.py --cold)
"$py" bench/bench_sparse.py matrices --threads "$threads" --sparsities 0.9 --reps 31 --cold --out "$out" > /dev/null
uptime
echo "rows: $out"
"$py" bench/bench_sparse.py accept "$out"
