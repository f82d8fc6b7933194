"""Everything postroom keeps on disk besides the queue: mailboxes and the account store."""
