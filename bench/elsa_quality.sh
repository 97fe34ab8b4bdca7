#!/usr/bin/env bash
# ELSA quality on the default model (SmolLM2-135M, dataset=wiki), same evaluation as the one-shot table
# (seqlen 512, 65536 wiki test tokens). Usage: bench/elsa_quality.sh <sparsity> <steps> [extra overrides]
# budget=cpu: the short-budget recipe (decoupled proximal pull, lam 0.02 per step, interval 8, lr 5e-4 with
# linear decay, distillation from the dense model (KL), the last quarter of the steps on the frozen support)
# with <steps> steps of 2 windows; add start=sparsegpt for the one-shot start.
set -euo pipefail
cd "$(dirname "$0")/.."
sp=$1; steps=$2; shift 2
exec .venv/bin/python run.py method=elsa budget=cpu sparsity="$sp" seqlen=512 eval.max_tokens=65536 \
  method.steps="$steps" method.eval_initial=false save_model=false logger=none "$@"
