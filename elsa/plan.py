"""``python -m elsa.plan <the same overrides as run.py>``: the plan of a run (elsa/run/forecast.py), printed per phase.

The command line lives apart from the planner so that the pipeline, which runs the same plan before every run,
imports the planner without the planner importing the pipeline (no import cycle).
"""
from __future__ import annotations

import json
import sys

from elsa.run.forecast import *  # noqa: F401,F403 - the planner's names, as elsa.plan gave them
from elsa.run.forecast import Plan, full_model, rates, setting


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from elsa.run.recipe import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def main(argv: list[str] | None = None) -> None:
    import argparse

    from elsa.errors import ElsaError
    from elsa.run.recipe import build, quiet_third_party_logs, refuse_old_spellings

    ap = argparse.ArgumentParser(prog="python -m elsa.plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    ap.add_argument("--ranks", type=int, default=None, help="FSDP ranks (hardware=fsdp)")
    ap.add_argument("--full", action="store_true", help="a rehearsal (model=shapes): also the whole model at "
                    "the papers' 128 x 2048 calibration tokens, here and on the reference 80 GB GPU")
    ap.add_argument("--refresh-rates", action="store_true", help="measure this machine's rates again")
    ap.add_argument("--load", type=float, default=None, help="plan for this load average instead of the current")
    args, overrides = ap.parse_known_args(argv)
    refuse_old_spellings(overrides)
    quiet_third_party_logs()
    try:
        cfg = compose(overrides)
        method = build(cfg.method, "method")
        start = build(cfg.start, "start") if cfg.get("start") is not None and "_target_" in cfg.start and \
            method.takes_start else None
        st = setting(cfg, build(cfg.model, "model"), method, start, args.ranks)
        st.load = args.load
        if args.refresh_rates:
            rates(st.threads, refresh=True)
        plan = Plan(st).build()
    except ElsaError as exc:
        print(f"elsa: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    out = plan.as_dict()
    text = [plan.table(), plan.forecast()]
    if args.full and plan.S.layers != plan.S.blocks:
        from dataclasses import replace

        big = full_model(plan.S)
        for device in ("cpu", "cuda"):
            p = Plan(replace(st, nsamples=128, seqlen=2048, device=device, load=0.0), big, plan.base).build()
            out[f"full_{device}"] = p.as_dict()
            text += [f"\nthe whole model ({big.layers} blocks) at 128 x 2048 calibration tokens on {p.where()} (idle):",
                     p.table()]
    print(json.dumps(out, indent=1, default=str) if args.json else "\n".join(text))


if __name__ == "__main__":
    main()
