"""Where ELSA's ADMM stands in a training checkpoint (issue 26's diagnosis of the dense-start runs).

    python bench/admm_state.py /work/elsa_claim/s90/checkpoints/elsa.pt [--every 3] [--kind q_proj]

For every ``--every``-th block's matrices whose name contains ``--kind``: the median |w| on z's support and off it,
the median |u| off it, the median |w + u| off it (the projection's score of a pruned coordinate, to compare with
the kept weights' |w|), lambda |w - z + u| off it (the coupled proximal gradient), and Adam's gradient scale
sqrt(v) (its second moment; the proximal term included) per parameter size. Reads the checkpoint memory-mapped.
"""
from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--kind", default="q_proj")
    args = ap.parse_args()
    st = torch.load(args.checkpoint, mmap=True, weights_only=False)
    admm, model, lam = st["admm"], st["model"], st["lambda"]["current"]
    print(f"step {st['step']}, lambda {lam}")
    print("matrix | med|w| kept | med|w| pruned | med|u| pruned | med|w+u| pruned | med lam|w-z+u| pruned")
    names = [n for n in admm["z"] if args.kind in n]
    for n in names[::args.every]:
        z, u = admm["z"][n].float(), admm["u"][n].float()
        w = model[n if n in model else n + ".weight"].float()
        kept = z != 0
        med = lambda t: t.abs().median().item()  # noqa: E731
        print(n, *(f"{x:.3g}" for x in (med(w[kept]), med(w[~kept]), med(u[~kept]), med(w[~kept] + u[~kept]),
                                        med(lam * (w - z + u)[~kept]))))
    sizes: dict[int, list] = {}
    for s in st["optimizer"]["state"].values():
        v = s.get("exp_avg_sq")
        if isinstance(v, torch.Tensor):
            sizes.setdefault(v.numel(), []).append(v)
    for numel, vs in sorted(sizes.items())[-3:]:
        print(f"parameters of {numel} values: median sqrt(v) {torch.cat([v.float().sqrt().flatten() for v in vs[:3]]).median().item():.3g}")


if __name__ == "__main__":
    main()
