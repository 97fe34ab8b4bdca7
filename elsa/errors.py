"""One exception type for every user-facing mistake, so the CLI can print one clear line."""
import math


class ElsaError(Exception):
    """A problem the user can fix (bad key/value, missing file, unreachable hub...).

    The message names the key, the value and what is allowed; the CLI prints it as one line.
    """


def config_error(key: str, value, allowed: str) -> ElsaError:
    return ElsaError(f"{key}={value!s} is not allowed: {allowed}")


def one_of(key: str, value, options, note: str = ""):
    """``value`` when it is one of ``options``, else the one-line config error listing them."""
    if value not in options:
        raise config_error(key, value, f"one of {', '.join(map(str, options))}{note}")
    return value


def positive(key: str, value, whole: bool = False, zero_ok: bool = False, paper: str = ""):
    """``value`` as an int (``whole``) or float when it is a finite number > 0 (>= 0 with ``zero_ok``), else the
    one-line config error, which quotes the paper's value when given."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
        (value >= 0 if zero_ok else value > 0) and (not whole or float(value).is_integer())
    if not ok:
        kind = "a whole number" if whole else "a number"
        raise config_error(key, value, f"{kind} {'>= 0' if zero_ok else '> 0'}" + (f" (the paper: {paper})" if paper else ""))
    return int(value) if whole else float(value)


def nothing_to_prune(ignore, targets) -> ElsaError:
    """The refusal of a run whose ignore / targets leave no weight to prune (it would report the dense model)."""
    asked = " with ".join(f"{k}=[{','.join(v)}]" for k, v in (("ignore", ignore), ("targets", targets)) if v)
    return ElsaError(f"{asked} leaves no weight to prune (every prunable matrix of the model is ignored or not "
                     "targeted); narrow ignore or widen targets so that at least one matrix is pruned")
