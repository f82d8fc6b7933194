"""POP3: the sans-I/O engine (protocol), the maildrop (session) and the asyncio glue (server)."""
