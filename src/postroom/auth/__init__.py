"""Sender authentication: DKIM signing and keys, SPF/DKIM/DMARC checks, Authentication-Results,
DMARC aggregate reports, and the DNS records a domain publishes.

One module per job: ``lookup`` (the cached async DNS every check shares), ``spf``,
``dkim_sign``, ``dkim_verify``, ``dmarc``, ``results`` (the RFC 8601 header), ``keys`` (DKIM
keys, selectors and rotation), ``records`` (what ``postroom dns`` prints and checks),
``reports`` (RFC 7489 §7.2 aggregate reports), and ``service`` (the one object the SMTP policy
calls at the end of DATA).
"""
