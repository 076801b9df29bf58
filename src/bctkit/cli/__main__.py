"""``python -m bctkit.cli``: the same as the ``bctkit`` command."""

import sys

from bctkit.cli.main import main

sys.exit(main())
