"""The old path of :mod:`elsa.artifacts.generate` (``elsa.generate``, ``python -m elsa.generate``): the same module."""
import sys

from elsa.artifacts import generate as _module

if __name__ == "__main__":
    sys.exit(_module.main())
sys.modules[__name__] = _module
