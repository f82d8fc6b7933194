"""``python -m postroom``: the same entry point as the ``postroom`` console script."""

import sys

from postroom.cli import main

sys.exit(main())
