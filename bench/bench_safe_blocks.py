"""SAFE against SparseGPT and ALPS per decoder block of the default model: the block reconstruction error each
reaches on the same calibration data (issue 14 item 3; run by hand, figures go to docs/results.md with the
command that produced them).

    python bench/bench_safe_blocks.py [--blocks 0,15,29] [--sparsity 0.7] [--nsamples 64]
                                      [--methods sparsegpt,alps,safe] [--safe-epochs 30] [--safe-lam 1e-3]
                                      [--safe-lr 2e-4] [--out FILE.jsonl]

Loads SmolLM2-135M (model=smollm2-135m, the default) and ``nsamples`` calibration windows of 512 wiki-train
tokens (seed 0, the pipeline's sampling), walks the *dense* model to get every chosen block's dense input, and
prunes a fresh copy of that block with each method, as the layer-wise engine does (its statistics collected by
the engine on those inputs, then the method's ``prune_block``), each method with its conf/method/<name>.yaml
defaults (SAFE: its paper's 30 epochs, SAM rho 2e-4, ADMM interval 32, unless ``--safe-epochs`` /
``--safe-interval`` say otherwise; fewer epochs keep the paper's warmup share, 2 of 30). Per block and method it prints and appends one JSON line: the block output's
MSE against the dense block's output on the same inputs, the same relative to the dense output's mean square,
and the seconds taken. All methods see the same dense inputs, so the numbers isolate the per-block solver (the
engine in a real run feeds each block the pruned earlier blocks' outputs).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("WANDB_MODE", "disabled")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", default="0,15,29")
    parser.add_argument("--sparsity", default="0.7")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--methods", default="sparsegpt,alps,safe")
    parser.add_argument("--safe-epochs", type=int, default=None, help="default: conf/method/safe.yaml (30)")
    parser.add_argument("--safe-interval", type=int, default=None, help="default: conf/method/safe.yaml (32)")
    parser.add_argument("--safe-lam", type=float, default=None, help="default: conf/method/safe.yaml (1e-3)")
    parser.add_argument("--safe-lr", type=float, default=None, help="default: conf/method/safe.yaml (2e-4)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "safe_blocks.jsonl")
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from elsa.data.corpora import sample_starts, token_stream, windows
    from elsa.eval.perplexity import bos_id
    from elsa.engines.layerwise import LayerwiseEngine, _hidden
    from elsa.model.structure import blocks_and_prefix
    from elsa.run.recipe import build
    from elsa.sparsity.plan import PruningPlan
    from elsa.sparsity.patterns import Sparsity

    def config(method: str):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            return compose(config_name="config", overrides=["logger=none", f"method={method}"])

    cfg = config("sparsegpt")
    model, tok = instantiate(cfg.model).load()
    model.eval()
    train = token_stream(tok, instantiate(cfg.dataset), "train")
    calib = windows(train, cfg.seqlen, bos_id(tok, bool(cfg.eval.add_bos)),
                    sample_starts(len(train), args.nsamples, cfg.seqlen, cfg.seed))
    target = Sparsity.parse(args.sparsity if ":" in args.sparsity else float(args.sparsity))
    chosen = sorted(int(b) for b in args.blocks.split(","))
    methods = {}
    for name in args.methods.split(","):
        node = config(name).method
        if name == "safe":
            if args.safe_epochs is not None:
                node.warmup_epochs = node.warmup_epochs * args.safe_epochs / node.epochs   # the paper's 2 of 30
                node.epochs = args.safe_epochs
            if args.safe_interval is not None:
                node.interval = args.safe_interval
            if args.safe_lam is not None:
                node.lam = args.safe_lam
            if args.safe_lr is not None:
                node.lr = args.safe_lr
        methods[name] = node
    batch = int(methods.get("safe", cfg.method).batch_size)

    engine = LayerwiseEngine(model, "cpu", batch)
    plan = PruningPlan.build(model, target)
    blocks, prefix = blocks_and_prefix(model)
    with torch.no_grad():
        hiddens, kwargs = engine.capture(calib)
        for index, block in enumerate(blocks):               # the dense walk up to the last chosen block
            if index > chosen[-1]:
                break
            batches = list(zip(hiddens, kwargs[index]))
            outputs = [_hidden(block(h, **kw)) for h, kw in batches]
            if index in chosen:
                dense_out = [y.float() for y in outputs]
                scale = sum(float(y.square().sum()) for y in dense_out) / sum(y.numel() for y in dense_out)
                for name, node in methods.items():
                    method = build(node, "method")
                    method.without_tokens = []
                    pruned = copy.deepcopy(block)
                    t0 = time.perf_counter()
                    view = plan.block(index).on(pruned)
                    stats = engine._collect(method, view, batches)
                    info = method.prune_block(view, stats, batches)
                    seconds = time.perf_counter() - t0
                    total, count = 0.0, 0
                    for (h, kw), y in zip(batches, dense_out):
                        total += float((_hidden(pruned(h, **kw)).float() - y).square().sum())
                        count += y.numel()
                    rec = {"block": index, "method": name, "sparsity": str(target), "nsamples": args.nsamples,
                           "mse": total / count, "relative_mse": total / count / scale, "seconds": round(seconds, 1),
                           "settings": {k: v for k, v in node.items() if k in ("epochs", "interval", "rho", "lam", "lr",
                                                                             "max_iters", "percdamp")},
                           "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "loadavg": os.getloadavg(), "threads": torch.get_num_threads()}
                    if name == "safe":
                        rec["safe"] = {k: v for k, v in next(iter(info.values())).items()
                                       if "mse" in k or k in ("steps", "primal_residual")}
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    with open(args.out, "a") as fh:
                        fh.write(json.dumps(rec) + "\n")
                    print(json.dumps(rec), flush=True)
            hiddens = outputs
            kwargs[index] = None


if __name__ == "__main__":
    main()
