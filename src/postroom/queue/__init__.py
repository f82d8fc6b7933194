"""The durable queue: spool files (store), retry timing (schedule) and the worker (runner)."""
