"""The local backend: SQLite accounts, Maildir mailboxes, the journal and the spool on disk."""
