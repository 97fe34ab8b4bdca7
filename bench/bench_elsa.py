"""ELSA benchmarks (run by hand; figures go to docs/results.md with the command that produced them).

  python bench/bench_elsa.py overhead [--steps 6] [--seqlen 512] [--batch 1]
      time of an ELSA step (Adam + proximal term + the dual update amortised over `interval`) against a
      plain Adam step on the same batch and model, in one process.
  python bench/bench_elsa.py step [--method elsa[,elsa_l]] [--budget cpu] [--steps 4] [--rounds 2]
                                  [--variants false,auto] [--profile N]
      the real training engine's step (TrainEngine.train on the default model, the method and budget composed
      from conf/) for each method x method.autocast_bf16 variant, run alternately in one process; the median
      step time of each (first step of every run excluded) and the ratio to the first. A method may carry
      method overrides after '+': --method elsa,elsa_l,elsa_l+z_dtype=sparse_bf16
  python bench/bench_elsa.py optim [--numel 5308416]
      one optimizer step on fp32 parameters of the default model's MLP shape (576 x 1536) with the same gradients:
      torch's fused and foreach AdamW, torchao's AdamW8bit and elsa.engines.optim8bit.AdamW8bitCPU (ELSA-L's optimizer on
      a CPU); the fastest of 5 steps after the first, and the 8-bit weights' largest difference from torchao's.
  python bench/bench_elsa.py memory
      optimiser + ADMM state bytes per pruned parameter for elsa and elsa_l, measured from the tensors
      after two steps on the default model.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def load_default():
    from conftest import compose

    from elsa.run.recipe import build

    cfg = compose(["logger=none"])
    model, tok = build(cfg.model, "model").load()
    corpus = build(cfg.dataset, "dataset")
    return model, tok, corpus


def overhead(args):
    from elsa.engines.admm import AdmmState, Fp32Codec
    from elsa.data.corpora import TrainWindows, token_stream
    from elsa.engines.losses import lm_loss
    from elsa.model.structure import prunable_weights
    from elsa.sparsity.patterns import Sparsity

    torch.manual_seed(0)
    model, tok, corpus = load_default()
    model.train()
    data = TrainWindows(token_stream(tok, corpus, "train"), args.seqlen, args.batch, 0, tok.bos_token_id)
    ids = data.batch(0)
    params = [p for p in model.parameters() if p.requires_grad]
    constrained = {n: w.param for n, w in prunable_weights(model).items()}
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0, foreach=True)
    admm = AdmmState(constrained, Sparsity(0.9), "layer", Fp32Codec(), Fp32Codec())
    admm.init(Sparsity(0.9))

    def step(prox: bool):
        opt.zero_grad(set_to_none=True)
        lm_loss(model(input_ids=ids, use_cache=False).logits, ids).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if prox:
            for name, p in constrained.items():
                p.grad.add_(admm.prox_residual(name), alpha=0.01)
        opt.step()

    step(False)  # warm-up (allocations, optimiser state)
    plain, elsa, dual = [], [], []
    for _ in range(args.steps):  # interleave so load changes hit both alike
        t = time.perf_counter(); step(False); plain.append(time.perf_counter() - t)
        t = time.perf_counter(); step(True); elsa.append(time.perf_counter() - t)
    for _ in range(2):
        t = time.perf_counter(); admm.dual_update(Sparsity(0.9)); dual.append(time.perf_counter() - t)
    p, e, d = statistics.median(plain), statistics.median(elsa), statistics.median(dual)
    out = {"tokens_per_step": args.batch * args.seqlen, "plain_adam_step_s": p, "elsa_step_s": e,
           "dual_update_s": d, "interval": args.interval, "threads": torch.get_num_threads(),
           "elsa_over_plain": (e + d / args.interval) / p}
    print(json.dumps(out, indent=2))


def step(args):
    import copy
    import tempfile

    from conftest import compose

    from elsa.engines.training import TrainEngine
    from elsa.methods.base import PruneContext
    from elsa.run.recipe import build
    from elsa.sparsity.patterns import Sparsity

    torch.manual_seed(0)
    model0, tok, corpus = load_default()
    variants = [(m, v) for m in args.method.split(",") for v in args.variants.split(",")]
    for m, _ in variants:
        for kv in m.split("+")[1:]:
            if "=" not in kv:
                sys.exit(f"elsa: error: --method={m}: '{kv}' is not a method override (key=value after '+')")
    times = {f"{m}/{v}": [] for m, v in variants}
    stats = {}
    for r in range(args.rounds):
        for name, v in variants:   # alternate, so a change of load hits every variant alike
            method_name, *extra = name.split("+")
            cfg = compose(["logger=none", f"method={method_name}", f"budget={args.budget}",
                           *(f"++method.{kv}" for kv in extra),
                           f"++method.steps={args.steps}", f"++method.autocast_bf16={v}",
                           "++method.checkpoint_every=0", "++method.eval_initial=false"])
            method = build(cfg.method, "method")
            model = copy.deepcopy(model0)
            with tempfile.TemporaryDirectory() as tmp:
                ctx = PruneContext(model=model, tokenizer=tok, target=Sparsity.parse(args.sparsity), dataset=corpus,
                                   seqlen=args.seqlen, seed=0, device="cpu", output_dir=Path(tmp), extras={})
                method.extend(model, ctx)
                profiling = args.profile and r == args.rounds - 1
                with _profiler(profiling) as prof:
                    st = TrainEngine(method).train(model, ctx)
                if profiling:
                    print(f"== profile {name} autocast_bf16={v} ({args.steps} steps; self CPU time by op)")
                    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile))
            times[f"{name}/{v}"].append(st["step_time_s"])
            stats[f"{name}/{v}"] = {**st["autocast_bf16"], "optimizer": st.get("optimizer_impl")}
            print(f"round {r} {name} autocast_bf16={v}: {st['step_time_s']:.3f} s/step", flush=True)
    med = {k: statistics.median(t) for k, t in times.items()}
    first = next(iter(med))
    out = {"method": args.method, "budget": args.budget, "threads": torch.get_num_threads(),
           "seqlen": args.seqlen, "steps_per_run": args.steps, "rounds": args.rounds,
           "step_time_s": med, "ratio_to_first": {k: med[k] / med[first] for k in med},
           "records": stats, "load_at_end": open("/proc/loadavg").read().split()[:3]}
    print(json.dumps(out, indent=2))


def _profiler(on: bool):
    import contextlib

    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU]) if on else contextlib.nullcontext()


def optim(args):
    from torchao.optim import AdamW8bit

    from elsa.engines.optim8bit import AdamW8bitCPU

    torch.manual_seed(0)
    shape = (576, 1536)
    count = max(1, args.numel // (shape[0] * shape[1]))
    w0 = [torch.randn(shape) * 0.02 for _ in range(count)]
    grads = [[torch.randn(shape) * 1e-3 for _ in w0] for _ in range(6)]

    def run(make):
        ps = [torch.nn.Parameter(w.clone()) for w in w0]
        opt = make(ps)
        times = []
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g
            t = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t)
        return ps, min(times[1:])

    kw = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    runs = {"adamw_fused": run(lambda ps: torch.optim.AdamW(ps, fused=True, **kw)),
            "adamw_foreach": run(lambda ps: torch.optim.AdamW(ps, foreach=True, **kw)),
            "torchao_adamw8bit": run(lambda ps: AdamW8bit(ps, **kw)),
            "elsa_adamw8bit_cpu": run(lambda ps: AdamW8bitCPU(ps, **kw))}
    ref, ours = runs["torchao_adamw8bit"][0], runs["elsa_adamw8bit_cpu"][0]
    out = {"params": count * shape[0] * shape[1], "threads": torch.get_num_threads(),
           "step_s": {k: v[1] for k, v in runs.items()},
           "max_abs_diff_vs_torchao": max(float((a - b).abs().max()) for a, b in zip(ref, ours)),
           "mean_abs_diff_vs_torchao": sum(float((a - b).abs().mean()) for a, b in zip(ref, ours)) / count,
           "load": open("/proc/loadavg").read().split()[:3]}
    print(json.dumps(out, indent=2))


def memory(args):
    import subprocess

    rows = {}
    for method in ("elsa", "elsa_l"):
        out = Path(f"/tmp/bench_elsa_memory_{method}")
        cmd = [sys.executable, str(REPO / "run.py"), f"method={method}", "sparsity=0.9", "seqlen=128",
               "method.steps=2", "method.batch_size=1", "method.grad_accum=1", "method.interval=1",
               "method.eval_initial=false", "method.checkpoint_every=0", "eval.max_tokens=512", "eval.dense=false",
               "save_model=false", "logger=none", f"hydra.run.dir={out}"]
        subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
        r = json.loads((out / "results.json").read_text())
        rows[method] = r["method_stats"]["state_bytes_per_param"]
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["overhead", "memory", "step", "optim"])
    ap.add_argument("--numel", type=int, default=5308416)
    ap.add_argument("--method", default="elsa")
    ap.add_argument("--budget", default="cpu")
    ap.add_argument("--profile", type=int, default=0,
                    help="step: profile the last round of each variant and print its top N ops by self CPU time")
    ap.add_argument("--sparsity", default="0.7")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", default="false,auto")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--interval", type=int, default=32)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    {"overhead": overhead, "memory": memory, "step": step, "optim": optim}[a.what](a)
