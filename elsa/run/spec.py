"""What a run is asked to do, read from the config in one place and checked before any work.

:class:`RunSpec` holds the config's top-level keys, each type-checked whether or not the run uses it (``nsamples``
is checked also when the method does not calibrate). :func:`component_kwargs` checks a component's keys
(``method.*``, ``start.*``, ``model.*``, ...) against the constructor of the class it builds, read from the
class's signature, so a misspelt key is one line naming the component and its keys instead of a TypeError.

Training-budget keys (the fields of :class:`elsa.engines.training.TrainSettings`, and ``tokens``) given to a method that
does not train are not an error: in ``-m method=wanda,elsa ++method.steps=2`` they mean the training jobs. They
are dropped before the method is built and recorded as ``budget_not_applicable``.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any
from typing import Any

from omegaconf import DictConfig, OmegaConf

from elsa.errors import ElsaError, config_error
from elsa.sparsity.patterns import Sparsity

# the config groups (conf/<group>/): each a mapping, built by its own class; start and allocation may be null
GROUPS = ("model", "method", "budget", "start", "allocation", "dataset", "eval", "hardware", "logger")
NULLABLE_GROUPS = ("start", "allocation")
# keys of a method (or start) config that describe it rather than set it: its name, the budget that set it
METADATA = ("name", "budget")
# what a mandatory (???) key expects, for the one-line error when it is left unset
REQUIRED = {"model.path": "model=hf needs model.path=<a local checkpoint directory holding config.json, or a hub id>"}
# a training budget key that elsa.engines.training.TrainSettings does not hold (the lead's token budget)
EXTRA_BUDGET_KEYS = ("tokens",)


def _whole(key: str, value, allow_zero: bool = False) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise config_error(key, value, "a whole number >= 0" if allow_zero else "a whole number > 0")
    return value


def _flag(key: str, value) -> bool:
    if not isinstance(value, bool):
        raise config_error(key, value, "true or false")
    return value


def _patterns(key: str, value, example: str) -> tuple[str, ...]:
    value = value or []
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise config_error(key, value, f"a list of module-name regexes, e.g. {key}=[{example}]")
    for pat in value:
        try:
            re.compile(pat)
        except re.error as exc:
            raise config_error(key, pat, f"a valid regex ({exc})") from None
    return tuple(value)


def output_dir(value) -> str | None:
    """``output_dir``: a path, or None for Hydra's run dir (checked before the run dir is made)."""
    if value is not None and not isinstance(value, str):
        raise config_error("output_dir", value, "a directory path, or null for Hydra's run dir")
    return value


def _whole_or_none(key: str, value) -> int | None:
    return None if value is None else _whole(key, value)


def _group_keys(cfg: DictConfig, group: str, known: tuple[str, ...]) -> DictConfig:
    """The group's node, refusing a key its spec does not read (a misspelt ``eval.max_token``)."""
    node = cfg[group]
    for key in node:
        if key not in known:
            raise config_error(f"{group}.{key}", node.get(key), f"not a key of {group}; its keys: {', '.join(known)}")
    return node


@dataclass(frozen=True)
class EvalSpec:
    """conf/eval/: the perplexity corpora and protocol, the zero-shot tasks (their names are checked by
    elsa.eval.zeroshot, the corpora's by elsa.run.recipe.dataset_by_name)."""

    corpora: tuple[str, ...]
    max_tokens: int | None
    batch_size: int
    add_bos: bool
    dense: bool
    zero_shot: Any
    zero_shot_limit: Any
    zero_shot_batch_size: int

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> "EvalSpec":
        node = _group_keys(cfg, "eval", tuple(f.name for f in fields(cls)))
        corpora = node.get("corpora")
        if isinstance(corpora, str) or not corpora or not all(isinstance(c, str) for c in corpora):
            raise config_error("eval.corpora", corpora, "a list of corpus names (conf/dataset/), e.g. [wiki]")
        return cls(corpora=tuple(corpora), max_tokens=_whole_or_none("eval.max_tokens", node.get("max_tokens")),
                   batch_size=_whole("eval.batch_size", node.get("batch_size")),
                   add_bos=_flag("eval.add_bos", node.get("add_bos", True)),
                   dense=_flag("eval.dense", node.get("dense", True)), zero_shot=node.get("zero_shot"),
                   zero_shot_limit=node.get("zero_shot_limit"),
                   zero_shot_batch_size=_whole("eval.zero_shot_batch_size", node.get("zero_shot_batch_size", 8)))


@dataclass(frozen=True)
class HardwareSpec:
    """conf/hardware/: the device, torch's thread count (None: torch's default), FSDP and its backend."""

    device: str
    threads: int | None = None
    fsdp: bool = False
    backend: str | None = None
    memory_gb: float | None = None     # the memory the plan must fit (None: the machine's / the GPU's)
    low_memory: bool = False           # fused experts one at a time, the walk's dense copy on disk, AdamW per tensor

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> "HardwareSpec":
        node = _group_keys(cfg, "hardware", tuple(f.name for f in fields(cls)))
        device = node.get("device")
        if not isinstance(device, str) or not device:
            raise config_error("hardware.device", device, "cpu, cuda or cuda:<n>")
        backend = node.get("backend")
        if backend is not None and not isinstance(backend, str):
            raise config_error("hardware.backend", backend, "a torch.distributed backend name (gloo, nccl)")
        memory = node.get("memory_gb")
        if memory is not None and (isinstance(memory, bool) or not isinstance(memory, (int, float)) or memory <= 0):
            raise config_error("hardware.memory_gb", memory, "a number of GB > 0, or null (the machine's memory)")
        return cls(device=device, threads=_whole_or_none("hardware.threads", node.get("threads")),
                   fsdp=_flag("hardware.fsdp", node.get("fsdp", False)), backend=backend,
                   memory_gb=None if memory is None else float(memory),
                   low_memory=_flag("hardware.low_memory", node.get("low_memory", False)))


@dataclass(frozen=True)
class RunSpec:
    """The top-level keys of conf/config.yaml, validated (the groups are checked to be mappings; their keys are
    their classes' business, see :func:`component_kwargs`)."""

    target: Sparsity
    seed: int
    seqlen: int
    nsamples: int
    save_model: bool
    save_format: str
    measure_speed: bool
    skip_done: bool
    output_dir: str | None
    ignore: tuple[str, ...]
    targets: tuple[str, ...]
    eval: EvalSpec
    hardware: HardwareSpec
    # training-budget keys given to a method that does not train: dropped, recorded, printed
    budget_not_applicable: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> "RunSpec":
        from elsa.artifacts.compressed import check_save_format

        _check_keys(cfg)
        get = cfg.get
        spec = cls(target=Sparsity.parse(get("sparsity")),
                   seed=_whole("seed", get("seed"), allow_zero=True),
                   seqlen=_whole("seqlen", get("seqlen")),
                   nsamples=_whole("nsamples", get("nsamples")),
                   save_model=_flag("save_model", get("save_model", True)),
                   save_format=check_save_format(get("save_format", "hf")),
                   measure_speed=_flag("measure_speed", get("measure_speed", False)),
                   skip_done=_flag("skip_done", get("skip_done", True)),
                   output_dir=output_dir(get("output_dir")),
                   ignore=_patterns("ignore", get("ignore"), "experts"),
                   targets=_patterns("targets", get("targets"), "mlp"),
                   eval=EvalSpec.from_cfg(cfg), hardware=HardwareSpec.from_cfg(cfg),
                   budget_not_applicable=component_kwargs(cfg.method, "method")[1])
        for key in ("start", "allocation"):   # their keys, before any model loads
            if get(key) is not None and "_target_" in cfg[key]:
                component_kwargs(cfg[key], key)
        return spec


def _check_keys(cfg: DictConfig) -> None:
    """Every top-level key is one this module reads; every group a mapping (start / allocation may be null)."""
    known = {f.name for f in fields(RunSpec)} - {"target", "budget_not_applicable", "eval", "hardware"} | {"sparsity"}
    for key in cfg:
        if key in GROUPS:
            node = cfg.get(key)
            if not isinstance(node, DictConfig) and not (node is None and key in NULLABLE_GROUPS):
                raise config_error(key, node, f"a choice of conf/{key}/ (a mapping of its keys)")
        elif key not in known:
            raise config_error(key, cfg.get(key), "not a key of the config; its keys: "
                               f"{', '.join(sorted(known | set(GROUPS)))} (a new key belongs in elsa/run/spec.py)")


def budget_keys() -> set[str]:
    """The training-budget keys: the fields of :class:`elsa.engines.training.TrainSettings` and ``tokens``."""
    from elsa.engines.training import TrainSettings

    return {f.name for f in fields(TrainSettings)} | set(EXTRA_BUDGET_KEYS)


def constructor_keys(cls) -> set[str] | None:
    """The keyword arguments ``cls(...)`` accepts, read from the ``__init__`` signatures along its MRO: a
    ``**kwargs`` passes on to the parent's ``__init__``, or, where the class names a dataclass as
    ``shared_settings``, to that dataclass's fields. None: it takes any keyword (nothing to check)."""
    keys: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        if klass is object:
            return keys
        try:
            params = list(inspect.signature(init).parameters.values())[1:]
        except (TypeError, ValueError):
            return None
        keys |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return keys
        settings = klass.__dict__.get("shared_settings")
        if settings is not None and is_dataclass(settings):
            return keys | {f.name for f in fields(settings)}
    return None


def _target_class(node: DictConfig, key: str):
    from hydra.utils import get_class

    try:
        return get_class(str(node["_target_"]))
    except Exception as exc:  # noqa: BLE001 - Hydra raises ImportError or ValueError variants
        raise config_error(f"{key}._target_", node["_target_"], f"an importable class ({exc})") from None


def component_kwargs(node: DictConfig, key: str) -> tuple[dict, dict]:
    """(the keyword arguments that build ``node``, the budget keys dropped because the method does not train).
    A key its class does not take is one line naming the component and its keys; a mandatory key left ``???``
    names what it expects."""
    if node is None or "_target_" not in node:
        raise config_error(key, node, f"a config with a _target_ (see conf/{key}/)")
    missing = [k for k in node if OmegaConf.is_missing(node, k)]
    if missing:
        name = f"{key}.{missing[0]}"
        raise ElsaError(f"{name} is not set: {REQUIRED.get(name, f'set it on the command line ({name}=...)')}")
    kwargs = {k: v for k, v in node.items() if k not in METADATA} if key in ("method", "start") else dict(node)
    cls = _target_class(node, key)
    accepted = constructor_keys(cls)
    if accepted is None:
        return kwargs, {}
    unknown = [k for k in kwargs if not k.startswith("_") and k not in accepted]
    dropped = {}
    if key == "method" and not getattr(cls, "has_budget", False):   # a method that does not train
        values = OmegaConf.to_container(node, resolve=True)
        dropped = {k: values[k] for k in unknown if k in budget_keys()}
    unknown = [k for k in unknown if k not in dropped]
    if unknown:
        label = f"{key}={node.get('name', cls.__name__)}"
        raise config_error(f"{key}.{unknown[0]}", node.get(unknown[0]),
                           f"not a key of {label}; its keys: {', '.join(sorted(accepted)) or 'none'}")
    return {k: v for k, v in kwargs.items() if k not in dropped}, dropped
