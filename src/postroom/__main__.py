"""``python -m postroom``: the same entry point as the ``postroom`` console script."""

import signal
import sys

if "serve" in sys.argv[1:]:
    # Until cli.main holds it for the supervisor (a reload): by default a SIGHUP while the
    # imports run would end the server.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

from postroom.cli import main

sys.exit(main())
