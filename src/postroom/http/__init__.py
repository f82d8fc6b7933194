"""The HTTP listener: ``GET /metrics`` (Prometheus) and ``GET /healthz``."""
