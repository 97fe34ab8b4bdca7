"""What a method is, declared by its class: a family, a name, and typed keys.

A method class names its family (:data:`ONE_SHOT`, :data:`LAYER_WISE`, :data:`TRAINING`); the family sets the
flags the pipeline reads (calibration, offload, start, budget, FSDP), and a class overrides one only where it
really differs (SAFE trains per block and has a budget; OATS's low-rank branches make it no start). A class that
passes ``name=`` (and ``variants=`` for the conf files that configure the same class differently, e.g.
``ast_boosted``) is registered under that name: the report's order, the budget parts, the start stages, FSDP
support and the CLI's messages read :func:`methods` / :func:`names` instead of lists of names.

A key of a method is a constructor parameter annotated ``Annotated[type, rule]`` with its default; the rule
(:class:`Number`, :class:`Choice`, :class:`Flag`, :class:`Numbers`) is the validation and the one-line
``elsa: error:`` message, checked before the constructor's body runs (so before any model loads). The keys every
training method shares are the fields of :class:`elsa.engines.training.TrainSettings`, annotated the same way.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import math
import pkgutil
import typing
from dataclasses import dataclass, fields, is_dataclass

from elsa.errors import config_error


# -- families --------------------------------------------------------------------------------------------------
class Family:
    """A kind of method and the flags that follow from it (class attributes of every method of the family)."""

    def __init__(self, name: str, rank: int, **flags: bool):
        self.name, self.rank, self.flags = name, rank, flags

    def __repr__(self) -> str:
        return f"Family({self.name})"


# needs_calibration: reads ctx.calibration; offload: moves one block at a time to the device itself;
# takes_start: continues from the model it is given (start=); has_budget: budget= sets its steps / epochs
# (conf/method_budget/<budget>/<name>.yaml); supports_fsdp: runs sharded (hardware=fsdp); start_eligible: may run
# as a start stage before a method that takes one (conf/start/<name>.yaml); distils / keeps_dense: reads
# ctx.teacher; eval_initial: the pipeline reports the perplexity of the start stage's solution.
ONE_SHOT = Family("one-shot", 0, needs_calibration=False, offload=False, takes_start=False, has_budget=False,
                  supports_fsdp=False, start_eligible=True, distils=False, keeps_dense=False, eval_initial=False)
LAYER_WISE = Family("layer-wise", 1, **{**ONE_SHOT.flags, "needs_calibration": True, "offload": True})
TRAINING = Family("training", 2, **{**ONE_SHOT.flags, "takes_start": True, "has_budget": True,
                                    "supports_fsdp": True, "start_eligible": False})
FLAGS = tuple(ONE_SHOT.flags)

_METHODS: dict[str, type] = {}


def declare(cls, name: str | None = None, variants: tuple[str, ...] = (), position: float | None = None) -> None:
    """Called for every method class (``Pruner.__init_subclass__``): its family's flags where the class names a
    family (a flag the class sets itself stays), its keys checked on construction, its registration by name."""
    if "family" in cls.__dict__:
        for flag, value in cls.family.flags.items():
            if flag not in cls.__dict__:
                setattr(cls, flag, value)
    if "__init__" in cls.__dict__:
        cls.__init__ = checked(cls.__dict__["__init__"])
    if position is not None:
        cls.position = position
    if name is None:
        return
    cls.name, cls.names = name, (name, *variants)
    for n in cls.names:
        other = _METHODS.get(n)
        if other is not None and (other.__module__, other.__qualname__) != (cls.__module__, cls.__qualname__):
            raise TypeError(f"two methods named {n}: {other.__module__}.{other.__qualname__} and "
                            f"{cls.__module__}.{cls.__qualname__}")
        _METHODS[n] = cls


def _import_all() -> None:
    """Import every module of elsa.methods, so that every built-in method is registered."""
    import elsa.methods as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")


def methods() -> dict[str, type]:
    """name -> class of every registered method (the built-in ones and any registered since), in the report's
    order: by family (one-shot, layer-wise, training), then the class's ``position``, then its variants."""
    _import_all()

    def key(item):
        name, cls = item
        return cls.family.rank, cls.position, cls.names.index(name)
    return dict(sorted(_METHODS.items(), key=key))


def names(flag: str | None = None) -> list[str]:
    """The registered methods' names (those whose ``flag`` is true), in the report's order."""
    if flag is not None and flag not in FLAGS:
        raise KeyError(f"{flag} is not a method flag ({', '.join(FLAGS)})")
    return [n for n, cls in methods().items() if flag is None or getattr(cls, flag)]


def get(name: str) -> type | None:
    """The class registered as ``name`` (None: no such method)."""
    return methods().get(name)


# -- typed keys ------------------------------------------------------------------------------------------------
class Rule:
    """What one key accepts: :meth:`check` raises the one-line config error naming the key, the value and
    :meth:`allowed`."""

    def ok(self, value) -> bool:
        raise NotImplementedError

    def allowed(self) -> str:
        raise NotImplementedError

    def check(self, key: str, value) -> None:
        if not self.ok(value):
            raise config_error(key, list(value) if isinstance(value, tuple) else value, self.allowed())


def _is(value, literal) -> bool:
    return value is literal if literal is None or isinstance(literal, bool) else value == literal and \
        type(value) is type(literal)


def _g(x) -> str:
    return f"{x:g}"


@dataclass(frozen=True)
class Number(Rule):
    """A finite number (``whole``: an integral one) within the bounds given (gt / ge / lt / le), or one of
    ``also`` (None, "auto"). ``paper`` is quoted in the message, ``note`` ends it."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    whole: bool = False
    paper: str = ""
    note: str = ""
    also: tuple = ()

    def ok(self, value) -> bool:
        if any(_is(value, a) for a in self.also):
            return True
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        return (not self.whole or float(value).is_integer()) and \
            (self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge) and \
            (self.lt is None or value < self.lt) and (self.le is None or value <= self.le)

    def allowed(self) -> str:
        lo = (">=", self.ge) if self.ge is not None else (">", self.gt) if self.gt is not None else None
        hi = ("<=", self.le) if self.le is not None else ("<", self.lt) if self.lt is not None else None
        if lo and hi:
            bound = f" in {'[' if lo[0] == '>=' else '('}{_g(lo[1])}, {_g(hi[1])}{']' if hi[0] == '<=' else ')'}"
        elif lo or hi:
            bound = f" {(lo or hi)[0]} {_g((lo or hi)[1])}"
        else:
            bound = ""
        text = f"{'a whole number' if self.whole else 'a number'}{bound}"
        text += "".join(f" or {'null' if a is None else a}" for a in self.also)
        return text + (f" (the paper: {self.paper})" if self.paper else "") + (f" {self.note}" if self.note else "")


@dataclass(frozen=True)
class Choice(Rule):
    """One of ``options``; ``text`` replaces the message's "one of ..." where the options need explaining."""

    options: tuple
    text: str = ""

    def ok(self, value) -> bool:
        return any(_is(value, o) for o in self.options)

    def allowed(self) -> str:
        return self.text or f"one of {', '.join('null' if o is None else str(o) for o in self.options)}"


@dataclass(frozen=True)
class Flag(Rule):
    """true or false (``text`` says what each means)."""

    text: str = "true or false"

    def ok(self, value) -> bool:
        return isinstance(value, bool)

    def allowed(self) -> str:
        return self.text


@dataclass(frozen=True)
class Numbers(Rule):
    """A list of ``count`` numbers, each accepted by ``each``."""

    count: int
    each: Number
    text: str

    def ok(self, value) -> bool:
        return isinstance(value, (list, tuple)) and len(value) == self.count and all(self.each.ok(v) for v in value)

    def allowed(self) -> str:
        return self.text


@functools.cache
def rules(fn) -> dict[str, Rule]:
    """The rules of ``fn``'s annotated parameters (a function, or a dataclass: its fields)."""
    if isinstance(fn, type):
        hints = typing.get_type_hints(fn, include_extras=True)
    else:   # only the Annotated ones are evaluated: the others may name what the module imports lazily
        hints = {k: eval(a, fn.__globals__) if isinstance(a, str) else a for k, a in fn.__annotations__.items()
                 if k != "return" and (not isinstance(a, str) or "Annotated[" in a)}
    found = {}
    for key, hint in hints.items():
        meta = [m for m in getattr(hint, "__metadata__", ()) if isinstance(m, Rule)]
        if meta:
            found[key] = meta[0]
    return found


def check_keys(fn, values: dict, prefix: str = "method") -> None:
    """Each value of ``values`` whose key ``fn`` annotates with a rule, checked (the first failure raises)."""
    found = rules(fn)
    for key, value in values.items():
        if key in found:
            found[key].check(f"{prefix}.{key}", value)


def checked(init):
    """``init`` with its annotated arguments checked before its body runs."""
    if getattr(init, "__wrapped__", None) is not None:
        return init
    signature = inspect.signature(init)

    named = [p.name for p in list(signature.parameters.values())[1:] if p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                                                    p.KEYWORD_ONLY)]

    @functools.wraps(init)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        check_keys(init, {k: v for k, v in bound.arguments.items() if k != "self"})
        bound.apply_defaults()
        recorded = args[0].__dict__.setdefault("_init_arguments", {})
        recorded[init.__qualname__] = {k: bound.arguments[k] for k in named}
        return init(*args, **kwargs)
    return wrapper


def own_arguments(obj, cls) -> dict:
    """The named arguments (defaults applied) that ``cls``'s own constructor received for ``obj``, as recorded by
    :func:`checked`: a training method's own keys for its checkpoint signature, without ``**shared``."""
    return dict(obj.__dict__["_init_arguments"][cls.__init__.__qualname__])


def check_fields(obj) -> None:
    """A dataclass instance's annotated fields, checked (TrainSettings.__post_init__)."""
    check_keys(type(obj), {f.name: getattr(obj, f.name) for f in fields(obj)})


def declared(cls) -> dict[str, tuple[Rule | None, typing.Any]]:
    """key -> (rule, default) of every key ``cls(...)`` takes: its constructors' parameters along the MRO (the
    most derived declaration wins), and for a training method the shared settings' fields with the defaults its
    ``train_defaults`` set. A parameter without a default maps to ``inspect.Parameter.empty``."""
    found: dict[str, tuple] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        init = inspect.unwrap(init)
        params = list(inspect.signature(init).parameters.values())[1:]
        own = rules(init)
        for p in params:
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in found:
                found[p.name] = (own.get(p.name), p.default)
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
        settings = klass.__dict__.get("shared_settings")
        if settings is not None and is_dataclass(settings):
            shared = rules(settings)
            overrides = getattr(cls, "train_defaults", {})
            for f in fields(settings):
                if f.name not in found:
                    found[f.name] = (shared.get(f.name), overrides.get(f.name, f.default))
            break
    return found
