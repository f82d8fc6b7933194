"""The account rules every account store follows: admin input, alias targets, alias resolution.

Pure: a store passes in how to read an alias's targets, whether a user exists and which domains
are local. Addresses typed by an admin become keys here (:func:`account_address`,
:func:`alias_key`): lower-cased local part, IDNA domain, a local domain, safe as a path.
An alias may name itself among its targets (keep a copy and forward) only if it is a user too;
an alias met again is a loop and is not walked twice, so an alias that only leads back to itself
expands to an empty list (the caller refuses it), as does one whose aliases nest deeper than
:data:`MAX_DEPTH` (refused whole rather than a branch dropped: Postfix's
``virtual_alias_recursion_limit`` does the same). A local target must exist when it is added
(:func:`check_targets`), and one without an account (a user deleted since) is skipped by
expansion: mail is never stored for an address that has no account, except ``postmaster@``
(RFC 5321 §4.5.1). ``@DOMAIN`` is the catch-all of a local domain: it takes an address there
that is neither a user nor an alias; ``postmaster`` never goes to it.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Sequence

from postroom.address import (
    MAX_PATH,
    Address,
    local_key,
    normalise_domain,
    parse_user_address,
    safe_local_part,
)
from postroom.errors import AccountError, AddressError

MAX_DEPTH = 100  # aliases within aliases; deeper is refused (5.4.6) as a loop is


def account_address(text: str, domains: Iterable[str]) -> Address:
    """Validate an address typed by an admin: well-formed, local domain, safe as a path."""
    try:
        addr = parse_user_address(text)
        safe_local_part(addr.local)
    except AddressError as exc:
        raise AccountError(f"malformed address {text!r}: {exc}") from None
    if addr.domain not in set(domains):
        raise AccountError(f"domain {addr.domain!r} is not one of the local domains")
    if len(addr.key.encode()) + 2 > MAX_PATH:
        # RFC 5321 §4.5.3.1.3: no RCPT or MAIL could name it.
        raise AccountError(f"address {text!r} is longer than a path may be ({MAX_PATH - 2} octets)")
    return Address(local_key(addr.local), addr.domain)


def alias_key(text: str, domains: Iterable[str]) -> str:
    """The key of an alias typed by an admin: ``local@domain``, or ``@domain`` (also written
    ``*@domain``) for the catch-all of a local domain."""
    if text.startswith(("@", "*@")):
        name = text.partition("@")[2]
        try:
            domain = normalise_domain(name)
        except ValueError as exc:
            raise AccountError(f"malformed catch-all {text!r}: {exc}") from None
        if domain not in set(domains):
            raise AccountError(f"domain {domain!r} is not one of the local domains")
        return f"@{domain}"
    return account_address(text, domains).key


def target_key(target: str, local_domains: Container[str]) -> str:
    """How a target is stored: a local one in key form (lower-case local part), a remote one
    as typed."""
    local, _, domain = target.rpartition("@")
    return f"{local_key(local)}@{domain}" if domain in local_domains else target


def check_targets(
    alias: str,
    targets: Iterable[str],
    local_domains: Container[str],
    is_user: Callable[[str], bool],
    is_alias: Callable[[str], bool],
) -> list[str]:
    """The targets of ``alias`` as stored (:func:`target_key`); AccountError naming the first
    local one that is neither a user, an alias (other than ``alias`` itself) nor
    ``postmaster@``."""
    out = []
    for target in targets:
        key = target_key(target, local_domains)
        if key.rpartition("@")[2] in local_domains and not (
            has_mailbox(key, is_user) or (key != alias and is_alias(key))
        ):
            if key == alias:  # (a copy kept needs a mailbox to keep it in)
                raise AccountError(f"alias {key} may list itself only if it is a user too")
            raise AccountError(f"target {key} is no user or alias here")
        out.append(key)
    return out


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
    neither a user nor an alias; [] for an alias loop or aliases nested deeper than
    ``max_depth``."""
    expanded: set[str] = set()  # aliases already walked: met again, they are a loop
    result: dict[str, None] = {}  # final addresses, each once, in order
    too_deep = False

    def final(t: str) -> None:
        if t.rpartition("@")[2] in local_domains and not has_mailbox(t, is_user):
            return  # an alias to nobody (a user deleted since)
        result[t] = None

    def walk(k: str, depth: int) -> bool:
        nonlocal too_deep
        targets = targets_of(k)
        if not targets:
            return False
        if depth > max_depth:
            too_deep = True
            return True
        expanded.add(k)
        for t in targets:
            if t == k:
                final(t)  # the alias keeps a copy under its own name
            elif t in expanded:
                continue
            elif not walk(t, depth + 1):
                final(t)
        return True

    if walk(key, 0):
        return [] if too_deep else list(result)
    return [key] if is_user(key) else None


def resolve(key: str, expand_key: Callable[[str], list[str] | None]) -> list[str] | None:
    """Where mail for local ``key`` goes: its expansion, else ``postmaster@`` itself (also
    when its alias leads to no mailbox), else the domain's catch-all (alias ``@domain``). None:
    no such address."""
    found = expand_key(key)
    local, _, domain = key.rpartition("@")
    if not found and local == "postmaster":
        return [key]  # also when its alias leads nowhere: always accepted (RFC 5321 §4.5.1)
    if found is None:
        found = expand_key(f"@{domain}")
    return found


def owns(
    user_key: str, sender_key: str, expanded: list[str] | None, sender_is_user: bool = False
) -> bool:
    """May ``user_key`` send as ``sender_key`` (whose expansion is ``expanded``, catch-all
    aside): its own address, or an alias that reaches it. A user's own address is theirs
    alone (``sender_is_user``): an alias of that name forwards their mail, it does not hand
    the address to whoever receives it (RFC 6409 §6.1: the submitter must be authorized)."""
    if user_key == sender_key:
        return True
    return not sender_is_user and expanded is not None and user_key in expanded


class AliasLookups:
    """The alias lookups of an account store, made from its :meth:`user_exists`,
    :meth:`alias_targets` and local domains by the rules above: every store answers them the
    same way, so each only says how it reads a user and an alias."""

    _domains: frozenset[str]

    @property
    def local_domains(self) -> frozenset[str]:
        """The local domains (IDNA, lower-case): a local address needs an account to get mail."""
        return self._domains

    @local_domains.setter
    def local_domains(self, domains: Iterable[str]) -> None:  # SIGHUP may change them
        self._domains = frozenset(domains)
        self._forget()

    def _forget(self) -> None:
        """Drop what a store keeps of earlier answers (the domains changed)."""

    def user_exists(self, key: str) -> bool:
        raise NotImplementedError

    def alias_targets(self, key: str) -> Sequence[str]:
        raise NotImplementedError

    def has_mailbox(self, key: str) -> bool:
        """May mail be stored for local ``key``: a user, or ``postmaster@`` (always accepted,
        RFC 5321 §4.5.1). Nothing else ever gets a mailbox."""
        return has_mailbox(key, self.user_exists)

    def expand(self, key: str, max_depth: int = MAX_DEPTH) -> list[str] | None:
        """:func:`expand` on this store."""
        return expand(key, self.alias_targets, self.user_exists, self._domains, max_depth)

    def resolve(self, key: str) -> list[str] | None:
        """Where mail for local ``key`` goes (:func:`resolve`)."""
        return resolve(key, self.expand)

    def owns(self, user_key: str, sender_key: str) -> bool:
        """May ``user_key`` send as ``sender_key``: its own address or an alias that reaches it
        (of a local domain: one taken out of them hands out nothing)."""
        if user_key == sender_key:
            return True
        if sender_key.rpartition("@")[2] not in self._domains:
            return False
        return owns(user_key, sender_key, self.expand(sender_key), self.user_exists(sender_key))
