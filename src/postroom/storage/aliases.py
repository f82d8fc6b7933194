"""How an address resolves through aliases: the rule every account store follows.

Pure: the store passes in how to read an alias's targets, whether a user exists and which
domains are local. An alias may name itself among its targets (keep a copy and forward); an
alias met again is a loop and is not walked twice, so an alias that only leads back to itself
expands to an empty list (the caller refuses it). A local target without an account (a user
deleted since) is skipped: mail is never stored for an address that has no account, except
``postmaster@`` (RFC 5321 §4.5.1). ``@DOMAIN`` is the catch-all of a local domain: it takes
an address there that is neither a user nor an alias; ``postmaster`` never goes to it.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Sequence

MAX_DEPTH = 10


def has_mailbox(key: str, is_user: Callable[[str], bool]) -> bool:
    """May mail be stored for local ``key``: a user, or ``postmaster@``."""
    return key.partition("@")[0] == "postmaster" or is_user(key)


def expand(
    key: str,
    targets_of: Callable[[str], Sequence[str]],
    is_user: Callable[[str], bool],
    local_domains: Container[str],
    max_depth: int = MAX_DEPTH,
) -> list[str] | None:
    """The final addresses of ``key`` through aliases (itself for a user); None if it is
    neither a user nor an alias; [] for an alias loop."""
    expanded: set[str] = set()  # aliases already walked: met again, they are a loop
    result: dict[str, None] = {}  # final addresses, each once, in order

    def final(t: str) -> None:
        if t.rpartition("@")[2] in local_domains and not has_mailbox(t, is_user):
            return  # an alias to nobody (a user deleted since)
        result[t] = None

    def walk(k: str, depth: int) -> bool:
        targets = targets_of(k)
        if not targets:
            return False
        expanded.add(k)
        for t in targets:
            if t == k:
                final(t)  # the alias keeps a copy under its own name
            elif t in expanded:
                continue
            elif depth >= max_depth or not walk(t, depth + 1):
                final(t)
        return True

    if walk(key, 0):
        return list(result)
    return [key] if is_user(key) else None


def resolve(key: str, expand_key: Callable[[str], list[str] | None]) -> list[str] | None:
    """Where mail for local ``key`` goes: its expansion, else ``postmaster@`` itself, else
    the domain's catch-all (alias ``@domain``). None: no such address."""
    found = expand_key(key)
    if found is None:
        local, _, domain = key.rpartition("@")
        if local == "postmaster":
            return [key]
        found = expand_key(f"@{domain}")
    return found


def owns(user_key: str, sender_key: str, expanded: list[str] | None) -> bool:
    """May ``user_key`` send as ``sender_key`` (whose expansion is ``expanded``, catch-all
    aside): its own address, or an alias that reaches it."""
    return user_key == sender_key or (expanded is not None and user_key in expanded)
