"""``python -m postroom`` and the ``postroom`` console script: one entry point, light enough
to take the signals of a stop or a reload before the server's modules are imported."""

import sys

from postroom import early_signals


def run() -> int:
    """Run the command line. For ``serve``, a SIGTERM, SIGINT or SIGHUP while the imports run
    is kept for the supervisor (see early_signals)."""
    if "serve" in sys.argv[1:]:
        early_signals.hold()
    from postroom.cli import main

    return main()


if __name__ == "__main__":
    sys.exit(run())
