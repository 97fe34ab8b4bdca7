"""What an ELSA / ELSA-L checkpoint's ADMM state says about ELSA-L's low-precision z and u (issue 26, item 4).

    python bench/elsa_state.py /work/elsa_claim/s90_short/checkpoints/elsa.pt            # norms only (seconds)
    python bench/elsa_state.py /work/elsa_claim/s90_short/checkpoints/elsa.pt --eval     # + held-out perplexity

Norms over every pruned matrix: how far FP8 e4m3 (per-tensor scale, ELSA-L's z) rounds z, against how far the
kept weights sit from z (the target the proximal term pulls them toward); how far BF16 rounds u, and how many
weights a BF16 u moves across the next projection's threshold, and what share of the pruned weights' next dual
increments a BF16 u would lose (under half a BF16 step of u). ``--eval``: the held-out perplexity (the history's
protocol: 8,192 wiki test tokens in 512-token windows) of the weights projected as the history projects them
(each matrix's top-k by magnitude at z's count), and of the same with the kept weights rounded to FP8 and to BF16.
One thread; CPU only.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from elsa.engines.admm import Bf16Codec, Fp8Codec, SparseBf16Codec  # noqa: E402


def _decoded(stored) -> torch.Tensor:
    """A stored z / u as fp32, by its codec's own decode: a tensor (fp32 / BF16), FP8's (values, scale) or the
    sparse BF16 codec's (bits, values, shape)."""
    if not isinstance(stored, (tuple, list)):
        return stored.float()
    return (Fp8Codec() if len(stored) == 2 else SparseBf16Codec()).decode(stored)


def _top(w: torch.Tensor, count: int) -> torch.Tensor:
    if count >= w.numel():
        return w
    threshold = w.abs().flatten().kthvalue(w.numel() - count).values
    return w * (w.abs() > threshold)


def norms(ck: dict) -> dict:
    fp8, bf16 = Fp8Codec(), Bf16Codec()
    sums = dict(fp8_z=0.0, z=0.0, w_z=0.0, w_z_kept=0.0, bf16_u=0.0, u=0.0, flips=0, numel=0, swamped=0, pruned=0)
    for name, stored in ck["admm"]["z"].items():
        z, u = _decoded(stored), _decoded(ck["admm"]["u"][name])
        w = ck["model"][name + ".weight"].float()
        kept = z != 0
        sums["fp8_z"] += float((fp8.decode(fp8.encode(z)) - z).square().sum())
        sums["z"] += float(z.square().sum())
        sums["w_z"] += float((w - z).square().sum())
        sums["w_z_kept"] += float(((w - z) * kept).square().sum())
        u16 = bf16.decode(bf16.encode(u))
        sums["bf16_u"] += float((u16 - u).square().sum())
        sums["u"] += float(u.square().sum())
        # the next dual update adds w - z to u; in BF16 (round to nearest) an increment under half a step of u is lost
        inc, up = (w - z)[~kept], u[~kept]
        half_step = torch.where(up != 0, 2.0 ** (torch.floor(torch.log2(up.abs())) - 8), torch.zeros_like(up))
        sums["swamped"] += int((inc.abs() < half_step).sum())
        sums["pruned"] += inc.numel()
        count = int(kept.sum())
        sums["flips"] += int(((_top(w + u, count) != 0) ^ (_top(w + u16, count) != 0)).sum())
        sums["numel"] += z.numel()
    rel = lambda a, b: (sums[a] / max(sums[b], 1e-30)) ** 0.5  # noqa: E731
    return {"step": ck["step"], "fp8_rounding_of_z": rel("fp8_z", "z"), "w_minus_z": rel("w_z", "z"),
            "w_minus_z_on_support": rel("w_z_kept", "z"), "bf16_rounding_of_u": rel("bf16_u", "u"),
            "u_over_z": rel("u", "z"), "support_flips_from_bf16_u": sums["flips"] / sums["numel"],
            "dual_increments_lost_in_bf16": sums["swamped"] / max(sums["pruned"], 1)}


def perplexities(ck: dict) -> dict:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from elsa.data.corpora import eval_windows, token_stream
    from elsa.eval.perplexity import perplexity

    model, tok = instantiate(OmegaConf.load(REPO / "conf" / "model" / "smollm2-135m.yaml")).load()
    corpus = instantiate(OmegaConf.load(REPO / "conf" / "dataset" / "wiki.yaml"))
    windows = eval_windows(token_stream(tok, corpus, "test"), 512, tok.bos_token_id, 8192)
    state = {k: v.float() for k, v in ck["model"].items()}
    out = {}
    for label, codec in (("projected", None), ("kept_as_fp8", Fp8Codec()), ("kept_as_bf16", Bf16Codec())):
        weights = dict(state)
        for name, stored in ck["admm"]["z"].items():
            w = _top(state[name + ".weight"], int((_decoded(stored) != 0).sum()))
            weights[name + ".weight"] = w if codec is None else codec.decode(codec.encode(w))
        model.load_state_dict(weights, strict=False)
        out[label] = perplexity(model, windows, batch_size=4, desc=label)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--eval", action="store_true", help="also the held-out perplexities (about 2 minutes)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    ck = torch.load(a.checkpoint, map_location="cpu", weights_only=False)
    for k, v in norms(ck).items():
        print(f"{k}: {v:.6g}" if isinstance(v, float) else f"{k}: {v}")
    if a.eval:
        for k, v in perplexities(ck).items():
            print(f"heldout_ppl_{k}: {v:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
