"""Greedy generation from a saved model (an HF dir or a compressed dir), dense or with the sparse kernels.

    python -m elsa.generate outputs/<run>/model_compressed --prompt "The capital of France" --max-new-tokens 32 --sparse

Prints the text, the decode speed (tokens/s after the prompt) and, with ``--sparse``, which kernel each pruned
matrix runs. ``--compare`` runs dense and sparse side by side on the same prompt: the same tokens, both speeds.
The kernel plan is read from ``<dir>/elsa_sparse_plan-<dtype>.json`` when it was made for this CPU, kernel
source, thread count and dtype (nothing is re-measured), else measured and saved there (``--remeasure``: always).
The pruning plan saved with the model (the compressed index's ``plan``, an HF dir's pruning_plan.json) picks the
matrices that get kernels and offers the N:M kernel where a matrix's target is N:M; a dir without one is read
from its zeros as before. ``--compare --compile``: both models under torch.compile (the sparse kernels enter the
graph as torch ops), compiled once before the timing.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

from elsa.errors import ElsaError


@torch.inference_mode()    # not just no_grad: ~1 ms less HF code per token on this CPU, dense and sparse alike
def greedy(model, ids: torch.Tensor, new_tokens: int, clock=time.perf_counter) -> tuple[torch.Tensor, float]:
    """Greedy decoding with the KV cache; returns (all token ids, seconds spent on the ``new_tokens`` decode
    steps after the prompt's forward pass). ``clock``: wall time, or ``time.thread_time`` (the CPU time of this
    thread: with one torch thread, the work without the waits for a core that other jobs cause)."""
    out = model(ids, use_cache=True)
    past, nxt = out.cache, out.logits[:, -1:].argmax(-1)     # transformers 5 names the KV cache ``cache``
    tokens = [nxt]
    t = clock()
    for _ in range(new_tokens - 1):
        out = model(nxt, cache=past, use_cache=True)
        past, nxt = out.cache, out.logits[:, -1:].argmax(-1)
        tokens.append(nxt)
    return torch.cat([ids, *tokens], dim=1), clock() - t


@torch.inference_mode()
def prefill_seconds(model, tokens: int, vocab: int, reps: int = 1) -> float:
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        model(ids, use_cache=False)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class Compiled:
    """A model whose forward runs under ``torch.compile`` (``dynamic=True``: the KV cache grows every token),
    called as the model is. The sparse kernels enter its graph as one op each (``torch.ops.elsa.compressed_mv``,
    elsa.artifacts.kernels), so dense and sparse models compile alike; what compiling removes is the eager
    per-token Python of the HF code (attention, norms, rotary, the cache): docs/results.md has the figures."""

    def __init__(self, model):
        import torch._dynamo

        self.config = model.config
        # every model of a comparison compiles the same forward (its class's), ~3 graphs each (the prompt, the
        # first token, the later ones): past dynamo's limit a model would run eager without a word
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 512)
        self._forward = torch.compile(model.forward, dynamic=True)

    def __call__(self, *args, **kwargs):
        return self._forward(*args, **kwargs)


STEADY = 1.15   # a comparison whose rounds of one model spread wider (fastest / slowest) ran in bursts of load from
                # elsewhere (2026-12-06, a noisy 2-core VM, our other jobs stopped: 13.5 and 22-23 ms a token in five
                # rounds of one model; two identical models compared beside two busy jobs: "4.23x"): its ratios say
                # more about the machine than about the kernels


def round_spread(decode_rounds: dict | None) -> float | None:
    """The widest spread (fastest round / slowest) of one model's decode rounds (``compare``'s ``decode_rounds``);
    None without two rounds of each model (one round says nothing of the machine)."""
    if not decode_rounds or min(len(v) for v in decode_rounds.values()) < 2:
        return None
    return max(max(v) / min(v) for v in decode_rounds.values())


def steadiness(decode_rounds: dict | None) -> str:
    """The spread, and ``NOT quiet`` past :data:`STEADY`: what a table or a CLI line prints beside a ratio."""
    spread = round_spread(decode_rounds)
    if spread is None:
        return "-"
    return f"{spread:.2f}" + ("" if spread <= STEADY else f" (NOT quiet: > {STEADY})")


def compare(models: dict, ids: torch.Tensor, new_tokens: int, rounds: int = 3,
            prefill_tokens: int | None = None, same_as: dict[str, str] | None = None,
            clock=time.perf_counter, compile: bool = False) -> dict:
    """Decode tokens/s (and prefill seconds) of several models, measured in alternating rounds in this process
    (a change of load hits each alike): medians over ``rounds`` (each round's rate in ``decode_rounds``: how
    steady the machine was); ``same_as``: {model: reference model} whose
    greedy tokens it must reproduce (recorded per model, all rounds). ``compile``: every model runs under
    torch.compile (:class:`Compiled`), compiled by one untimed decode (and prefill) before the rounds
    (``compile_s``: the seconds each took)."""
    compile_s = {}
    if compile:
        models = {k: Compiled(m) for k, m in models.items()}
        vocab = int(next(iter(models.values())).config.vocab_size)
        for name, model in models.items():
            t = time.perf_counter()
            greedy(model, ids, new_tokens)
            if prefill_tokens:
                prefill_seconds(model, prefill_tokens, vocab)
            compile_s[name] = round(time.perf_counter() - t, 1)
    dec = {k: [] for k in models}
    pre = {k: [] for k in models}
    outs, same = {}, {k: True for k in (same_as or {})}
    vocab = int(next(iter(models.values())).config.vocab_size)
    for _ in range(rounds):
        for name, model in models.items():
            out, secs = greedy(model, ids, new_tokens, clock)
            dec[name].append((new_tokens - 1) / secs)
            outs[name] = out
            if prefill_tokens:
                pre[name].append(prefill_seconds(model, prefill_tokens, vocab))
        for name, ref in (same_as or {}).items():
            same[name] = same[name] and torch.equal(outs[name], outs[ref])
    res = {"decode_tokens_per_s": {k: statistics.median(v) for k, v in dec.items()}, "decode_rounds": dec,
           "rounds_spread": round_spread(dec), "same_tokens_as": same,
           "new_tokens": new_tokens, "rounds": rounds, "threads": torch.get_num_threads(), "compiled": compile,
           **({"compile_s": compile_s} if compile else {})}
    if prefill_tokens:
        res.update(prefill_s={k: statistics.median(v) for k, v in pre.items()}, prefill_tokens=prefill_tokens)
    return res


def side_by_side(dense, sparse, ids: torch.Tensor, new_tokens: int, rounds: int = 3,
                 prefill_tokens: int | None = None, compile: bool = False) -> dict:
    """Decode tokens/s (and prefill seconds) of two models measured in alternating rounds in this process
    (``compile``: both under torch.compile, :func:`compare`)."""
    r = compare({"dense": dense, "sparse": sparse}, ids, new_tokens, rounds, prefill_tokens, {"sparse": "dense"},
                compile=compile)
    dec = r["decode_tokens_per_s"]
    out = {"decode_tokens_per_s": dec, "decode_speedup": dec["sparse"] / dec["dense"],
           "same_tokens": r["same_tokens_as"]["sparse"], "new_tokens": new_tokens, "rounds": rounds,
           "decode_rounds": r["decode_rounds"], "rounds_spread": r["rounds_spread"],
           "threads": r["threads"], "compiled": compile, **({"compile_s": r["compile_s"]} if compile else {})}
    if prefill_tokens:
        pre = r["prefill_s"]
        out.update(prefill_s=pre, prefill_speedup=pre["dense"] / pre["sparse"], prefill_tokens=prefill_tokens)
    return out


def c_kernels_note() -> str:
    """Whether the compiled decode kernels run here, and on which path; printed when they do not (a fallback to
    torch's kernels is said, not silent)."""
    from elsa.artifacts import kernels as SK
    why = SK.unavailable()
    if why:
        print(f"elsa: the compiled sparse kernels are not available ({why}); torch's kernels only", file=sys.stderr)
        return f"unavailable: {why}"
    return f"available ({SK.simd()})"


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX-512 BF16 or AMX): where a dense bf16 model is the baseline to beat."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def speed_table(model, new_tokens: int = 32, rounds: int = 3, ids: torch.Tensor | None = None,
                plan_dir: Path | None = None, bf16: bool | None = None, prefill_tokens: int | None = None,
                pruning_plan=None) -> dict:
    """The model dense (its dtype; each dense matrix in the faster of its layouts, ``dense_layout``) against the
    sparse kernels in the same dtype (its dense matrices in the same layouts) and, where the CPU has bf16
    arithmetic (or ``bf16``), against dense bf16 and sparse with bf16 values, all side by side:
    tokens/s of each, the speedups against dense in the same dtype and against the faster dense, the kernels
    chosen and whether greedy tokens equal the dense model's of the same dtype. ``pruning_plan``: the run's
    plan (or a saved one's record), which picks the matrices and offers the N:M kernel (sparsify)."""
    from elsa.artifacts.linear import dense_layouts, sparsify_with_plan

    if bf16 is None:
        bf16 = cpu_has_bf16() and next(model.parameters()).device.type == "cpu"
    sources = {"dense": model}
    if bf16 and next(model.parameters()).dtype != torch.bfloat16:
        sources["dense_bf16"] = copy.deepcopy(model).to(torch.bfloat16)
    models, plans, layouts = {}, {}, {}
    for name, src in sources.items():
        sparse = copy.deepcopy(src)
        # the dense baseline at its best: each dense matrix in the faster of its two layouts (dense_layouts), on a
        # copy of the modules that shares the weights (the run's model stays as it is); the sparse model's dense
        # matrices (its head) take the same layouts
        dense = copy.deepcopy(src, {id(p): p for p in src.parameters()})
        layouts[name] = dense_layouts(dense)
        plans[name] = sparsify_with_plan(sparse, plan_dir, pruning_plan=pruning_plan, dense_layout=layouts[name])
        models[name], models[name.replace("dense", "sparse")] = dense, sparse
    same = {k.replace("dense", "sparse"): k for k in plans}
    r = compare(models, ids, new_tokens, rounds, prefill_tokens, same)
    tps = r["decode_tokens_per_s"]
    best = max(v for k, v in tps.items() if k.startswith("dense"))
    r["decode_speedup"] = tps["sparse"] / tps["dense"]
    r["decode_speedup_vs_best_dense"] = {k: v / best for k, v in tps.items() if k.startswith("sparse")}
    if "dense_bf16" in tps:
        r["decode_speedup_bf16"] = tps["sparse_bf16"] / tps["dense_bf16"]
        r["dense_bf16_over_fp32"] = tps["dense_bf16"] / tps["dense"]
    r["same_tokens"] = r["same_tokens_as"]["sparse"]
    r["kernels"] = plans["dense"]["chosen"]
    r["c_kernels"] = c_kernels_note()
    r["plans"] = {k.replace("dense", "sparse"): {"chosen": p["chosen"], "source": p["source"],
                                                 "note": p.get("plan_note"), "verified_in_model": p["verified_in_model"]}
                  for k, p in plans.items()}
    r["dense_layout"] = {k: layout_summary(v) for k, v in layouts.items()}
    return r


def layout_summary(layouts: dict) -> dict:
    """What :func:`elsa.artifacts.linear.dense_layouts` chose, in a line of results.json: how many dense matrices
    run transposed, of how many, which (up to 4 names, else the count) and their measured gains."""
    t = sorted(n for n, c in layouts.items() if c["layout"] == "t")
    gains = [layouts[n]["gain"] for n in t]
    return {"transposed": len(t), "of": len(layouts), "names": t if len(t) <= 4 else t[:4] + [f"... {len(t) - 4} more"],
            "gains": [min(gains), max(gains)] if gains else []}


def measure(model, tok, new_tokens: int = 32, rounds: int = 3, prompt: str = "The history of the city",
            plan_dir: Path | None = None, pruning_plan=None) -> dict:
    """What a run records with measure_speed=true (:func:`speed_table`): dense against the sparse kernels side by
    side, in the model's dtype and (CPU with bf16 arithmetic) in bf16, plus which kernels were chosen. With
    ``plan_dir`` (the run's compressed model dir) the plans are saved there for elsa.artifacts.generate;
    ``pruning_plan``: the run's PruningPlan."""
    ids = tok(prompt, return_tensors="pt")["input_ids"].to(next(model.parameters()).device)
    return speed_table(model, new_tokens, rounds, ids, plan_dir, pruning_plan=pruning_plan)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m elsa.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path, help="an HF dir (<run>/model) or a compressed dir (<run>/model_compressed)")
    parser.add_argument("--prompt", default="The history of the city")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--sparse", action="store_true", help="run the pruned matrices with the sparse kernels of "
                        "the plan saved in the dir (measured and saved there when there is none for this setting)")
    parser.add_argument("--compare", action="store_true", help="dense and sparse side by side (implies --sparse)")
    parser.add_argument("--remeasure", action="store_true", help="measure the plan again (and save it)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="load the weights in this dtype (bfloat16: bf16 values and activations)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="--compare: run both models under torch.compile "
                        "(each compiled once before the timing, minutes on a CPU; the sparse kernels as torch ops)")
    args = parser.parse_args(argv)
    try:
        if args.max_new_tokens < 2:
            raise ElsaError(f"--max-new-tokens={args.max_new_tokens} is not allowed: a whole number >= 2")
        if args.compile and not args.compare:
            raise ElsaError("--compile is allowed with --compare only (it times dense and sparse compiled alike)")
        if args.threads is not None:
            if args.threads < 1:
                raise ElsaError(f"--threads={args.threads} is not allowed: a whole number >= 1")
            torch.set_num_threads(args.threads)
        from elsa.logs import quiet_third_party_logs
        from elsa.artifacts.compressed import load_any, read_plan

        quiet_third_party_logs()
        model, tok = load_any(args.model_dir, getattr(torch, args.dtype) if args.dtype else None)
        ids = tok(args.prompt, return_tensors="pt")["input_ids"]
        if args.compare or args.sparse:
            from elsa.artifacts.linear import dense_layouts, sparsify_with_plan

            sparse = copy.deepcopy(model) if args.compare else model
            # --compare: the dense model at its best too (dense_layouts), the sparse one's dense matrices alike
            layouts = dense_layouts(model) if args.compare else None
            plan = sparsify_with_plan(sparse, args.model_dir, progress=True, remeasure=args.remeasure,
                                      pruning_plan=read_plan(args.model_dir), dense_layout=layouts)
            print(f"kernels {plan['chosen']}; plan: {plan['plan_note']}; compiled kernels: {c_kernels_note()}",
                  file=sys.stderr)
        if args.compare:
            r = side_by_side(model, sparse, ids, args.max_new_tokens, compile=args.compile)
            out, _ = greedy(sparse, ids, args.max_new_tokens)
            print(tok.decode(out[0], skip_special_tokens=True))
            print(f"kernels {plan['chosen']}; decode {r['decode_tokens_per_s']['dense']:.1f} tokens/s dense, "
                  f"{r['decode_tokens_per_s']['sparse']:.1f} sparse ({r['decode_speedup']:.2f}x)"
                  f"{'; both compiled' if args.compile else ''}; same tokens: {r['same_tokens']}; "
                  f"rounds spread {steadiness(r['decode_rounds'])}")
            return 0
        out, secs = greedy(model, ids, args.max_new_tokens)
        print(tok.decode(out[0], skip_special_tokens=True))
        print(f"decode: {(args.max_new_tokens - 1) / secs:.1f} tokens/s ({'sparse' if args.sparse else 'dense'}, "
              f"{torch.get_num_threads()} threads)", file=sys.stderr)
    except ElsaError as exc:
        print(f"elsa: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
