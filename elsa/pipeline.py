"""One run: validate -> seed -> load -> calibration data -> prune -> measure -> evaluate -> save -> log."""
from __future__ import annotations

import copy
import ctypes
import gc
import logging
import random
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from elsa import distributed as D
from elsa.allocation import Uniform
from elsa.data import sample_starts, token_stream, windows
from elsa.errors import ElsaError, config_error
from elsa.evaluation import PerplexityEval, bos_id, check_finite
from elsa.methods.base import PruneContext
from elsa.models import (apply_ignore, apply_targets, check_prunable, context_length, prunable_matrices,
                         weight_accounting)
from elsa.sparse import check_save_format, save_model
from elsa.sparsity import Sparsity, layer_report
from elsa.sweep import finished_result
from elsa.tracking import NullTracker, write_json_atomic
from elsa.zeroshot import ZeroShotEval

log = logging.getLogger(__name__)
# outputs/<overrides>: the same command line always maps to the same run dir
def dirname(overrides: str | None, limit: int = 200) -> str:
    """A run dir's name from its command line's overrides; a name over ``limit`` characters (file systems take
    255) keeps its first characters and a hash of the whole, so it stays one per distinct command line."""
    import hashlib

    name = (overrides or "default").replace("/", "_")
    if len(name) <= limit:
        return name
    return f"{name[:limit - 17]}...{hashlib.sha1(name.encode()).hexdigest()[:14]}"


OmegaConf.register_new_resolver("elsa_dirname", dirname, replace=True)
REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"


# what a mandatory (???) key expects, for the one-line error when it is left unset
REQUIRED = {"model.path": "model=hf needs model.path=<a local checkpoint directory holding config.json, or a hub id>"}


# keys of a method (or start) config that describe it rather than set it: its name, the budget that set it
METADATA = ("name", "budget")


def build(node: DictConfig, key: str):
    """Instantiate a component config; a method's or start's ``name`` and ``budget`` keys are metadata, not
    arguments."""
    if node is None or "_target_" not in node:
        raise config_error(key, node, f"a config with a _target_ (see conf/{key}/)")
    missing = [k for k in node if OmegaConf.is_missing(node, k)]
    if missing:
        name = f"{key}.{missing[0]}"
        raise ElsaError(f"{name} is not set: {REQUIRED.get(name, f'set it on the command line ({name}=...)')}")
    kwargs = {k: v for k, v in node.items() if k not in METADATA} if key in ("method", "start") else dict(node)
    try:
        return instantiate(OmegaConf.create(kwargs), _convert_="all")
    except InstantiationException as exc:  # surface our own one-line errors, not Hydra's wrapper
        if isinstance(exc.__cause__, ElsaError):
            msg = str(exc.__cause__)
            if key == "start" and msg.startswith("method."):  # a method class names its keys method.*
                raise ElsaError("start." + msg[len("method."):]) from None
            raise exc.__cause__ from None
        raise


def dataset_by_name(name: str):
    path = CONF / "dataset" / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (CONF / "dataset").glob("*.yaml"))
        raise config_error("eval.corpora", name, f"one of {', '.join(known)}")
    return build(OmegaConf.load(path), "dataset")


def _positive_int(cfg, key: str, allow_zero: bool = False) -> int:
    value = OmegaConf.select(cfg, key)
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise config_error(key, value, "a whole number >= 0" if allow_zero else "a whole number > 0")
    return value


def git_sha() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _release_freed_memory() -> None:
    """Hand memory that earlier jobs freed back to the OS (glibc keeps freed heap otherwise), so that it does
    not count in the next job's resident memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_memory(device: str) -> float | None:
    """Start this job's peak-memory window: Linux resets the process's peak RSS (VmHWM) on "5" written to
    /proc/self/clear_refs, so the jobs of one sweep process each report their own peak. Returns the resident
    memory (MB) the job starts with: what the process still holds from before (Python, torch, caches)."""
    _release_freed_memory()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    return _status_mb("VmRSS")


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_memory_mb(device: str, start_mb: float | None = None) -> dict:
    """Peak resident memory of this job (since :func:`reset_peak_memory`; the process's lifetime peak where
    the kernel cannot reset it), the resident memory it started with, and the accelerator's peak allocation."""
    hwm = _status_mb("VmHWM")
    out = {"cpu_rss": hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if start_mb is not None:
        out["cpu_rss_at_start"] = start_mb
    if str(device).startswith("cuda") and torch.cuda.is_available():
        out["gpu"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN"


def hydra_info() -> tuple[Path | None, list[str], str | None, str | None]:
    """(output dir, overrides, job name, sweep group) when running under Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None, [], None, None
    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    group = str(hc.sweep.dir)[-128:] if in_multirun() else None  # W&B: the runs of one sweep share a group
    return Path(hc.runtime.output_dir), overrides, ",".join(overrides) or "default", group


class SolutionMemo:
    """The last layer-wise solution this process computed, so that a sweep's start stage does not redo it:
    in ``-m method=sparsegpt,elsa start=sparsegpt`` (experiment=demo, frontier) the ELSA job starts from the
    weights the SparseGPT job of the same process just computed, instead of running SparseGPT again. A
    solution is reused only when everything it depends on is the same: the model, the targets and ignores,
    the method's keys, the target and its allocated per-matrix ratios, the calibration tokens, the seed, the device and torch's thread count (so
    the weights are the ones recomputing would give, bit for bit: tests/test_choices.py). One entry: the
    prunable matrices' weights on the CPU, the method statistics and the job dir that computed them."""

    entry: tuple[str, dict, dict, str] | None = None

    @staticmethod
    def applies() -> bool:
        """Only the jobs of a sweep share a process; one rank (FSDP ranks each hold a shard)."""
        return in_multirun() and D.world_size() == 1

    @staticmethod
    def key(run: "Run", node: DictConfig, calib: torch.Tensor | None) -> str:
        import hashlib
        import json

        keys = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in METADATA}
        allocated = sorted(run.target.per_matrix.items()) if run.target.allocated else None   # owl / profile ratios
        ident = [run.source.fingerprint(), run.dataset.fingerprint("train"), keys, str(run.target), allocated,
                 run.target.exact, run.seqlen, run.seed, run.ignore, run.targets, run.device, torch.get_num_threads(),
                 hashlib.sha256(calib.numpy().tobytes()).hexdigest() if calib is not None else None]
        return json.dumps(ident, sort_keys=True, default=str)

    @classmethod
    def store(cls, key: str, model, stats: dict, out: Path) -> None:
        weights = {n: m.weight.detach().to("cpu", copy=True) for n, m in prunable_matrices(model).items()}
        cls.entry = (key, weights, copy.deepcopy(stats), str(out))

    @classmethod
    def restore(cls, key: str, model) -> tuple[dict, str] | None:
        """Write the stored solution into ``model`` and return (its statistics, the dir that computed it), or
        None when the stored one is not this solution."""
        if cls.entry is None or cls.entry[0] != key:
            return None
        _, weights, stats, out = cls.entry
        with torch.no_grad():
            for name, m in prunable_matrices(model).items():
                m.weight.copy_(weights[name])
        return copy.deepcopy(stats), out


class Run:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        hydra_dir, self.overrides, self.job_name, self.group = hydra_info()
        out = cfg.get("output_dir") or hydra_dir
        if out is None:
            raise config_error("output_dir", None, "a directory (set output_dir=... when not running under Hydra)")
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        # what a failed job's results.json needs for the report, known before any validation
        self.results: dict = {"status": "running", "model": OmegaConf.select(cfg, "model.name"),
                              "method": OmegaConf.select(cfg, "method.name"),
                              # as asked; validate() replaces them with what applies to the method
                              "start": {"name": OmegaConf.select(cfg, "start.name") or "dense"},
                              "budget": OmegaConf.select(cfg, "method.budget"),
                              "allocation": {"name": OmegaConf.select(cfg, "allocation.name") or "uniform"},
                              "sparsity": {"target": str(OmegaConf.select(cfg, "sparsity"))},
                              "overrides": self.overrides, "job_name": self.job_name, "group": self.group,
                              "output_dir": str(self.out)}
        self.times: dict[str, float] = {}
        self.tracker = None

    # -- validation: everything that can be checked before loading a model ---------------------------
    def validate(self):
        cfg = self.cfg
        self.target = Sparsity.parse(cfg.sparsity)
        self.seed = _positive_int(cfg, "seed", allow_zero=True)
        self.seqlen = _positive_int(cfg, "seqlen")
        self.save_format = check_save_format(cfg.get("save_format", "hf"))
        if not isinstance(cfg.get("measure_speed", False), bool):
            raise config_error("measure_speed", cfg.measure_speed, "true or false")
        self.method = build(cfg.method, "method")
        self.budget = self._budget(cfg)
        self.start, self.start_info = self._start(cfg)
        self.allocation = build(cfg.allocation, "allocation") if cfg.get("allocation") is not None else Uniform()
        self.allocation.check(self.target)
        self.needs_calibration = self.method.needs_calibration or bool(self.start and self.start.needs_calibration) \
            or self.allocation.needs_calibration
        self.ignore = self._patterns(cfg, "ignore", "experts")
        self.targets = self._patterns(cfg, "targets", "mlp")
        if self.needs_calibration:
            self.nsamples = _positive_int(cfg, "nsamples")
        self.source = build(cfg.model, "model")
        self.dataset = build(cfg.dataset, "dataset")
        max_tokens = cfg.eval.get("max_tokens")
        if max_tokens is not None:
            _positive_int(cfg, "eval.max_tokens")
        self.eval = PerplexityEval({n: dataset_by_name(n) for n in cfg.eval.corpora}, self.seqlen, max_tokens,
                                   _positive_int(cfg, "eval.batch_size"), bool(cfg.eval.add_bos),
                                   cfg.hardware.device)
        self.zero_shot = ZeroShotEval(cfg.eval.get("zero_shot"), cfg.eval.get("zero_shot_limit"),
                                      _positive_int(cfg, "eval.zero_shot_batch_size"), cfg.hardware.device)
        self.device = str(cfg.hardware.device)
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise config_error("hardware.device", self.device, "cpu (no CUDA device is visible)")
        self.fsdp = bool(cfg.hardware.get("fsdp", False))
        if self.fsdp and not getattr(self.method, "supports_fsdp", False):
            raise config_error("hardware", "fsdp", f"a global method (elsa, elsa_l, ast); method={cfg.method.name} is "
                               "layer-wise and runs one block at a time on one device")
        self.source.check()
        if self.needs_calibration:
            self.dataset.check()
        for corpus in self.eval.corpora.values():
            corpus.check()
        self.zero_shot.prepare()  # unknown tasks, missing task data or no hub fail here, before any model loads

    def _budget(self, cfg) -> str | None:
        """The budget that set the method's steps / epochs (None: the method has none). A budget without a part
        for this method (conf/method_budget/<budget>/<method>.yaml) is refused rather than run at the paper's."""
        if not self.method.has_budget:
            return None
        asked = OmegaConf.select(cfg, "budget.name") or "paper"
        applied = cfg.method.get("budget", "paper")
        if asked != applied:
            have = sorted(p.parent.name for p in (CONF / "method_budget").glob(f"*/{cfg.method.name}.yaml"))
            raise config_error("budget", asked, f"one of paper, {', '.join(have)} for method={cfg.method.name} "
                               f"(conf/method_budget/{asked}/{cfg.method.name}.yaml does not exist)")
        return applied

    def _start(self, cfg):
        """(the start stage or None, its record for results.json). A start applies to the methods that continue
        from the model they are given (takes_start); the others prune the dense model and the start is skipped,
        which the record says."""
        node = cfg.get("start")
        name = str(node.get("name", "dense")) if node is not None else "dense"
        if node is None or "_target_" not in node:
            return None, {"name": "dense"}
        if not self.method.takes_start:
            log.info("start=%s does not apply to method=%s (it prunes the dense model); not run", name,
                     cfg.method.name)
            return None, {"name": "dense", "skipped": name}
        stage = build(node, "start")
        if stage.takes_start:
            raise config_error("start", name, "dense or a layer-wise method (magnitude, wanda, sparsegpt, ...); "
                               f"{name} is a training method")
        return stage, {"name": name}

    def run_start(self, ctx: PruneContext) -> dict:
        """Prune ``ctx.model`` with the start stage; its time, statistics and (when the method reports its
        starting point) perplexity with the run's protocol."""
        t0 = time.perf_counter()
        key = SolutionMemo.key(self, self.cfg.start, ctx.calibration) if SolutionMemo.applies() else None
        reused = SolutionMemo.restore(key, ctx.model) if key else None
        if reused is not None:
            stats, source = reused
            log.info("start=%s: the solution computed by %s in this process (same model, data, keys and target) "
                     "is reused", self.start_info["name"], source)
        else:
            with torch.no_grad():
                stats = self.start.prune(ctx) or {}
            if key:
                SolutionMemo.store(key, ctx.model, stats, self.out)
        info = {**self.start_info, "time_s": time.perf_counter() - t0, "method_stats": stats}
        if reused is not None:
            info["reused_from"] = reused[1]
        if self.method.eval_initial and D.world_size() == 1:
            info["perplexity"] = ctx.extras["evaluate"](ctx.model)
            log.info("perplexity of the %s start: %s", info["name"], info["perplexity"])
        return info

    @staticmethod
    def _patterns(cfg, key: str, example: str) -> list[str]:
        import re

        value = cfg.get(key) or []
        if isinstance(value, str) or not all(isinstance(v, str) for v in value):
            raise config_error(key, value, f"a list of module-name regexes, e.g. {key}=[{example}]")
        for pat in value:
            try:
                re.compile(pat)
            except re.error as exc:
                raise config_error(key, pat, f"a valid regex ({exc})") from None
        return list(value)

    def timed(self, phase: str, fn, *args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.times[phase] = self.times.get(phase, 0.0) + time.perf_counter() - t

    def execute(self) -> dict:
        cfg, t0 = self.cfg, time.perf_counter()
        self.validate()
        if cfg.hardware.get("threads"):
            torch.set_num_threads(int(cfg.hardware.threads))
        if self.fsdp:
            self.device = D.init(cfg.hardware.get("backend"), self.device)
        main_rank = D.is_main()
        seed_everything(self.seed)
        self.rss_at_start = reset_peak_memory(self.device)
        self.results.update(model=cfg.model.name, method=cfg.method.name, start=self.start_info,
                            budget=self.budget, seed=self.seed,
                            sparsity={"target": str(self.target), "target_ratio": self.target.ratio},
                            overrides=self.overrides, git_sha=git_sha(), output_dir=str(self.out))
        self.tracker = build(cfg.logger, "logger") if main_rank else NullTracker()
        self.tracker.start(OmegaConf.to_container(cfg, resolve=True), self.out, name=self.job_name, group=self.group)

        model, tok = self.timed("load", self.source.load)
        offload = self.method.offload and self.device != "cpu"   # the method moves one block at a time
        model.to("cpu" if offload else self.device)
        ctx_len = context_length(model)
        if ctx_len and self.seqlen > ctx_len:
            raise config_error("seqlen", self.seqlen, f"at most the model's context length {ctx_len}")
        # what stays dense must be asked for: before any data or calibration work
        self.results["ignore"] = apply_ignore(model, self.ignore)
        self.results["targets"] = apply_targets(model, self.targets)
        check_prunable(model, self.ignore)
        self.method.validate(model, self.target)
        if self.start is not None:
            self.start.validate(model, self.target)
        self.allocation.prepare(model, self.target)     # a profile's names, before any calibration work

        calib, starts = None, None
        if self.needs_calibration:
            train = self.timed("data", token_stream, tok, self.dataset, "train")
            starts = sample_starts(len(train), self.nsamples, self.seqlen, self.seed)
            calib = windows(train, self.seqlen, bos_id(tok, bool(cfg.eval.add_bos)), starts)
            self.results["calibration"] = {"dataset": cfg.dataset.name, "nsamples": self.nsamples,
                                           "seqlen": self.seqlen, "starts": starts}

        # each targeted matrix's ratio, fixed before the start and the method (OWL reads the calibration walk)
        self.target, self.results["allocation"] = self.timed("allocation", self.allocation.allocate, model,
                                                             self.target, calib, self.device)

        if offload and cfg.eval.dense:
            model.to(self.device)
        dense = self.timed("dense_eval", self.eval.dense, model, tok, self.source.fingerprint()) \
            if cfg.eval.dense and main_rank else {}
        self.results["dense_perplexity"] = dense
        self.results["dense_zero_shot"] = self.timed("dense_zero_shot", self.zero_shot.dense, model, tok,
                                                     self.source.fingerprint()) \
            if cfg.eval.dense and self.zero_shot and main_rank else {}
        if offload:  # back to CPU: the layer-wise engine moves one block at a time to the device
            model.to("cpu")

        ctx = PruneContext(model=model, tokenizer=tok, target=self.target, calibration=calib, dataset=self.dataset,
                           seqlen=self.seqlen, seed=self.seed, device=self.device, output_dir=self.out,
                           tracker=self.tracker,
                           extras={"fsdp": self.fsdp, "evaluate": lambda m: self.eval.run(m, tok, "start")})
        if self.start is not None:  # the start stage prunes first; the dense model stays the teacher
            ctx.teacher = copy.deepcopy(model) if self.method.distils else None
            log.info("starting %s from %s's solution", cfg.method.name, self.start_info["name"])
            self.results["start"] = self.timed("start", self.run_start, ctx)
            ctx.start = self.start_info["name"]
        log.info("pruning %s with %s to %s", cfg.model.name, cfg.method.name, self.target)
        self.results["method_stats"] = self.timed("prune", self.method.prune, ctx) or {}
        if self.method.needs_calibration and not self.method.takes_start and SolutionMemo.applies():
            # a layer-wise solution: a later job of this sweep may start from it (SolutionMemo)
            SolutionMemo.store(SolutionMemo.key(self, cfg.method, calib), model, self.results["method_stats"],
                               self.out)
        ctx.teacher = None
        if not main_rank:  # the other FSDP ranks are done: rank 0 evaluates, saves and writes
            return {}
        model.to(self.device)

        pruned = {n: m.weight.detach() for n, m in prunable_matrices(model).items()}
        report = layer_report(pruned.items())
        self.results["sparsity"].update(measured=report["measured"], per_layer=report["per_layer"],
                                        pruned_params=report["pruned_params"],
                                        dense_modules="embeddings, norms, routers, lm_head and ignored "
                                                      "modules are not pruned")
        # fewer non-zeros than asked (a projection that kept zeros): recorded, printed, labelled. A per-row (or
        # per-column) count rounds by at most half a weight of the shortest row or column
        extra = sum(p.numel() for m in model.modules() if getattr(m, "elsa_in_budget", False) for p in m.parameters())
        if extra:   # a method's dense parameters that count against the target (OATS's low-rank factors)
            self.results["sparsity"].update(lowrank_params=extra,
                                            effective=(report["zeros"] - extra) / report["pruned_params"])
        over = self.results["sparsity"].get("effective", report["measured"]) - self.target.ratio
        rounding = max((0.5 / min(w.shape[-2:]) for w in pruned.values()), default=0.0)
        if over > rounding + 1e-6:
            self.results["sparsity"]["over_target"] = round(over, 6)
        params = list(model.parameters())  # tied weights appear once
        acc = weight_accounting(model, self.ignore)
        self.results["params"] = {"total": sum(p.numel() for p in params),
                                  "nonzero": sum(int(torch.count_nonzero(p)) for p in params),
                                  "pruned": acc["pruned"], "dense": acc["dense"],
                                  "dense_by_kind": acc["dense_by_kind"], "dense_names": acc["dense_names"]}
        if acc["pruned"] != report["pruned_params"] or acc["unsupported"]:
            raise ElsaError(f"internal: measured {report['pruned_params']} pruned weights but the accounting "
                            f"counts {acc['pruned']} (unsupported: {acc['unsupported'][:2]})")
        ppl = self.timed("eval", self.eval.run, model, tok, cfg.method.name)
        for name, value in ppl.items():
            check_finite(value, f"perplexity on {name}")
        self.results["perplexity"] = ppl
        self.results["zero_shot"] = self.timed("zero_shot", self.zero_shot.run, model, tok, cfg.method.name) \
            if self.zero_shot else {}

        if cfg.save_model:
            self.timed("save", self.save, model, tok)
        if cfg.get("measure_speed", False):   # batch-1 decode, dense against the sparse kernels (elsa.generate)
            from elsa.generate import measure

            self.results["inference"] = self.timed("speed", measure, model, tok)
        self.times["total"] = time.perf_counter() - t0
        self.results.update(status="done", time_s=self.times,
                            peak_memory_mb=peak_memory_mb(self.device, self.rss_at_start))
        write_json_atomic(self.out / "results.json", self.results)
        self.tracker.summary({k: self.results[k] for k in ("perplexity", "dense_perplexity", "zero_shot",
                                                           "dense_zero_shot", "time_s", "peak_memory_mb")} |
                             {"sparsity/measured": report["measured"]})
        self.tracker.finish(0)
        self.print_summary()
        return self.results

    def save(self, model, tok):
        nm = (self.target.n, self.target.m) if self.target.is_nm else None
        self.results.update(save_model(model, tok, self.out, self.save_format, nm))
        write_json_atomic(self.out / "sparsity_per_layer.json", self.results["sparsity"]["per_layer"])

    def fail(self, exc: BaseException):
        if not D.is_main():
            return
        self.times.setdefault("total", 0.0)
        self.results.update(status="failed", error=f"{type(exc).__name__}: {exc}", time_s=self.times)
        if not isinstance(exc, ElsaError):
            self.results["traceback"] = traceback.format_exc()
        write_json_atomic(self.out / "results.json", self.results)
        if self.tracker is not None:
            try:
                self.tracker.summary({"status": "failed", "error": self.results["error"]})
                self.tracker.finish(1)
            except Exception:  # noqa: BLE001 - tracking must not hide the real error
                log.exception("could not close the tracker")

    def print_summary(self):
        r = self.results
        stats = r.get("method_stats", {})
        start, label = stats.get("initial_projection_perplexity"), "magnitude"  # ELSA's z0 = magnitude pruning
        if start is None and (r.get("start") or {}).get("perplexity"):             # or a start stage's solution
            start, label = r["start"]["perplexity"], r["start"]["name"]
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        head = f"\n{'corpus':<12} {'dense':>12}" + (f" {label + ' ' + r['sparsity']['target']:>20}" if start else "")
        lines = [head + f" {r['method'] + ' ' + r['sparsity']['target']:>20}"]
        for name, value in r["perplexity"].items():
            row = f"{name:<12} {fmt(r['dense_perplexity'].get(name)):>12}"
            if start:
                row += f" {fmt(start.get(name)):>20}"
            lines.append(row + f" {value:>20.3f}")
        lines += zero_shot_lines(r["zero_shot"], r["dense_zero_shot"], f"{r['method']} {r['sparsity']['target']}")
        lines.append(f"measured sparsity {r['sparsity']['measured']:.4f} over {r['sparsity']['pruned_params']:,} "
                     f"pruned weights; results in {self.out / 'results.json'}")
        p = r.get("params") or {}
        if "dense_by_kind" in p:
            kinds = ", ".join(f"{k} {v:,}" for k, v in p["dense_by_kind"].items())
            lines.append(f"weights: {p['pruned']:,} pruned, {p['dense']:,} dense ({kinds})")
        if r["sparsity"].get("lowrank_params"):
            lines.append(f"low-rank factors: {r['sparsity']['lowrank_params']:,} dense parameters counted as non-zeros; "
                         f"effective sparsity {r['sparsity']['effective']:.4f}")
        if r["sparsity"].get("over_target"):
            lines.append(f"OVER TARGET: {r['sparsity']['measured']:.4f} of the pruned weights are zero, "
                         f"{r['sparsity']['over_target']:.4f} more than the target {r['sparsity']['target']} asks")
        fb = stats.get("fallback")
        if fb:
            lines.append(f"FALLBACK: {fb['method']} ran instead of {r['method']} on {len(fb['blocks'])}/{fb['of']} "
                         f"MLPs ({', '.join(fb['blocks'][:4])}{' ...' if len(fb['blocks']) > 4 else ''})")
        none = stats.get("experts_without_tokens")
        if none:
            lines.append(f"NO TOKENS: {none['count']} expert matrices received no calibration token and were pruned "
                         f"by {none['rule']} ({', '.join(none['names'][:3])}{' ...' if none['count'] > 3 else ''})")
        print("\n".join(lines), flush=True)


def _acc(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _acc_pair(metrics: dict) -> str:
    return f"{_acc(metrics.get('acc'))} / {_acc(metrics.get('acc_norm'))}" if metrics else "-"


def zero_shot_lines(pruned: dict, dense: dict, label: str) -> list[str]:
    """Accuracy rows (acc / acc_norm where the task defines it) for the printed summary."""
    if not pruned:
        return []
    lines = [f"\n{'task (acc / acc_norm)':<28} {'dense':>17} {label:>17}"]
    for name, metrics in pruned["tasks"].items():
        lines.append(f"{name:<28} {_acc_pair(dense.get('tasks', {}).get(name, {})):>17} {_acc_pair(metrics):>17}")
    lines.append(f"{'mean acc':<28} {_acc(dense.get('mean_acc')):>17} {_acc(pruned['mean_acc']):>17}")
    return lines


def run(cfg: DictConfig) -> dict:
    """Run one job; on any error write results.json with status 'failed' and re-raise.

    In a sweep with ``skip_done`` (the default) a job whose output dir already holds its finished results.json
    returns those results untouched: rerunning a sweep in the same dir only redoes missing and failed jobs.
    """
    job = Run(cfg)
    if in_multirun() and cfg.get("skip_done", True):
        previous = finished_result(job.out, job.overrides)
        if previous is not None:
            log.info("skipping: %s already holds this job's finished results (skip_done=false redoes it)",
                     job.out / "results.json")
            return previous
    try:
        return job.execute()
    except BaseException as exc:
        job.fail(exc)
        raise


def quiet_third_party_logs() -> None:
    """transformers imports torchao when it is installed; its CUDA-kernel probes are noise on a CPU run."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def refuse_old_spellings(args: list[str]) -> None:
    """Before Hydra composes: a removed preset name or key exits with one line giving the new spelling."""
    from elsa.renamed import refuse_old_spellings as check

    try:
        check(args)
    except ElsaError as exc:
        print(f"elsa: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


def main(cfg: DictConfig) -> None:
    """CLI entry (run.py): one clear line for user errors, non-zero exit."""
    quiet_third_party_logs()
    try:
        run(cfg)
    except ElsaError as exc:
        print(f"elsa: error: {exc}", file=sys.stderr, flush=True)
        if in_multirun():  # let Hydra record the failed job and go on with the others (exit != 0 at the end)
            raise
        sys.exit(2)
