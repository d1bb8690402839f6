"""Webhooks: /api/v1/webhooks (router, service, schemas)."""
