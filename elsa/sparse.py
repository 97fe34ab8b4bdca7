"""The old path of :mod:`elsa.artifacts.compressed` (``elsa.sparse``, ``python -m elsa.sparse``): the same module."""
import sys

from elsa.artifacts import compressed as _module

if __name__ == "__main__":
    sys.exit(_module.main())
sys.modules[__name__] = _module
