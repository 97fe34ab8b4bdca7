"""The old path of :mod:`elsa.methods.slorb` (``elsa.slorb``, ``python -m elsa.slorb``): the same module."""
import sys

from elsa.methods import slorb as _module

if __name__ == "__main__":
    sys.exit(_module.main())
sys.modules[__name__] = _module
