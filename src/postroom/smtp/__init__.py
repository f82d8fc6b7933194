"""SMTP: the shared vocabulary, the sans-I/O engines and their asyncio glue."""
