"""Everything postroom keeps: the queue, the mailboxes, the accounts, behind interfaces."""
