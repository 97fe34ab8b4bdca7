"""How the overall sparsity ratio is split across the targeted matrices (``allocation=``), fixed before any
method runs.

- ``uniform`` (default): every matrix at the target ratio, each rounding its own count (rows their own with
  ``group=row``): the behaviour of every method before allocations existed, bit-identical.
- ``owl``: Outlier-Weighted Layerwise sparsity (Yin et al., ICML 2024). In the dense model's layer-wise walk
  over the calibration windows, every decoder layer's outlier ratio D_l is the fraction of its Wanda scores
  |W_ij| * ||X_j||_2 (over all of the layer's matrices together) above ``M`` times the layer's mean score. The
  layer ratios are spread over 2 * ``lam`` around the target, a higher outlier ratio getting a lower sparsity:
  s_l = target - (n_l - mean(n)), n_l = 2 lam (D_l - min D) / (max D - min D).
- ``global``: one magnitude threshold over all the targeted weights together (global magnitude pruning, as in
  Han et al. 2015 and the lottery-ticket line): each matrix's ratio is the fraction of its weights whose |w|
  falls below the overall target's threshold, capped at ``max_ratio``. Only |w| is ranked globally: the
  calibrated scores (Wanda's |W|·||X||, SparseGPT's w²/[H⁻¹]) are on each layer's own scale.
- ``profile``: a per-matrix (or per-weight) profile file: EvoPress's ``name: level`` (ratio = base + level *
  1e6 / numel, clipped to [0, 0.99]; base: the target) or a plain ``name: ratio`` map.

Every non-uniform allocation is then made exact: the ratios are shifted by one common constant (clipped to
[0, ``max_ratio``]) until they prune the requested fraction of the targeted weights, and the per-matrix counts
are rounded by largest remainder, so the overall count is round(target * targeted weights) exactly. The
result is the run's :class:`elsa.sparsity.plan.PruningPlan` with each matrix at its own ratio, which every method
reads.
An N:M target has one pattern for every matrix: a non-uniform allocation refuses it.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from elsa.errors import ElsaError, config_error, positive
from elsa.engines.layerwise import NO_TOKENS, LayerwiseEngine, LayerwisePruner
from elsa.sparsity.plan import MatrixId, PruningPlan
from elsa.sparsity.patterns import Sparsity

log = logging.getLogger(__name__)


class Allocation:
    """``uniform``: every matrix at the target (nothing to compute)."""

    name = "uniform"
    needs_calibration = False

    def check(self, target: Sparsity) -> None:
        """Before any model is loaded."""
        if self.name != "uniform" and target.is_nm:
            raise config_error("allocation", self.name, f"uniform with an N:M target (sparsity={target} sets the "
                               "same pattern in every matrix); a non-uniform allocation needs a ratio target")

    def prepare(self, plan: PruningPlan) -> None:
        """After the model is loaded and targets / ignore applied, before calibration (cheap checks)."""

    def allocate(self, plan: PruningPlan, calibration=None, device: str = "cpu") -> tuple[PruningPlan, dict]:
        """The plan with each matrix's ratio set, and the allocation's record for results.json."""
        return plan, {"name": self.name}


class Uniform(Allocation):
    """Every matrix at the target. ``exact=false`` (default): each matrix (each row with group=row) rounds its own
    count, as every method always did, so the overall count can differ from round(target * weights) by under one
    weight per matrix (row); ``exact=true``: the same ratio with the counts rounded so the total is exact."""

    def __init__(self, name: str = "uniform", exact: bool = False):
        if not isinstance(exact, bool):
            raise config_error("allocation.exact", exact, "true or false")
        self.exact = exact

    def check(self, target):
        if self.exact and target.is_nm:
            raise config_error("allocation.exact", True, "false with an N:M target (its count is fixed by N:M)")

    def allocate(self, plan, calibration=None, device="cpu"):
        if not self.exact:
            return plan, {"name": self.name}
        target, numels = plan.target, _numels(plan)
        counts = exact_counts({n: target.ratio for n in numels}, numels, target.ratio, 1.0 - 1e-12)
        return allocated_target(plan, counts, numels), {
            "name": self.name, "exact": True, "overall": sum(counts.values()) / sum(numels.values())}


# ---------------------------------------------------------------------------------------------------------
# making ratios exact


def _clipped_total(ratios: dict[str, float], numels: dict[str, int], shift: float, hi: float) -> float:
    return sum(min(max(r + shift, 0.0), hi) * numels[n] for n, r in ratios.items())


def exact_counts(ratios: dict, numels: dict, target_ratio: float, max_ratio: float = 0.99,
                 key: str = "allocation") -> dict:
    """Per-matrix prune counts close to ``ratios`` (shifted by one common constant, clipped to [0, max_ratio])
    whose sum is exactly round(target_ratio * total)."""
    total = sum(numels.values())
    want = int(round(target_ratio * total))
    caps = {n: int(math.floor(max_ratio * numels[n])) for n in numels}
    if want > sum(caps.values()):
        raise config_error(key, f"{target_ratio:g} of the targeted weights",
                           f"a total that the per-matrix cap of {max_ratio:g} allows (at most "
                           f"{sum(caps.values()) / total:.4f}); lower sparsity")
    lo, hi = -1.0, 1.0                              # bisection on the common shift
    for _ in range(200):
        mid = (lo + hi) / 2
        if _clipped_total(ratios, numels, mid, max_ratio) < want:
            lo = mid
        else:
            hi = mid
    exact = {n: min(max(r + hi, 0.0), max_ratio) * numels[n] for n, r in ratios.items()}
    counts = {n: min(int(math.floor(v)), caps[n]) for n, v in exact.items()}
    short = want - sum(counts.values())
    # largest remainder first (ties in the plan's order, so the result is deterministic)
    order = sorted(exact, key=lambda n: -(exact[n] - math.floor(exact[n])))
    i = 0
    while short > 0:
        n = order[i % len(order)]
        if counts[n] < caps[n]:
            counts[n] += 1
            short -= 1
        i += 1
    while short < 0:                                   # (only from float round-off of the bisection)
        n = order[-1 - (i % len(order))]
        if counts[n] > 0:
            counts[n] -= 1
            short += 1
        i += 1
    return counts


def _numels(plan: PruningPlan) -> dict[MatrixId, int]:
    return {mid: m.weight.numel() for mid, m, _t in plan.matrices()}


def allocated_target(plan: PruningPlan, counts: dict[MatrixId, int], numels: dict[MatrixId, int]) -> PruningPlan:
    return plan.with_ratios({n: counts[n] / numels[n] for n in counts})


def layer_of(plan: PruningPlan) -> dict[MatrixId, str]:
    """{matrix: the name of its decoder block}."""
    return {mid: f"{plan.prefix}.{mid.block}" for mid in plan.targets}


def per_layer_ratios(plan: PruningPlan, counts: dict[MatrixId, int], numels: dict[MatrixId, int]) -> dict[str, float]:
    """The allocated ratio of every decoder layer (its matrices together), in block order."""
    zeros, sizes = {}, {}
    for n, layer in layer_of(plan).items():
        zeros[layer] = zeros.get(layer, 0) + counts[n]
        sizes[layer] = sizes.get(layer, 0) + numels[n]
    return {layer: zeros[layer] / sizes[layer] for layer in zeros}


def _max_ratio(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise config_error("allocation.max_ratio", value, "a ratio in (0, 1)")
    return float(value)


# ---------------------------------------------------------------------------------------------------------
# OWL


class Owl(Allocation):
    """OWL: layer ratios from each layer's share of activation outliers (see the module docstring)."""

    name = "owl"
    needs_calibration = True

    def __init__(self, name: str = "owl", M: float = 5.0, lam: float = 0.08, max_ratio: float = 0.99, batch_size: int = 8):
        self.M = positive("allocation.M", M, paper="5")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 <= lam < 0.5:
            raise config_error("allocation.lam", lam, "a number in [0, 0.5) (the paper: 0.08)")
        self.lam = float(lam)
        self.max_ratio = _max_ratio(max_ratio)
        self.batch_size = positive("allocation.batch_size", batch_size, whole=True)

    def outlier_ratios(self, plan: PruningPlan, calibration, device: str = "cpu") -> dict[str, float]:
        """{block name: fraction of its scores above M x its mean score}, from the dense model's walk."""
        scan = OutlierScan(self.M, self.batch_size)
        where = next(plan.model.parameters()).device
        LayerwiseEngine(plan.model, device, self.batch_size).run(scan, calibration, plan)
        plan.model.to(where)
        return scan.ratios

    @staticmethod
    def layer_sparsity(outliers: list[float], target: float, lam: float) -> list[float]:
        """OWL's per-layer sparsities: spread 2 lam, mean = target, more outliers -> lower sparsity."""
        lo, hi = min(outliers), max(outliers)
        if hi - lo <= 0 or lam == 0:
            return [target] * len(outliers)
        spread = [(d - lo) / (hi - lo) * 2 * lam for d in outliers]
        mean = sum(spread) / len(spread)
        return [target - (s - mean) for s in spread]

    def allocate(self, plan, calibration=None, device="cpu"):
        if calibration is None:
            raise ElsaError("allocation=owl needs calibration windows (nsamples)")
        target = plan.target
        outliers = self.outlier_ratios(plan, calibration, device)
        layers = list(outliers)
        sparsity = dict(zip(layers, self.layer_sparsity([outliers[l] for l in layers], target.ratio, self.lam)))
        numels = _numels(plan)
        owner = layer_of(plan)
        counts = exact_counts({n: sparsity[owner[n]] for n in numels}, numels, target.ratio, self.max_ratio)
        per_layer = per_layer_ratios(plan, counts, numels)
        log.info("owl: outlier ratios %s -> layer sparsities %s", [round(outliers[l], 5) for l in layers],
                 [round(v, 4) for v in per_layer.values()])
        return allocated_target(plan, counts, numels), {
            "name": self.name, "M": self.M, "lambda": self.lam, "outlier_ratios": outliers,
            "per_layer": per_layer, "overall": sum(counts.values()) / sum(numels.values())}


class OutlierScan(LayerwisePruner):
    """A layer-wise 'method' that prunes nothing: it reads each block's Wanda scores and counts its outliers."""

    def __init__(self, M: float, batch_size: int = 8):
        super().__init__(batch_size)
        self.M = M
        self.ratios: dict[str, float] = {}

    def stats_init(self, name, linear):
        from elsa.methods.wanda import InputNorms
        return InputNorms(linear.in_features, linear.weight.device)

    def accumulate(self, stats, x):
        stats.add(x)
        return stats

    @torch.no_grad()
    def prune_block(self, block, stats, inputs):
        from elsa.methods.wanda import wanda_scores

        seen = {n: m for n, m in block.matrices().items() if stats[n] is not NO_TOKENS}
        total, count = 0.0, 0
        for n, m in seen.items():          # the layer's mean score over all its matrices together
            total += float(wanda_scores(m.weight, stats[n].norms()).double().sum())
            count += m.weight.numel()
        mean = total / max(count, 1)
        above = sum(int((wanda_scores(m.weight, stats[n].norms()) > self.M * mean).sum()) for n, m in seen.items())
        self.ratios[block.prefix] = above / max(count, 1)
        return {}


# ---------------------------------------------------------------------------------------------------------
# global magnitude


class GlobalMagnitude(Allocation):
    """``global``: every matrix's ratio from one |w| threshold over all the targeted weights together."""

    name = "global"

    def __init__(self, name: str = "global", max_ratio: float = 0.99):
        self.max_ratio = _max_ratio(max_ratio)

    @torch.no_grad()
    def ratios(self, plan: PruningPlan) -> dict[MatrixId, float]:
        """{matrix: fraction of its |w| below the global threshold} (the k-th smallest |w| of all targeted
        weights, k = round(target * total), found by a histogram over float32 bit patterns, so no copy of all
        the weights is held at once)."""
        matrices = {mid: m for mid, m, _t in plan.matrices()}
        total = sum(m.weight.numel() for m in matrices.values())
        k = int(round(plan.target.ratio * total))
        if k == 0:
            return {n: 0.0 for n in matrices}
        # |w| as float32 bits is monotone in |w|: bisect the threshold on the bit pattern
        lo, hi = 0, 0x7F800000                          # +0 .. +inf
        def below(t: int) -> int:
            thr = torch.tensor(t, dtype=torch.int32).view(torch.float32)
            return sum(int((m.weight.detach().abs().float() < thr).sum()) for m in matrices.values())
        while hi - lo > 1:                              # smallest t with below(t) >= k, at most 31 passes
            mid = (lo + hi) // 2
            if below(mid) >= k:
                hi = mid
            else:
                lo = mid
        thr = torch.tensor(hi, dtype=torch.int32).view(torch.float32)
        return {n: float((m.weight.detach().abs().float() < thr).sum()) / m.weight.numel() for n, m in matrices.items()}

    def allocate(self, plan, calibration=None, device="cpu"):
        numels = _numels(plan)
        counts = exact_counts(self.ratios(plan), numels, plan.target.ratio, self.max_ratio)
        return allocated_target(plan, counts, numels), {
            "name": self.name, "score": "magnitude", "per_layer": per_layer_ratios(plan, counts, numels),
            "overall": sum(counts.values()) / sum(numels.values())}


# ---------------------------------------------------------------------------------------------------------
# profile


FORMATS = ("auto", "evopress", "ratio")


class Profile(Allocation):
    """Per-matrix ratios from a file (see the module docstring). Names are matrix names (``...q_proj``; an
    expert ``...experts.down_proj[3]``) or a weight's name for all its experts; a trailing ``.weight`` is
    accepted. Unnamed targeted matrices take the target (EvoPress level 0). With ``renormalise`` (default) all
    ratios shift by one constant so the overall count is exact; without it the profile must already prune the
    requested fraction (to within one weight per matrix)."""

    name = "profile"

    def __init__(self, name: str = "profile", path: str | None = None, format: str = "auto", base: float | None = None,
                 renormalise: bool = True, max_ratio: float = 0.99):
        if not path:
            raise config_error("allocation.path", path, "a profile file (name: level, or name: ratio)")
        if format not in FORMATS:
            raise config_error("allocation.format", format, f"one of {', '.join(FORMATS)}")
        if base is not None and (isinstance(base, bool) or not isinstance(base, (int, float)) or not 0 <= base < 1):
            raise config_error("allocation.base", base, "null (the target) or a ratio in [0, 1)")
        self.path, self.format, self.base, self.renormalise = Path(str(path)).expanduser(), format, base, bool(renormalise)
        self.max_ratio = _max_ratio(max_ratio)
        self.entries = self._read()

    def _read(self) -> dict:
        import yaml

        if not self.path.is_file():
            raise config_error("allocation.path", self.path, "an existing profile file")
        try:
            data = yaml.safe_load(self.path.read_text())
        except yaml.YAMLError as exc:
            raise config_error("allocation.path", self.path, f"a YAML/JSON map name: level or name: ratio "
                               f"({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict) or not data:
            raise config_error("allocation.path", self.path, "a non-empty map name: level or name: ratio")
        for name, value in data.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise config_error(f"allocation.path {self.path}: {name}", value, "a number (a level or a ratio)")
        fmt = self.format
        if fmt == "auto":
            fmt = "evopress" if all(isinstance(v, int) for v in data.values()) else "ratio"
        if fmt == "evopress" and not all(float(v).is_integer() for v in data.values()):
            bad = next(k for k, v in data.items() if not float(v).is_integer())
            raise config_error(f"allocation.path {self.path}: {bad}", data[bad], "a whole level (format=evopress)")
        if fmt == "ratio":
            for name, value in data.items():
                if not 0 <= value < 1:
                    raise config_error(f"allocation.path {self.path}: {name}", value, "a ratio in [0, 1)")
        self.kind = fmt
        return {str(k)[:-len(".weight")] if str(k).endswith(".weight") else str(k): v for k, v in data.items()}

    def _resolve(self, plan: PruningPlan) -> dict[str, list[MatrixId]]:
        """{profile name: the matrices it sets}; an unknown name is an error."""
        out = {}
        for name in self.entries:
            mid = plan.id_of(name)
            if mid in plan.targets:
                out[name] = [mid]
            elif mid is not None and plan.weights[mid].experts is not None:
                out[name] = [m for m in plan.targets if m.weight == mid]
            else:
                matrices = plan.named_matrices()
                example = next(iter(sorted(matrices)), "none")
                raise config_error(f"allocation.path {self.path}: name", name,
                                   f"a targeted matrix of the model (e.g. {example}; {len(matrices)} in all)")
        return out

    def prepare(self, plan):
        self._resolve(plan)

    def allocate(self, plan, calibration=None, device="cpu"):
        target, numels = plan.target, _numels(plan)
        base = target.ratio if self.base is None else float(self.base)
        ratios = {n: target.ratio for n in numels}
        for name, matrices in self._resolve(plan).items():
            value = self.entries[name]
            for n in matrices:
                ratios[n] = min(max(base + value * 1e6 / numels[n], 0.0), 0.99) if self.kind == "evopress" else value
        if not self.renormalise:
            total = sum(numels.values())
            got = sum(r * numels[n] for n, r in ratios.items())
            if abs(got - target.ratio * total) > len(numels):
                raise config_error("allocation.path", self.path, f"a profile whose ratios prune sparsity={target} "
                                   f"of the targeted weights (it prunes {got / total:.4f}); or allocation.renormalise=true")
        counts = exact_counts(ratios, numels, target.ratio, self.max_ratio)
        return allocated_target(plan, counts, numels), {
            "name": self.name, "path": str(self.path), "format": self.kind, "renormalise": self.renormalise,
            "per_layer": per_layer_ratios(plan, counts, numels),
            "overall": sum(counts.values()) / sum(numels.values())}
