"""``python -m crh_kernels`` = the ``crh`` command (see :mod:`crh_kernels.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
