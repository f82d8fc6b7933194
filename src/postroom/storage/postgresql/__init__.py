"""The PostgreSQL backend: accounts, mailboxes, the queue and DKIM keys that nodes share.

``db.py`` connects (asyncpg, a pool per worker process), ``migrations.py`` keeps the schema
current, ``accounts.py`` and ``mailboxes.py`` are the stores. Everything else in postroom sees
them through :mod:`postroom.storage.factory`, never directly.
"""
