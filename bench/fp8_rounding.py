"""How much FP8 e4m3 rounds ELSA-L's z, with the per-tensor scale (the codec's and the reference's) and with a
per-row scale: z taken as the first projection from the dense model (each decoder matrix magnitude-pruned to
SPARSITY), the error as ||Q(z) - z|| / ||z|| over every decoder matrix together.

    python bench/fp8_rounding.py [checkpoint.safetensors] [--sparsity 0.9]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from elsa.engines.admm import Fp8Codec


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", nargs="?", default=None,
                    help="a model.safetensors (default: the default model's, from the elsa cache)")
    ap.add_argument("--sparsity", type=float, default=0.9)
    args = ap.parse_args(argv)
    if args.checkpoint is None:
        from elsa.assets import cache_dir
        args.checkpoint = str(cache_dir() / "models" / "smollm2-135m-hf" / "model.safetensors")
    if not Path(args.checkpoint).is_file():
        raise SystemExit(f"elsa: error: checkpoint={args.checkpoint}: no such file; a model.safetensors, or run "
                         "`python run.py method=magnitude` once to build the default model")
    codec, sums = Fp8Codec(), {"tensor": 0.0, "row": 0.0, "z": 0.0}
    for name, w in load_file(args.checkpoint).items():
        if w.ndim != 2 or ".layers." not in f".{name}":      # the decoder blocks' matrices
            continue
        w = w.float()
        keep = w.abs().flatten().kthvalue(max(1, int(args.sparsity * w.numel()))).values
        z = w * (w.abs() > keep)
        scale = z.abs().amax(1, keepdim=True).clamp_min(1e-30) / codec.FMAX
        sums["tensor"] += float((codec.decode(codec.encode(z)) - z).pow(2).sum())
        sums["row"] += float(((z / scale).to(torch.float8_e4m3fn).float() * scale - z).pow(2).sum())
        sums["z"] += float(z.pow(2).sum())
    print(f"FP8 e4m3 rounding of z at {args.sparsity:.0%} (||Q(z) - z|| / ||z||): per-tensor scale "
          f"{(sums['tensor'] / sums['z']) ** 0.5:.2%}, per-row scale {(sums['row'] / sums['z']) ** 0.5:.2%}")


if __name__ == "__main__":
    main()
