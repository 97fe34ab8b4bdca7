"""What a run's phases cost: tokens processed, an estimate of the FLOPs, wall time (results.json ``compute``).

A training row and a one-shot row are only comparable next to what each cost, so every run records, per
phase (``calibration``: a layer-wise method's walk over its calibration windows, or an allocation's;
``start``: the start stage; ``training``: a training method's steps; ``evaluation``: the perplexity windows):

- ``tokens``: the tokens the phase pushed through the model (training: steps x batch x grad_accum x seqlen x
  ranks);
- ``flops``: an estimate, by the rules below (``rule`` names the one used), counted per token with ``N`` =
  the weights of the model's matrix multiplications (decoder-block matrices and the output head; every expert
  of a MoE counts, so a MoE's figure is its dense equivalent):
  training 6N per token (forward and backward) plus 2N for the teacher's forward where the method distils;
  evaluation 2N per token; the layer-wise walk 3 x 2N_blocks per calibration token (the capture, the statistics
  pass and the pruned re-run of each block) plus the method's own per-matrix work (``Pruner.matrix_flops``);
- ``wall_s``: the phase's wall time on this run's machine.
"""
from __future__ import annotations

from torch import nn

from elsa.model.structure import decoder_blocks


def block_matmul_params(model: nn.Module) -> int:
    """Weights of the matrix multiplications inside the decoder blocks (every expert counted)."""
    return sum(p.numel() for p in decoder_blocks(model).parameters() if p.dim() >= 2)


def matmul_params(model: nn.Module) -> int:
    """``N``: the decoder blocks' matrices plus the output head (a tied head counts once, as the matmul it is)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return block_matmul_params(model) + (head.weight.numel() if head is not None else 0)


def phase(tokens: int, flops: float | None, wall_s: float | None, rule: str) -> dict:
    return {"tokens": int(tokens), "flops": None if flops is None else float(flops),
            "wall_s": None if wall_s is None else round(float(wall_s), 3), "rule": rule}


def training(n: int, tokens: int, distils: bool, heldout_tokens: int, wall_s: float) -> dict:
    """A training method's steps (``tokens``) and its held-out evaluations (``heldout_tokens``)."""
    per_token = 6 * n + (2 * n if distils else 0)
    out = phase(tokens, per_token * tokens + 2 * n * heldout_tokens, wall_s,
                "6N per training token" + (" + 2N teacher forward" if distils else "") + " + 2N per held-out token")
    out["heldout_tokens"] = int(heldout_tokens)
    return out


def layerwise(model: nn.Module, method, tokens: int, matrices: dict, wall_s: float | None) -> dict:
    """A layer-wise method's walk over ``tokens`` calibration tokens; ``matrices``: name -> Matrix."""
    walk = 3 * 2 * block_matmul_params(model) * tokens
    own = sum(method.matrix_flops(m.out_features, m.in_features, tokens) for m in matrices.values())
    return phase(tokens, walk + own, wall_s, f"3 x 2N_blocks per calibration token + {type(method).__name__}'s "
                                             "per-matrix work")


def evaluation(n: int, tokens: int, wall_s: float | None) -> dict:
    return phase(tokens, 2 * n * tokens, wall_s, "2N per token")


def pruning(plan, method, calib_tokens: int, stats: dict, wall_s: float | None) -> tuple[str, dict]:
    """(phase name, record) of a method's own work on the matrices of ``plan`` (elsa.sparsity.plan): a training
    method's steps (its engine's record), a layer-wise method's calibration walk, or a data-free method's
    selection."""
    if isinstance(stats.get("compute"), dict):
        return "training", stats["compute"]
    matrices = plan.named_matrices()
    if getattr(method, "needs_calibration", False):
        return "calibration", layerwise(plan.model, method, calib_tokens, matrices, wall_s)
    own = sum(method.matrix_flops(m.out_features, m.in_features, 0) for m in matrices.values())
    return "selection", phase(0, own, wall_s, f"{type(method).__name__}'s per-matrix work, no data")


def total(record: dict) -> dict:
    flops = [p["flops"] for p in record.values() if isinstance(p, dict) and "flops" in p]
    return {"tokens": sum(p["tokens"] for p in record.values() if isinstance(p, dict) and "tokens" in p),
            "flops": None if any(f is None for f in flops) else sum(flops)}
