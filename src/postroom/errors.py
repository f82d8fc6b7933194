"""The one exception tree of postroom.

::

    PostroomError                 base of everything postroom raises on purpose
    ├── ConfigError               a bad or unknown config key (exit 2); names file and key
    ├── AccountError              user/alias management refused (exists, unknown, bad domain)
    ├── AddressError              a mailbox or path that is not valid RFC 5321 syntax
    ├── QueueError                a queue id that does not exist, a corrupt queue file
    │   └── LeaseLost             another node took a queued message over (or it was deleted)
    ├── TemporaryStorageError     the disk refused a write (full, read-only): answer 4xx, keep going
    ├── MailboxInUse              another POP3 session holds the maildrop: ``-ERR [IN-USE]``
    ├── LockedOut                 the client's IP was locked out while its login waited
    ├── PasswordUncheckable       argon2 could not run (memory): try again, no wrong password
    ├── KeysChanged               another node changed a domain's DKIM keys since they were read
    └── ImportSourceError         import-maildir: the source is no Maildir, a setting is unreadable

    EngineMisuse (a RuntimeError)  our own code used a sans-I/O engine wrongly: a bug, never caught

Errors of the *peer* (a client breaking SMTP or POP3) are not exceptions: the sans-I/O engines
turn them into protocol replies. An exception escaping an engine is a bug in our own code, and
the engines raise :class:`EngineMisuse` for it (an answer to an event that was not asked for,
a transition their table does not have).
"""


class PostroomError(Exception):
    """Base class for errors postroom raises on purpose."""


class ConfigError(PostroomError):
    """A config file that cannot be used; the message names the file and the key at fault."""


class AccountError(PostroomError):
    """An account or alias operation was refused."""


class AddressError(PostroomError):
    """A mailbox address or SMTP path that does not parse."""


class QueueError(PostroomError):
    """A queue id that does not exist, or a queue file that cannot be read."""


class LeaseLost(QueueError):
    """This node no longer holds a queued message: it was deleted, or another node took it over
    after this node's lease ran out. The attempt stops without recording anything."""


class TemporaryStorageError(PostroomError):
    """Storage failed in a way that may heal (disk full, read-only): the peer gets a 4xx."""


class StorageUnavailable(TemporaryStorageError):
    """The shared store (PostgreSQL) did not answer, or not in time: not a full disk, which
    the logs and metrics must not say."""


class PasswordUncheckable(PostroomError):
    """A password could not be checked: argon2 itself failed (it could not allocate its
    memory or start its threads). The client is told to try again (SMTP 454 4.7.0, POP3
    ``[SYS/TEMP]``); it is no failed login."""


class KeysChanged(PostroomError):
    """Another node changed the domain's DKIM keys between this one's load and save."""


class MailboxInUse(PostroomError):
    """Another session holds the maildrop (RFC 2449 §8.1.1: answered with ``-ERR [IN-USE]``)."""


class LockedOut(PostroomError):
    """The client's IP reached the login lockout while its password check waited its turn:
    the password was not checked (answered as throttled, ``454``/``[SYS/TEMP]``, not as wrong)."""


class EngineMisuse(RuntimeError):
    """Our code used an engine in a state that does not allow it: a bug, not the peer's fault."""


class ImportSourceError(PostroomError):
    """``import-maildir`` cannot read its source (no Maildir, a bad uidlist or UIDL format)."""
