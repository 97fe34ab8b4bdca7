#!/usr/bin/env bash
# Every GPU path the project has, in one command of under 10 minutes on the lent GPU machine (issue 16 item 3):
#   1. the CUDA tests (tests/test_sparse.py: semi-structured 2:4 through the sparse replacement, fp16/bf16);
#   2. the layer-wise engine's one-block offload (SparseGPT with hardware=gpu: the model stays on the CPU, one
#      block at a time on the GPU; peak GPU memory against the whole model's);
#   3. ELSA's bf16 autocast and gradient checkpointing (method.autocast_bf16, method.gradient_checkpointing),
#      against the same run in fp32 without checkpointing: time, peak GPU memory, perplexity;
#   4. the sparse-inference kernels on 7B-shaped matrices (bench/bench_sparse.py matrices --device cuda) in bf16
#      and fp16 at 50/70/90%/2:4: dense cuBLAS against cuSPARSE CSR and torch's semi-structured 2:4;
#   5. the 7B-shaped rehearsal (issue 27): every registered method (budget=demo where it trains) on one
#      llama2-7b-shaped block (model=shapes) at 16 x 2048 calibration tokens: peak GPU memory and time measured
#      against the plan run.py prints before loading (its GPU times use elsa/plan.py's reference rates).
#
# The GPU machine has PyTorch, transformers, pandas, tqdm, pytest but no internet and no hydra-core; the default
# model (SmolLM2-135M, a 94 MB PyPI wheel) does not fit the 64 MiB that travels, so the runs use the project's
# random Llama (model=tiny) at a size where the GPU does the work (hidden 1024, 8 blocks, ~120 M parameters):
# the figures are about the paths (memory, time, kernels), not perplexity quality.
#
#   bench/gpu_check.sh prepare      # here, once: .gpu/ = the missing wheels + the embedded corpus (ignored by git)
#   then, through the device tool:  run(command="bench/gpu_check.sh run", carry=[".gpu"], timeout_s=600)
#   step 5 alone (16 methods, at most EACH=90 s each): run(command="bench/gpu_check.sh rehearsal", carry=[".gpu"], timeout_s=600)
#   what comes back: $OUT/gpu_check.log, $OUT/sparse_gpu.jsonl, $OUT/runs.json
# docs/results.md ("GPU") records the figures of each run with its date.
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-run}

if [ "$what" = prepare ]; then
  set -e
  PY=${PY:-.venv/bin/python}
  mkdir -p .gpu/wheels .gpu/cache
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  # pure-Python wheels, so the python3.12 there takes them
  $PY -m pip wheel -q --no-deps -w .gpu/wheels "hydra-core>=1.3,<1.4" "omegaconf>=2.3,<2.4" \
      "antlr4-python3-runtime==4.9.3"      # antlr4 4.9.3 is an sdist: built into a wheel here
  ELSA_CACHE=$PWD/.gpu/cache $PY -c "
from elsa.data.corpora import EmbeddedCorpus
from elsa.model.structure import TinyLlamaSource
EmbeddedCorpus(name='wiki', source='wiki').documents('train')   # the corpus there has no gensim to read
TinyLlamaSource().tokenizer()"                                  # model=shapes' offline tokenizer
  du -sh .gpu
  exit 0
fi

OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled ELSA_CACHE=$PWD/.gpu/cache HYDRA_FULL_ERROR=1
PY=${PY:-python3}     # the GPU image's python3 holds PyTorch; PY=.venv/bin/python HW=cpu SIZE=... is a CPU dry run
HW=${HW:-gpu}
$PY -m pip install -q --no-index --no-deps --target "$PWD/.gpu/site" .gpu/wheels/*.whl || exit 1
export PYTHONPATH=$PWD/.gpu/site:$PWD
t0=$(date +%s)
step() { echo; echo "=== $1 ($(( $(date +%s) - t0 )) s in)"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))"

rehearsal() {  # step 5; alone: bench/gpu_check.sh rehearsal
local RUNS=$OUT/runs REHEARSE m name t
mkdir -p "$RUNS"
step "5. 7B-shaped rehearsal (issue 27): every method on ONE llama2-7b-shaped block at 16 x 2048 tokens,
measured peak GPU memory and time against the plan that run.py printed before loading (results.json plan)"
REHEARSE="model=shapes model.like=llama2-7b model.blocks=1 nsamples=16 seqlen=2048 logger=none save_model=false
  eval=quick eval.max_tokens=4096 eval.batch_size=1 eval.dense=false sparsity=0.5 hardware=$HW"
# bench/bench_shapes.py's llama2-7b cells (every registered method) with its per-method settings
CELLS=$($PY -c "
import sys; sys.path.insert(0, 'bench')
from bench_shapes import CELLS, OPTIONS, SPARSITY
from elsa.methods.registry import get
for like, n in CELLS:
    if like == 'llama2-7b' and '@' not in n:    # not the 128 x 2048 memory checks
        print(' '.join([n] + (['budget=demo'] if get(n).has_budget else []) +
                       ([f'sparsity={SPARSITY[n]}'] if n in SPARSITY else []) + OPTIONS.get(n, [])))")
while read -r m; do
  name=shapes_${m%% *}; t=$(date +%s)
  timeout ${EACH:-90} $PY run.py $REHEARSE method=$m output_dir="$RUNS/$name" > "$RUNS.$name.log" 2>&1
  echo "$name: exit $? in $(( $(date +%s) - t )) s"; grep -E "^plan:|elsa: error" "$RUNS.$name.log" | head -2
done <<< "$CELLS"
$PY - "$RUNS" <<'EOF'
import json, sys
from pathlib import Path
print(f"{'run':<18} {'GPU GB meas.':>12} {'plan':>6} {'RSS GB':>7} {'plan':>6} {'prune s':>8} {'plan (ref. GPU)':>15}")
for d in sorted(Path(sys.argv[1]).glob("shapes_*")):
    r = json.loads((d / "results.json").read_text()) if (d / "results.json").exists() else {}
    mem, plan = r.get("peak_memory_mb") or {}, r.get("plan") or {}
    f = lambda v, k=1: "-" if v is None else f"{v / k:.2f}"  # noqa: E731
    print(f"{d.name:<18} {f(mem.get('gpu'), 1024):>12} {f(plan.get('peak_gpu_gb')):>6} {f(mem.get('cpu_rss'), 1024):>7} "
          f"{f(plan.get('peak_cpu_gb')):>6} {f((r.get('time_s') or {}).get('prune')):>8} {f(plan.get('prune_s')):>15}"
          f"  {r.get('status')} {r.get('error') or ''}")
EOF
}

[ "$what" = rehearsal ] && { rehearsal; step "done"; exit 0; }

step "1. CUDA tests"
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_sparse.py -k "cuda or semi" -x

SIZE=${SIZE:-"model.hidden_size=1024 model.intermediate_size=2816 model.num_layers=8 model.num_heads=16 model.num_kv_heads=16"}
BIG="model=tiny $SIZE logger=none save_model=false seqlen=512 eval.max_tokens=16384 hardware=$HW"
RUNS=$OUT/runs
run() {  # name, overrides...
  local name=$1; shift
  local t=$(date +%s)
  timeout 240 $PY run.py $BIG "$@" output_dir="$RUNS/$name" > "$RUNS.$name.log" 2>&1
  echo "$name: exit $? in $(( $(date +%s) - t )) s"; tail -4 "$RUNS.$name.log"
}
mkdir -p "$RUNS"

step "2. layer-wise offload: SparseGPT, one block on the GPU at a time"
run sparsegpt method=sparsegpt sparsity=0.5 nsamples=64

step "3. ELSA: fp32 against bf16 autocast + gradient checkpointing (60 steps from SparseGPT's solution)"
run elsa_fp32 method=elsa budget=quick start=sparsegpt sparsity=0.7 nsamples=64 method.steps=60
run elsa_bf16_ckpt method=elsa budget=quick start=sparsegpt sparsity=0.7 nsamples=64 method.steps=60 \
    method.autocast_bf16=true method.gradient_checkpointing=true

$PY - "$RUNS" > "$OUT/runs.json" <<'EOF'
import json, sys
from pathlib import Path
out = {}
for d in sorted(Path(sys.argv[1]).iterdir()):
    r = json.loads((d / "results.json").read_text()) if (d / "results.json").exists() else {}
    out[d.name] = {k: r.get(k) for k in ("status", "error", "perplexity", "dense_perplexity", "time_s",
                                         "peak_memory_mb")} | {"params": (r.get("params") or {}).get("total")}
print(json.dumps(out, indent=1))
EOF
cat "$OUT/runs.json"

step "4a. the sparse replacement on a 2:4 model: every pruned Linear through sparsify, logits against dense"
$PY bench/gpu_sparse_model.py "$HW" $SIZE
echo "exit $?"

rehearsal

[ "$HW" = gpu ] || { step "done (CPU dry run: no kernel benchmark)"; exit 0; }
step "4b. sparse kernels on 7B-shaped matrices (cuBLAS vs cuSPARSE CSR vs semi-structured 2:4)"
for dt in bfloat16 float16; do
  timeout 150 $PY bench/bench_sparse.py matrices --device cuda --dtype $dt --out "$OUT/sparse_gpu.jsonl" > /dev/null
  echo "$dt: exit $?"
done
$PY bench/bench_sparse.py report "$OUT/sparse_gpu.jsonl"
step "done"
