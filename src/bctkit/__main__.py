"""``python -m bctkit`` (and ``torchrun -m bctkit``): the command line."""

import sys

from bctkit.cli import main

sys.exit(main())
