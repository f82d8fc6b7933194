"""How an address resolves through aliases: the rule every account store follows.

Pure: the store passes in how to read an alias's targets and whether a user exists. An alias
may name itself among its targets (keep a copy and forward), which ends the recursion there;
loops stop quietly, so an alias that only leads back to itself expands to an empty list (the
caller refuses it). ``@DOMAIN`` is a catch-all: an address of that domain that is neither a
user nor an alias goes to its targets; ``postmaster`` never does (it has a mailbox of its own
when no alias names it, RFC 5321 §4.5.1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

MAX_DEPTH = 10


def expand(
    key: str,
    targets_of: Callable[[str], Sequence[str]],
    is_user: Callable[[str], bool],
    catch_all: bool = True,
    max_depth: int = MAX_DEPTH,
) -> list[str] | None:
    """The final addresses for ``key`` (keys for local ones); None when nothing takes it."""
    seen: set[str] = set()
    result: list[str] = []

    def walk(k: str, depth: int) -> bool:
        targets = targets_of(k)
        if not targets:
            return False
        for t in targets:
            if t in seen:
                continue
            seen.add(t)
            if t != k and depth < max_depth and walk(t, depth + 1):
                continue
            result.append(t)
        return True

    if walk(key, 0):
        return result
    if is_user(key):
        return [key]
    local, _, domain = key.rpartition("@")
    if catch_all and local != "postmaster" and walk("@" + domain, 0):
        return result
    return None


def owns(user_key: str, sender_key: str, expanded: list[str] | None) -> bool:
    """May ``user_key`` send as ``sender_key`` (whose expansion, catch-all aside, is
    ``expanded``): its own address, or an alias that reaches it."""
    return user_key == sender_key or (expanded is not None and user_key in expanded)
