"""GET /metrics: Prometheus text format over the catalog (router, service)."""
