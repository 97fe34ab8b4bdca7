"""Zero-shot accuracy through lm-eval's Python API on the in-memory model, with a disk cache for dense models.

The model object is wrapped in lm-eval's ``HFLM`` and scored with ``simple_evaluate`` (0-shot, lm-eval's
default seeds), so the numbers equal those of lm-eval's CLI on the saved model with the same tasks, limit
and batch size. Per task: ``acc``, ``acc_norm`` (where the task defines it) and their stderr; plus the
mean ``acc`` over the tasks.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import random
from contextlib import contextmanager

import numpy as np
import torch

from elsa.assets import cache_dir
from elsa.errors import config_error
from elsa.eval.tasks import check_names, lm_eval_version, task_manager

log = logging.getLogger(__name__)
METRICS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")


def _limit(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise config_error("eval.zero_shot_limit", value, "null (every document) or a whole number > 0")
    return value


def task_metrics(entry: dict) -> dict:
    """lm-eval's ``{"acc,none": ..., "acc_stderr,none": ...}`` -> ``{"acc": ..., "acc_stderr": ...}``."""
    out = {m: entry[f"{m},none"] for m in METRICS if isinstance(entry.get(f"{m},none"), (int, float))}
    if "samples" in entry:
        out["samples"] = entry["samples"]
    return out


def summarize(results: dict) -> dict:
    """The part of lm-eval's output we keep: per task metrics and the mean acc over (leaf) tasks."""
    groups = {name for name, subs in results.get("group_subtasks", {}).items() if subs}
    tasks = {}
    for name, entry in sorted(results["results"].items()):
        metrics = task_metrics(entry)
        if "acc" in metrics and name not in groups:
            tasks[name] = metrics | {"samples": results.get("n-samples", {}).get(name, {}).get("effective")}
    accs = [m["acc"] for m in tasks.values()]
    return {"tasks": tasks, "mean_acc": sum(accs) / len(accs) if accs else None}


@contextmanager
def preserved_rng():
    """simple_evaluate reseeds python, numpy and torch; keep the run's random streams as they were, so
    whether zero-shot ran (or came from the cache) never changes what a later phase draws."""
    state = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.random.set_rng_state(state[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class ZeroShotEval:
    """Zero-shot accuracy of a model on lm-eval tasks; ``tasks`` empty means disabled."""

    def __init__(self, tasks, limit, batch_size: int, device: str):
        self.tasks, self.limit = check_names(tasks), _limit(limit)
        self.batch_size, self.device = batch_size, device
        self._manager = None

    def __bool__(self) -> bool:
        return bool(self.tasks)

    def prepare(self) -> None:
        """Fetch the offline task data, generate the YAMLs and check every name (before any model is loaded)."""
        if self.tasks and self._manager is None:
            self._manager = task_manager(self.tasks)

    def run(self, model, tokenizer, label: str = "model") -> dict:
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        self.prepare()
        log.info("zero-shot (%s) on %s, limit %s", label, ", ".join(self.tasks), self.limit)
        # HFLM sets a pad token on the tokenizer it is given: hand it a copy, keep the run's tokenizer as loaded
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=self.batch_size)
        with preserved_rng():
            out = lm_eval.simple_evaluate(model=lm, tasks=list(self.tasks), num_fewshot=0, limit=self.limit,
                                          task_manager=self._manager, log_samples=False)
        summary = summarize(out)
        for name, m in summary["tasks"].items():
            log.info("%s %s: acc %.4f%s", label, name, m["acc"],
                     f", acc_norm {m['acc_norm']:.4f}" if "acc_norm" in m else "")
        return summary | {"limit": self.limit, "num_fewshot": 0, "lm_eval": lm_eval_version()}

    def _key(self, model_fingerprint: str, tokenizer) -> str:
        ident = [model_fingerprint, sorted(self.tasks), self.limit, lm_eval_version(), len(tokenizer),
                 str(self.device).split(":")[0]]
        return hashlib.md5(json.dumps(ident).encode()).hexdigest()

    def dense(self, model, tokenizer, model_fingerprint: str) -> dict:
        """Dense zero-shot results, computed once per (model, tasks, limit) and cached on disk."""
        path = cache_dir() / "dense_zero_shot" / f"{self._key(model_fingerprint, tokenizer)}.json"
        if path.exists():
            log.info("dense zero-shot on %s (cached)", ", ".join(self.tasks))
            return json.loads(path.read_text())["zero_shot"]
        result = self.run(model, tokenizer, "dense")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{id(self)}.tmp")
        tmp.write_text(json.dumps({"zero_shot": result, "model": model_fingerprint, "tasks": self.tasks}))
        tmp.replace(path)
        return result
