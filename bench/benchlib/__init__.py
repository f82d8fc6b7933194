"""Helpers for ``bench/run.py``: reference servers, load clients, statistics and the report."""
