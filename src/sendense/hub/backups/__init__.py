"""The backups resource: router (HTTP), service (rules), schemas."""
