"""The old path of :mod:`elsa.eval.tasks` (``elsa.tasks``, ``python -m elsa.tasks``): the same module."""
import sys

from elsa.eval import tasks as _module

if __name__ == "__main__":
    sys.exit(_module.main())
sys.modules[__name__] = _module
