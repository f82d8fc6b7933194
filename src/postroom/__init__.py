"""postroom: a small, readable mail server (SMTP MX + submission, POP3, durable queue, Maildir)."""

__version__ = "0.1.0"
