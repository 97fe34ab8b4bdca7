"""SparseLLM against SparseGPT per MLP block of the default model (run by hand; figures go to docs/results.md
with the command that produced them).

    python bench/bench_sparsellm_blocks.py [--blocks 0,5,15,29] [--sparsities 0.5,0.7,0.9] [--nsamples 16]
                                           [--down-input pruned] [--iterations 4] [--threads 1]
                                           [--set method.mode=reference ...]

Loads SmolLM2-135M (model=smollm2-135m, the default) and ``nsamples`` calibration windows of 512 wiki-train
tokens (seed 0, the pipeline's sampling), captures each chosen block's MLP input X and dense output Y in the
dense model's forward, and prints, per block and sparsity, the real MLP error ||mlp(X) - Y||² / n of plain
SparseGPT on that MLP (every Linear from its dense weights and dense inputs, what method=sparsegpt does) and
of SparseLLM after each alternation (with the conf/method/sparsellm.yaml settings and the ``--set``
overrides), and the seconds taken. A block the settings skip (``method.skip``) runs its alternations anyway here.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", default="0,5,15,29")
    parser.add_argument("--sparsities", default="0.5,0.7,0.9")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=None, help="default: conf/method/sparsellm.yaml")
    parser.add_argument("--down-input", default=None, help="pruned or auxiliary (default: the config's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. method.mode=reference")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from elsa.data.corpora import sample_starts, token_stream, windows
    from elsa.eval.perplexity import bos_id
    from elsa.run.recipe import build as build_component
    from elsa.methods.sparsellm import model_mlp_structures, sparsellm_mlp
    from elsa.model.structure import decoder_blocks
    from elsa.sparsity.plan import PruningPlan
    from elsa.sparsity.patterns import Sparsity

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["logger=none", "method=sparsellm", *args.set])
    m = build_component(cfg.method, "method")
    iterations = args.iterations or m.iterations
    down_input = args.down_input or m.down_input
    model, tok = instantiate(cfg.model).load()
    model.eval()
    train = token_stream(tok, instantiate(cfg.dataset), "train")
    calib = windows(train, cfg.seqlen, bos_id(tok, bool(cfg.eval.add_bos)),
                    sample_starts(len(train), args.nsamples, cfg.seqlen, cfg.seed))
    blocks = decoder_blocks(model)
    chosen = [int(b) for b in args.blocks.split(",")]
    structures = model_mlp_structures(PruningPlan.build(model, Sparsity(0.5)))   # the MLPs, whatever the ratio
    io: dict[int, tuple[list, list]] = {b: ([], []) for b in chosen}
    handles = []
    for b in chosen:
        s = structures[b]
        first, down = blocks[b].get_submodule(s.first), blocks[b].get_submodule(s.down)
        handles.append(first.register_forward_hook(
            lambda _m, a, _o, b=b: io[b][0].append(a[0].reshape(-1, a[0].shape[-1]).float())))
        handles.append(down.register_forward_hook(
            lambda _m, _a, o, b=b: io[b][1].append(o.reshape(-1, o.shape[-1]).float())))
    with torch.no_grad():
        for i in range(0, len(calib), 4):
            model(input_ids=calib[i:i + 4], use_cache=False)
    for h in handles:
        h.remove()
    print(f"{len(calib)} x {cfg.seqlen} tokens, {iterations} alternations, down_input={down_input}, "
          f"alpha/beta/gamma {m.weights(structures[chosen[0]].kind)}, {m.recipe}, {args.threads} thread(s)",
          flush=True)
    print("| block | sparsity | SparseGPT | SparseLLM per alternation | SparseLLM / SparseGPT | s |")
    print("|---:|---:|---:|---|---:|---:|")
    for b in chosen:
        s = structures[b]
        x, y = torch.cat(io[b][0]), torch.cat(io[b][1])
        dense = {n: blocks[b].get_submodule(n).weight.detach().clone() for n in s.names()}
        for sp in args.sparsities.split(","):
            mods = {n: blocks[b].get_submodule(n) for n in s.names()}
            start = time.perf_counter()
            with torch.no_grad():
                out = sparsellm_mlp(mods[s.first], mods.get(s.up), mods[s.down], s.act, x, y, Sparsity.parse(sp),
                                    *m.weights(s.kind), iterations, m.blocksize, m.percdamp,
                                    f"block {b}", m.select, s.relu, down_input, recipe=m.recipe)
                for n, w in dense.items():          # the next sparsity starts from the dense MLP again
                    mods[n].weight.copy_(w)
            took = time.perf_counter() - start
            err, sg = out["mlp_error"], out["mlp_error_sparsegpt"]
            print(f"| {b} | {sp} | {sg:.4g} | {' → '.join(f'{e:.4g}' for e in err)} | {err[-1] / sg:.3f} | "
                  f"{took:.0f} |", flush=True)


if __name__ == "__main__":
    main()
