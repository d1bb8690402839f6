"""API tokens: roles, scopes, expiry, revocation."""
