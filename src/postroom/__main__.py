"""``python -m postroom`` and the ``postroom`` console script: one entry point, light enough
to take SIGHUP before the server's modules are imported."""

import signal
import sys


def run() -> int:
    """Run the command line. For ``serve``, SIGHUP is ignored until cli.main holds it for the
    supervisor (a reload): by default a SIGHUP while the imports run (``systemctl reload``
    right after the start) would end the server."""
    if "serve" in sys.argv[1:]:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from postroom.cli import main

    return main()


if __name__ == "__main__":
    sys.exit(run())
