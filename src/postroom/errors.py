"""The one exception tree of postroom.

::

    PostroomError                 base of everything postroom raises on purpose
    ├── ConfigError               a bad or unknown config key (exit 2); names file and key
    ├── UsageError                bad command-line use (exit 2)
    ├── AccountError              user/alias management refused (exists, unknown, bad domain)
    ├── AddressError              a mailbox or path that is not valid RFC 5321 syntax
    ├── QueueError                a queue id that does not exist, a corrupt queue file
    ├── TemporaryStorageError     the disk refused a write (full, read-only): answer 4xx, keep going
    └── ImportSourceError         import-maildir: the source is no Maildir, a setting is unreadable

Errors of the *peer* (a client breaking SMTP or POP3) are not exceptions: the sans-I/O engines
turn them into protocol replies. An exception escaping an engine is a bug in our own code.
"""


class PostroomError(Exception):
    """Base class for errors postroom raises on purpose."""


class ConfigError(PostroomError):
    """A config file that cannot be used; the message names the file and the key at fault."""


class UsageError(PostroomError):
    """The command line was used wrongly."""


class AccountError(PostroomError):
    """An account or alias operation was refused."""


class AddressError(PostroomError):
    """A mailbox address or SMTP path that does not parse."""


class QueueError(PostroomError):
    """A queue id that does not exist, or a queue file that cannot be read."""


class TemporaryStorageError(PostroomError):
    """Storage failed in a way that may heal (disk full, read-only): the peer gets a 4xx."""


class ImportSourceError(PostroomError):
    """``import-maildir`` cannot read its source (no Maildir, a bad uidlist or UIDL format)."""
