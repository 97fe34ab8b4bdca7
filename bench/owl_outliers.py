"""OWL's measured outlier ratios and layer sparsities on a model (issue 15), without pruning or evaluating.

    python bench/owl_outliers.py [overrides...]    # default: the bench protocol's model and calibration

Composes the real config (model, dataset, nsamples, seqlen, seed), samples the calibration windows as the
pipeline does and runs elsa.sparsity.allocation.Owl.allocate for each --sparsity; prints one JSON line per target.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("WANDB_MODE", "disabled")


def main(argv: list[str]) -> int:
    from conftest import compose

    from elsa.data.corpora import sample_starts, token_stream, windows
    from elsa.sparsity.plan import PruningPlan
    from elsa.eval.perplexity import bos_id
    from elsa.run.recipe import build, seed_everything
    from elsa.sparsity.patterns import Sparsity

    sparsities = [a.split("=", 1)[1] for a in argv if a.startswith("--sparsity=")] or ["0.7", "0.8"]
    overrides = [a for a in argv if not a.startswith("--sparsity=")]
    cfg = compose(["allocation=owl", "logger=none", *overrides])
    seed_everything(cfg.seed)
    model, tok = build(cfg.model, "model").load()
    train = token_stream(tok, build(cfg.dataset, "dataset"), "train")
    calib = windows(train, cfg.seqlen, bos_id(tok, bool(cfg.eval.add_bos)),
                    sample_starts(len(train), cfg.nsamples, cfg.seqlen, cfg.seed))
    owl = build(cfg.allocation, "allocation")
    for s in sparsities:
        t0 = time.perf_counter()
        plan = PruningPlan.build(model, Sparsity.parse(s))
        _, record = owl.allocate(plan, calib, str(cfg.hardware.device))
        print(json.dumps({"model": cfg.model.name, "sparsity": s, "nsamples": cfg.nsamples, "seqlen": cfg.seqlen,
                          "time_s": round(time.perf_counter() - t0, 1), **record}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
