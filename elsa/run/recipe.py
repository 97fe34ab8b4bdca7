"""One run: validate -> seed -> load -> calibration data -> prune -> measure -> evaluate -> save -> log."""
from __future__ import annotations

import logging
import random
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from elsa.eval import compute
from elsa.engines import distributed as D
from elsa.methods import notes
from elsa.sparsity.allocation import Uniform
from elsa.data.corpora import sample_starts, token_stream, windows
from elsa.engines.training import make_teacher
from elsa.errors import ElsaError, config_error
from elsa.eval.perplexity import PerplexityEval, bos_id, check_finite
from elsa.logs import quiet_third_party_logs
from elsa.run.memo import SolutionMemo, for_this_sweep
# peak_memory_mb, dirname, zero_shot_lines: tests and bench/ import them from here
from elsa.eval.memory import peak_memory_mb, reset_peak_memory  # noqa: F401
from elsa.methods import registry
from elsa.methods.base import PruneContext
from elsa.model.structure import check_prunable, context_length, weight_accounting
from elsa.sparsity.plan import PruningPlan
from elsa.report.results import RESULTS, RunRecord, record_dict
from elsa.run.rundir import REPO, dirname, git_sha, hydra_info, in_multirun  # noqa: F401
from elsa.artifacts.compressed import save_model
from elsa.sparsity.patterns import layer_report
from elsa.run.spec import RunSpec, component_kwargs, output_dir
from elsa.report.summary import print_summary, zero_shot_lines  # noqa: F401
from elsa.run.sweep import finished_result
from elsa.run.tracking import NullTracker, write_json_atomic
from elsa.eval.zeroshot import ZeroShotEval

log = logging.getLogger(__name__)
CONF = REPO / "conf"


def build(node: DictConfig, key: str):
    """Instantiate a component config; a method's or start's ``name`` and ``budget`` keys are metadata, not
    arguments, and a key its class does not take is one line naming its keys (elsa.run.spec.component_kwargs)."""
    kwargs, _ = component_kwargs(node, key)
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Run:
    def __init__(self, cfg: DictConfig, memo: SolutionMemo | None = None):
        self.cfg = cfg
        self.memo = memo    # the sweep's memory of its last layer-wise solution (elsa.run.memo); None: a single run
        hydra_dir, self.overrides, self.job_name, self.group = hydra_info()
        out = output_dir(cfg.get("output_dir")) or hydra_dir
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
        self.cpu: dict[str, float] = {}    # the same phases' CPU seconds (this process, all its threads)
        self.tracker = None

    # -- validation: everything that can be checked before loading a model ---------------------------
    def validate(self):
        cfg = self.cfg
        self.spec = spec = RunSpec.from_cfg(cfg)   # every top-level key, whether or not this run uses it
        self.target, self.seed, self.seqlen = spec.target, spec.seed, spec.seqlen
        self.save_format, self.nsamples = spec.save_format, spec.nsamples
        self.method = build(cfg.method, "method")
        if spec.budget_not_applicable:   # a sweep's training keys, given to a method that does not train
            self.results["budget_not_applicable"] = dict(spec.budget_not_applicable)
            log.warning("method=%s does not train: %s not applied (recorded as budget_not_applicable)",
                        cfg.method.name, ", ".join(f"{k}={v}" for k, v in spec.budget_not_applicable.items()))
        self.budget = self._budget(cfg)
        self.start, self.start_info = self._start(cfg)
        self.allocation = build(cfg.allocation, "allocation") if cfg.get("allocation") is not None else Uniform()
        self.allocation.check(self.target)
        self.needs_calibration = self.method.needs_calibration or bool(self.start and self.start.needs_calibration) \
            or self.allocation.needs_calibration
        self.ignore, self.targets = list(spec.ignore), list(spec.targets)
        self.source = build(cfg.model, "model")
        self.dataset = build(cfg.dataset, "dataset")
        ev, hw = spec.eval, spec.hardware
        self.eval = PerplexityEval({n: dataset_by_name(n) for n in ev.corpora}, self.seqlen, ev.max_tokens,
                                   ev.batch_size, ev.add_bos, hw.device)
        self.zero_shot = ZeroShotEval(ev.zero_shot, ev.zero_shot_limit, ev.zero_shot_batch_size, hw.device)
        self.device = hw.device
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise config_error("hardware.device", self.device, "cpu (no CUDA device is visible)")
        self.fsdp = hw.fsdp
        if self.fsdp and not self.method.supports_fsdp:
            sharded = ", ".join(registry.names("supports_fsdp"))
            raise config_error("hardware", "fsdp", f"a method that trains sharded ({sharded}); method="
                               f"{cfg.method.name} is {self.method.family.name} and runs on one device")
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
        if not stage.start_eligible:
            raise config_error("start", name, f"dense or one of {', '.join(registry.names('start_eligible'))}; "
                               f"{name} is a {stage.family.name} method")
        return stage, {"name": name}

    def shares_solutions(self) -> bool:
        """A sweep's jobs share its memo; one rank only (FSDP ranks each hold a shard)."""
        return self.memo is not None and D.world_size() == 1

    def run_start(self, ctx: PruneContext) -> dict:
        """Prune ``ctx.model`` with the start stage; its time, statistics and (when the method reports its
        starting point) perplexity with the run's protocol."""
        t0 = time.perf_counter()
        key = SolutionMemo.key(self, self.cfg.start, ctx.calibration) if self.shares_solutions() else None
        reused = self.memo.restore(key, ctx.plan) if key else None
        if reused is not None:
            stats, source = reused
            log.info("start=%s: the solution computed by %s in this process (same model, data, keys and target) "
                     "is reused", self.start_info["name"], source)
        else:
            with torch.no_grad():
                stats = self.start.prune(ctx) or {}
            if key:
                self.memo.store(key, ctx.plan, stats, self.out)
        info = {**self.start_info, "time_s": time.perf_counter() - t0, "method_stats": stats}
        if reused is not None:
            info["reused_from"] = reused[1]
        if self.method.eval_initial and D.world_size() == 1:
            info["perplexity"] = ctx.extras["evaluate"](ctx.model)
            log.info("perplexity of the %s start: %s", info["name"], info["perplexity"])
        return info

    def timed(self, phase: str, fn, *args, **kwargs):
        t, c = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            self.times[phase] = self.times.get(phase, 0.0) + time.perf_counter() - t
            self.cpu[phase] = self.cpu.get(phase, 0.0) + time.process_time() - c

    def execute(self) -> dict:
        """The run, top to bottom: each step below reads and writes this run's state and its results."""
        t0, c0 = time.perf_counter(), time.process_time()
        self.validate()
        self.setup()
        model, tok = self.load()
        calib = self.calibrate(tok)
        # each targeted matrix's ratio, fixed before the start and the method (OWL reads the calibration walk)
        self.plan, self.results["allocation"] = self.timed("allocation", self.allocation.allocate, self.plan, calib,
                                                           self.device)
        self.evaluate_dense(model, tok)
        self.prune(model, tok, calib)
        if not self.main_rank:  # the other FSDP ranks are done: rank 0 evaluates, saves and writes
            return {}
        model.to(self.device)
        measured = self.measure(model)
        self.evaluate(model, tok)
        if self.spec.save_model:
            self.timed("save", self.save, model, tok)
        if self.spec.measure_speed:   # batch-1 decode, dense against the sparse kernels (elsa.artifacts.generate)
            from elsa.artifacts.generate import measure

            plan_dir = self.out / "model_compressed"       # the kernel plans saved with the compressed model
            self.results["inference"] = self.timed("speed", measure, model, tok,
                                                   plan_dir=plan_dir if plan_dir.is_dir() else None,
                                                   pruning_plan=self.plan)
        self.times["total"] = time.perf_counter() - t0
        self.cpu["total"] = time.process_time() - c0
        return self.finish(measured)

    def setup(self) -> None:
        """Threads, the FSDP group, the seed, the memory window, the tracker; what the record knows so far."""
        cfg = self.cfg
        if self.spec.hardware.threads:
            torch.set_num_threads(self.spec.hardware.threads)
        if self.fsdp:
            self.device = D.init(self.spec.hardware.backend, self.device)
        self.main_rank = D.is_main()
        from elsa.run.forecast import check_run    # the forecast, and a refusal when the peak cannot fit (elsa/run/forecast.py)

        self.results["plan"] = check_run(self, quiet=not self.main_rank)   # every rank refuses alike
        seed_everything(self.seed)
        self.rss_at_start = reset_peak_memory(self.device)
        self.results.update(model=cfg.model.name, method=cfg.method.name, start=self.start_info,
                            budget=self.budget, seed=self.seed,
                            sparsity={"target": str(self.target), "target_ratio": self.target.ratio},
                            overrides=self.overrides, git_sha=git_sha(), output_dir=str(self.out))
        if getattr(self.source, "rehearsal", None):   # model=shapes: random weights, never a model's perplexity
            self.results["rehearsal"] = self.source.rehearsal
        self.tracker = build(cfg.logger, "logger") if self.main_rank else NullTracker()
        self.tracker.start(OmegaConf.to_container(cfg, resolve=True), self.out, name=self.job_name, group=self.group)

    def load(self):
        """The model and tokenizer, with what stays dense marked and every check that needs the model done."""
        model, tok = self.timed("load", self.source.load)
        self.offload = self.method.offload and self.device != "cpu"   # the method moves one block at a time
        model.to("cpu" if self.offload else self.device)
        ctx_len = context_length(model)
        if ctx_len and self.seqlen > ctx_len:
            raise config_error("seqlen", self.seqlen, f"at most the model's context length {ctx_len}")
        # what stays dense must be asked for: before any data or calibration work
        self.plan = PruningPlan.build(model, self.target, self.ignore, self.targets)
        self.results["ignore"], self.results["targets"] = self.plan.matched["ignore"], self.plan.matched["targets"]
        check_prunable(model, self.plan)
        self.plan.refuse_if_empty(self.ignore, self.targets)
        self.method.validate(self.plan)
        if self.start is not None:
            self.start.validate(self.plan)
        self.allocation.prepare(self.plan)     # a profile's names, before any calibration work
        return model, tok

    def calibrate(self, tok) -> torch.Tensor | None:
        """The calibration windows (None when neither the method, the start nor the allocation reads them)."""
        if not self.needs_calibration:
            return None
        train = self.timed("data", token_stream, tok, self.dataset, "train")
        starts = sample_starts(len(train), self.nsamples, self.seqlen, self.seed)
        calib = windows(train, self.seqlen, bos_id(tok, self.spec.eval.add_bos), starts)
        self.results["calibration"] = {"dataset": self.cfg.dataset.name, "nsamples": self.nsamples,
                                       "seqlen": self.seqlen, "starts": starts}
        return calib

    def evaluate_dense(self, model, tok) -> None:
        """The dense model's perplexity and zero-shot scores (cached per model and protocol), on rank 0."""
        dense_eval = self.spec.eval.dense
        if self.offload and dense_eval:
            model.to(self.device)
        dense = self.timed("dense_eval", self.eval.dense, model, tok, self.source.fingerprint()) \
            if dense_eval and self.main_rank else {}
        self.results["dense_perplexity"] = dense
        self.results["dense_zero_shot"] = self.timed("dense_zero_shot", self.zero_shot.dense, model, tok,
                                                     self.source.fingerprint()) \
            if dense_eval and self.zero_shot and self.main_rank else {}
        if self.offload:  # back to CPU: the layer-wise engine moves one block at a time to the device
            model.to("cpu")

    def prune(self, model, tok, calib) -> None:
        """The start stage (when the method takes one), then the method."""
        cfg = self.cfg
        ctx = PruneContext(model=model, tokenizer=tok, target=self.target, plan=self.plan, calibration=calib,
                           dataset=self.dataset,
                           seqlen=self.seqlen, seed=self.seed, device=self.device, output_dir=self.out,
                           tracker=self.tracker,
                           extras={"fsdp": self.fsdp, "evaluate": lambda m: self.eval.run(m, tok, "start"),
                                   "low_memory": self.spec.hardware.low_memory})
        if self.start is not None:  # the start stage prunes first; the dense model stays the teacher
            ctx.teacher = make_teacher(model) if self.method.distils or self.method.keeps_dense else None
            log.info("starting %s from %s's solution", cfg.method.name, self.start_info["name"])
            self.results["start"] = self.timed("start", self.run_start, ctx)
            ctx.start = self.start_info["name"]
        log.info("pruning %s with %s to %s", cfg.model.name, cfg.method.name, self.target)
        self.results["method_stats"] = self.timed("prune", self.method.prune, ctx) or {}
        if self.method.needs_calibration and not self.method.takes_start and self.shares_solutions():
            # a layer-wise solution: a later job of this sweep may start from it (elsa.run.memo)
            self.memo.store(SolutionMemo.key(self, cfg.method, calib), self.plan, self.results["method_stats"],
                            self.out)
        ctx.teacher = None
        self.results["compute"] = self.compute_record(model, calib)

    def measure(self, model) -> float:
        """The measured sparsity per matrix, the weights pruned and left dense; returns the overall sparsity."""
        pruned = {n: m.weight.detach() for n, m in self.plan.on(model).named_matrices().items()}
        report = layer_report(pruned.items())
        self.results["sparsity"].update(measured=report["measured"], per_layer=report["per_layer"],
                                        pruned_params=report["pruned_params"],
                                        dense_modules="embeddings, norms, routers, lm_head and ignored "
                                                      "modules are not pruned")
        # fewer non-zeros than asked (a projection that kept zeros): recorded, printed, labelled. A per-row (or
        # per-column) count rounds by at most half a weight of the shortest row or column
        extra = sum(p.numel() for m in model.modules() if getattr(m, "elsa_in_budget", False) for p in m.parameters())
        sp = self.results["sparsity"]
        if extra:   # a method's dense parameters that count against the target (OATS's low-rank factors)
            sp.update(lowrank_params=extra, effective=(report["zeros"] - extra) / report["pruned_params"])
            sp.setdefault("notes", []).append(notes.lowrank(extra, sp["pruned_params"], sp["measured"],
                                                            sp["effective"]))
        over = sp.get("effective", report["measured"]) - self.target.ratio
        rounding = max((0.5 / min(w.shape[-2:]) for w in pruned.values()), default=0.0)
        if over > rounding + 1e-6:
            sp["over_target"] = round(over, 6)
            sp.setdefault("notes", []).append(notes.over_target(sp["measured"], sp["over_target"], sp.get("target")))
        params = list(model.parameters())  # tied weights appear once
        acc = weight_accounting(model, self.plan)
        self.results["params"] = {"total": sum(p.numel() for p in params),
                                  "nonzero": sum(int(torch.count_nonzero(p)) for p in params),
                                  "pruned": acc["pruned"], "dense": acc["dense"],
                                  "dense_by_kind": acc["dense_by_kind"], "dense_names": acc["dense_names"]}
        if acc["pruned"] != report["pruned_params"] or acc["unsupported"]:
            raise ElsaError(f"internal: measured {report['pruned_params']} pruned weights but the accounting "
                            f"counts {acc['pruned']} (unsupported: {acc['unsupported'][:2]})")
        return report["measured"]

    def evaluate(self, model, tok) -> None:
        """The pruned model's perplexity (finite, or the run fails) and zero-shot scores."""
        name = self.cfg.method.name
        ppl = self.timed("eval", self.eval.run, model, tok, name)
        self.results["compute"]["evaluation"] = compute.evaluation(
            compute.matmul_params(model), self.eval.tokens(tok), self.times.get("eval"))
        self.results["compute"]["total"] = compute.total(self.results["compute"])
        for corpus, value in ppl.items():
            check_finite(value, f"perplexity on {corpus}")
        self.results["perplexity"] = ppl
        self.results["zero_shot"] = self.timed("zero_shot", self.zero_shot.run, model, tok, name) \
            if self.zero_shot else {}

    def finish(self, measured: float) -> dict:
        """The record written as done, the tracker's summary, the printed summary."""
        self.results.update(status="done", time_s=self.times, cpu_s=self.cpu,
                            peak_memory_mb=peak_memory_mb(self.device, self.rss_at_start))
        self.results = record_dict(self.results)
        write_json_atomic(self.out / RESULTS, self.results)
        self.tracker.summary({k: self.results[k] for k in ("perplexity", "dense_perplexity", "zero_shot",
                                                           "dense_zero_shot", "time_s", "peak_memory_mb")} |
                             {"sparsity/measured": measured})
        self.tracker.finish(0)
        self.print_summary()
        return self.results

    def compute_record(self, model, calib) -> dict:
        """results.json ``compute``: tokens, estimated FLOPs and wall time of the start and the method (elsa.eval.compute);
        the evaluation joins it after the evaluation."""
        tokens = calib.numel() if calib is not None else 0
        out = {}
        if self.start is not None:
            _, out["start"] = compute.pruning(self.plan, self.start, tokens, {}, self.times.get("start"))
        name, out[name] = compute.pruning(self.plan, self.method, tokens, self.results["method_stats"],
                                          self.times.get("prune"))
        return out

    def save(self, model, tok):
        nm = (self.target.n, self.target.m) if self.target.is_nm else None
        self.results.update(save_model(model, tok, self.out, self.save_format, nm, plan=self.plan))
        write_json_atomic(self.out / "sparsity_per_layer.json", self.results["sparsity"]["per_layer"])

    def fail(self, exc: BaseException):
        if not D.is_main():
            return
        self.times.setdefault("total", 0.0)
        self.cpu.setdefault("total", 0.0)
        self.results.update(status="failed", error=f"{type(exc).__name__}: {exc}", time_s=self.times,
                            cpu_s=self.cpu)
        if not isinstance(exc, ElsaError):
            self.results["traceback"] = traceback.format_exc()
        self.results = record_dict(self.results)
        write_json_atomic(self.out / RESULTS, self.results)
        if self.tracker is not None:
            try:
                self.tracker.summary({"status": "failed", "error": self.results["error"]})
                self.tracker.finish(1)
            except Exception:  # noqa: BLE001 - tracking must not hide the real error
                log.exception("could not close the tracker")

    def print_summary(self):
        print_summary(RunRecord.from_dict(self.results), self.out / RESULTS)


def run(cfg: DictConfig, memo: SolutionMemo | None = None) -> dict:
    """Run one job; on any error write results.json with status 'failed' and re-raise.

    In a sweep with ``skip_done`` (the default) a job whose output dir already holds its finished results.json
    returns those results untouched: rerunning a sweep in the same dir only redoes missing and failed jobs.
    """
    job = Run(cfg, memo if memo is not None else for_this_sweep())
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


def refuse_old_spellings(args: list[str]) -> None:
    """Before Hydra composes: a removed preset name or key exits with one line giving the new spelling."""
    from elsa.run.renamed import refuse_old_spellings as check

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
