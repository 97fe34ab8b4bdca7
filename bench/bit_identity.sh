#!/usr/bin/env bash
# Prune every case below with the elsa of worktree $1, storing each run's tensors under $2 (bench/bit_identity.py);
# then compare two such dirs: bench/bit_identity.sh compare <dir a> <dir b>. One thread, one job at a time.
# ONLY=<regex> runs the cases it matches; EXTRA="<overrides>" adds overrides to every case, e.g.
#   ONLY="elsa|ast" EXTRA="method.autocast_bf16=false" bench/bit_identity.sh <tree> <dir>   (the fp32 training step)
set -u
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PY:-/work/main/.venv/bin/python}
CASES=(
  "tiny method=magnitude" "tiny method=wanda" "tiny method=sparsegpt" "tiny method=alps" "tiny method=ladmm"
  "tiny method=dsnot" "tiny method=ria" "tiny method=oats" "tiny method=sparsellm" "tiny method=dense"
  "tiny method=safe budget=demo" "tiny method=elsa budget=demo" "tiny method=elsa_l budget=demo"
  "tiny method=ast budget=demo" "tiny method=ast_boosted budget=demo" "tiny method=leap budget=demo"
  "tiny method=maskllm budget=demo sparsity=2:4" "tiny method=wanda sparsity=2:4" "tiny method=magnitude sparsity=2:4"
  "tiny method=wanda allocation=owl" "tiny method=magnitude allocation=global" "tiny method=sparsegpt allocation=uniform allocation.exact=true"
  "tiny method=sparsegpt ignore=[mlp.down]" "tiny method=magnitude targets=[mlp]" "tiny method=elsa budget=demo allocation=owl"
  "tiny method=ast budget=demo targets=[mlp]" "tiny method=safe budget=demo ignore=[self_attn.o_proj]"
  "tiny method=sparsellm allocation=owl" "tiny method=leap budget=demo allocation=global" "tiny method=wanda start=sparsegpt"
  "tiny method=elsa budget=demo start=wanda targets=[mlp]"
  "mixtral method=wanda" "mixtral method=sparsegpt" "mixtral method=magnitude allocation=global"
  "qwen3-moe method=wanda" "qwen3-moe method=elsa budget=demo"
  "gpt-oss method=wanda" "gpt-oss method=magnitude allocation=global" "gpt-oss method=ast budget=demo"
  "gpt-oss method=sparsegpt targets=[experts]" "qwen2-moe method=wanda allocation=owl" "olmoe method=ria"
  "gpt2 method=sparsegpt" "gpt2 method=elsa budget=demo" "opt method=wanda" "falcon method=magnitude"
  "gemma3 method=oats" "phi3 method=alps"
  "mixtral method=sparsellm method.fallback=sparsegpt" "qwen3-moe method=dsnot ignore=[layers.1.mlp.experts]"
  "qwen3-moe method=safe budget=demo targets=[experts]" "gpt-oss method=leap budget=demo"
)
if [ "$1" = compare ]; then
  bad=0
  for f in "$2"/*.pt; do $PY "$HERE/bit_identity.py" compare "$f" "$3/$(basename "$f")" || bad=1; done
  exit $bad
fi
mkdir -p "$2"
for c in "${CASES[@]}"; do
  [[ -n "${ONLY:-}" && ! "$c" =~ ${ONLY} ]] && continue
  name=$(echo "$c" | tr ' =/[],:' '_______')
  [ -f "$2/$name.pt" ] && continue
  PYTHONPATH=$1 $PY "$HERE/bit_identity.py" run "$2/$name.pt" $c ${EXTRA:-} > "$2/$name.log" 2>&1 || echo "FAILED: $c ($2/$name.log)"
done
