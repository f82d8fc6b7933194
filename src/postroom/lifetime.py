"""Child processes that must not outlive the process that made them.

Linux's ``PR_SET_PDEATHSIG`` asks the kernel to SIGKILL a child when its parent dies, kill -9
included, so that no orphan keeps a port or goes on writing mail nobody will acknowledge.
The standard library has no ``prctl``, hence ctypes; elsewhere this does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Get SIGKILL when the parent dies; exit now if ``parent`` is already gone.

    Call it after any change of uid or gid: the kernel forgets the request at such a change.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(0)
