"""Spellings that are gone, and what replaced them: one line instead of Hydra's "Could not find" list.

Until issue 13 a method's budget and its starting point were baked into preset names (conf/method/elsa_quick
...); they are now three choices: method= (what the method is), budget= (how long it runs) and start= (where it
starts). ``python run.py method=elsa_quick`` exits with the new spelling; the sweep report maps the old names
of finished sweep dirs onto the same labels (:data:`OLD_METHODS`).
"""
from __future__ import annotations

import re

from elsa.errors import ElsaError

# old method preset -> (method, budget, start) that computes the same weights (tests/test_choices.py)
OLD_METHODS = {
    "elsa_cpu": ("elsa", "cpu", "sparsegpt"),
    "elsa_quick": ("elsa", "quick", "dense"),
    "elsa_quick_sgpt": ("elsa", "quick", "sparsegpt"),
    "elsa_from_sparsegpt": ("elsa", "quick", "sparsegpt"),    # elsa_quick_sgpt's name in results.json
    "elsa_l_quick": ("elsa_l", "quick", "dense"),
    "ast_cpu": ("ast", "cpu", "dense"),
    "ast_quick": ("ast", "quick", "dense"),
    "safe_cpu": ("safe", "cpu", "dense"),
}
# old keys -> their new spelling
OLD_KEYS = {"method.init": "start"}


def spelling(method: str, budget: str, start: str) -> str:
    """The command-line words of the three choices (defaults left out)."""
    words = [f"method={method}"]
    if budget != "paper":
        words.append(f"budget={budget}")
    if start != "dense":
        words.append(f"start={start}")
    return " ".join(words)


def refuse_old_spellings(args: list[str]) -> None:
    """Raise the one-line error for a command-line override that uses a removed name."""
    for arg in args:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+~")
        if not sep:
            continue
        if key == "method":
            for name in re.split(r"[,\s]+", value.strip("[]() ")):
                if name in OLD_METHODS:
                    raise ElsaError(f"method={name} is now {spelling(*OLD_METHODS[name])} (method= is what a "
                                    "method is, budget= how long it runs, start= where it starts)")
        elif key in OLD_KEYS:
            new = OLD_KEYS[key]
            raise ElsaError(f"{key}={value} is now {new}={value} (the pipeline runs the start before the method)")
