"""Started as root with ``user`` set, from a Python the user cannot read (a pyenv under /root),
every message on the MX port got 451 and ``postroom dns`` a traceback: the IDNA codecs, the
public suffix list and DNS record types were loaded on demand, after the drop. What is loaded
on demand is now loaded before it (only when a drop follows).

And idna's UTS #46 tables, read at the first Unicode domain (``user add x@bücher.example``, an
RCPT to one) were not: a traceback and 451 (cliadv probe)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CHECK = """
import sys
from postroom import config, privileges
from postroom.auth import dmarc
cfg = config.from_dict({"hostname": "mx.a.test", "domains": ["a.test"], "data_dir": sys.argv[1],
                        "user": "nobody"})
privileges.preload(cfg)
wanted = ["encodings.punycode", "encodings.idna", "dns.rdtypes.ANY.MX", "dns.rdtypes.ANY.TXT",
          "dns.rdtypes.IN.AAAA", "postroom.auth.reports", "postroom.storage.local.queue",
          "idna.uts46data"]
print(" ".join(m for m in wanted if m not in sys.modules) or "-", dmarc._psl.cache_info().currsize)
"""


@pytest.mark.skipif(os.getuid() != 0, reason="a drop needs root")
def test_what_loads_on_demand_is_loaded_before_the_drop(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHECK, str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    assert out == ["-", "1"]  # nothing missing; the suffix list read
