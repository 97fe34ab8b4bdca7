"""Issue 29: DSnoT's cycles and OATS's SVD on single matrices of the default model, with their real inputs.

The dense model's inputs of a few attention matrices (8 calibration windows of 512 wiki-train tokens, seed 0,
through the dense model: not the layer-wise walk's pruned inputs) give, per matrix:

  dsnot: the relative output error ||X (W - W_hat)^T|| / ||X W^T|| and the mean |expected error| per row
         (sum over the pruned weights of W_ij mean(x_j) x 512 tokens, DSnoT's criterion) of Wanda's mask and of
         DSnoT's refinement with 50 (the reference's), 7 and 2 cycles, at 70%;
  oats:  the scaled error ||W D - S' - L'|| / ||W D|| after 80 alternations with svd=exact and svd=subspace at
         50%, and their times.

    python bench/oneshot_matrices.py dsnot|oats
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import compose  # noqa: E402
from elsa.data.corpora import sample_starts, token_stream, windows  # noqa: E402
from elsa.methods.dsnot import DSnoT  # noqa: E402
from elsa.methods.oats import budget, oats_decompose  # noqa: E402
from elsa.methods.wanda import Wanda  # noqa: E402
from elsa.run.recipe import build  # noqa: E402
from elsa.sparsity.patterns import Sparsity  # noqa: E402

SEQLEN = 512


class Stand:
    """The part of a Linear that prune_linear uses."""

    def __init__(self, w):
        self.weight, self.in_features = w.clone(), w.shape[1]


def inputs(names: list[str]) -> tuple[dict, dict]:
    cfg = compose([])
    model, tok = build(cfg.model, "model").load()
    train = token_stream(tok, build(cfg.dataset, "dataset"), "train")
    calib = windows(train, SEQLEN, tok.bos_token_id, sample_starts(len(train), 8, SEQLEN, 0))
    mods = dict(model.named_modules())
    xs: dict[str, list] = {}
    for n in names:
        mods[n].register_forward_hook(lambda m, a, o, n=n: xs.setdefault(n, []).append(
            a[0].reshape(-1, a[0].shape[-1]).float()))
    with torch.no_grad():
        for i in range(0, len(calib), 2):
            model(calib[i:i + 2])
    return {n: torch.cat(v) for n, v in xs.items()}, {n: mods[n].weight.detach().float() for n in names}


def dsnot(names):
    xs, ws = inputs(names)
    for n in names:
        x, w, row = xs[n], ws[n], {}
        for label, m in (("wanda", Wanda()), ("dsnot50", DSnoT(skip="none")), ("dsnot7", DSnoT(skip="none", cycles=7)),
                         ("dsnot2", DSnoT(skip="none", cycles=2))):
            m.window = SEQLEN
            lin = Stand(w)
            stats = m.accumulate(m.stats_init(n, lin), x)
            info = m.prune_linear(n, lin, stats, Sparsity(0.7)) or {}
            rel = float((x @ (w - lin.weight).T).norm() / (x @ w.T).norm())
            expected = float((((w - lin.weight) * x.mean(0)).sum(1) * SEQLEN).abs().mean())
            row[label] = f"{rel:.4f} / {expected:.2f} / {info.get('swaps', 0)}"
        print(n, tuple(w.shape), "relative error / mean |expected error| / swaps:", row, flush=True)


def oats(names):
    xs, ws = inputs(names)
    for n in names:
        w, norms = ws[n], xs[n].pow(2).sum(0).sqrt()
        rank, sparse = budget(w.shape[0], w.shape[1], Sparsity(0.5), 0.25)
        row = {}
        for svd in ("exact", "subspace"):
            t = time.perf_counter()
            errors = oats_decompose(w, norms, rank, sparse, 80, svd)[3]
            row[svd] = f"{errors[0]:.5f} -> {errors[-1]:.5f} in {time.perf_counter() - t:.1f} s"
        print(n, tuple(w.shape), "rank", rank, row, flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    which = sys.argv[1] if len(sys.argv) > 1 else "dsnot"
    if which == "dsnot":
        dsnot([f"model.layers.{b}.self_attn.{p}" for b in (0, 10, 20) for p in ("q_proj", "o_proj")])
    else:
        oats([f"model.layers.{b}.{p}" for b in (0, 15) for p in ("self_attn.q_proj", "mlp.down_proj")])
