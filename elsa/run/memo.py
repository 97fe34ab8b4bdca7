"""A sweep's memory of the last layer-wise solution it computed, so that a later job's start stage does not redo it.

In ``-m method=sparsegpt,elsa start=sparsegpt`` (experiment=demo, frontier) the ELSA job starts from the weights
the SparseGPT job of the same sweep just computed, instead of running SparseGPT again. The memo belongs to the
sweep: :class:`elsa.run.sweep.SweepCallback` makes one when the sweep starts (:func:`open_for_sweep`) and drops it
when the sweep ends; a single run has none. It lives only where the sweep's jobs share its process (Hydra's
basic launcher); a launcher that runs jobs in other processes computes each start anew.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from elsa.run.spec import METADATA

_sweep: "SolutionMemo | None" = None   # the memo of the sweep running in this process, if any


class SolutionMemo:
    """One entry: the prunable matrices' weights on the CPU, the method statistics and the job dir that computed
    them. A solution is reused only when everything it depends on is the same: the model, the targets and
    ignores, the method's keys, the target and its allocated per-matrix ratios, the calibration tokens, the seed,
    the device and torch's thread count (so the weights are the ones recomputing would give, bit for bit:
    tests/test_choices.py)."""

    def __init__(self):
        self.entry: tuple[str, dict, dict, str] | None = None

    @staticmethod
    def key(run, node: DictConfig, calib: torch.Tensor | None) -> str:
        spec = getattr(run, "spec", None)     # budget keys a one-shot method was given and does not take
        dropped = spec.budget_not_applicable if spec is not None else {}
        keys = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items()
                if k not in METADATA and k not in dropped}
        ratios = run.plan.allocated_ratios()
        allocated = sorted(ratios.items()) if ratios is not None else None   # owl / profile ratios
        ident = [run.source.fingerprint(), run.dataset.fingerprint("train"), keys, str(run.target), allocated,
                 ratios is not None, run.seqlen, run.seed, run.ignore, run.targets, run.device, torch.get_num_threads(),
                 hashlib.sha256(calib.numpy().tobytes()).hexdigest() if calib is not None else None]
        return json.dumps(ident, sort_keys=True, default=str)

    def store(self, key: str, plan, stats: dict, out: Path) -> None:
        """Keep the solution of the planned matrices of ``plan`` (elsa.sparsity.plan), its statistics and dir."""
        weights = {n: m.weight.detach().to("cpu", copy=True) for n, m in plan.named_matrices().items()}
        self.entry = (key, weights, copy.deepcopy(stats), str(out))

    def restore(self, key: str, plan) -> tuple[dict, str] | None:
        """Write the stored solution into the planned matrices of ``plan`` and return (its statistics, the dir that computed it), or
        None when the stored one is not this solution."""
        if self.entry is None or self.entry[0] != key:
            return None
        _, weights, stats, out = self.entry
        with torch.no_grad():
            for name, m in plan.named_matrices().items():
                m.weight.copy_(weights[name])
        return copy.deepcopy(stats), out


def open_for_sweep() -> SolutionMemo:
    """A new memo for the sweep starting in this process (elsa.run.sweep.SweepCallback.on_multirun_start)."""
    global _sweep
    _sweep = SolutionMemo()
    return _sweep


def close_for_sweep() -> None:
    """The sweep ended: its memo and the weights it holds go."""
    global _sweep
    _sweep = None


def for_this_sweep() -> SolutionMemo | None:
    """The memo of the sweep whose job runs in this process, or None (a single run, another launcher)."""
    return _sweep
