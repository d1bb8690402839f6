"""The repositories resource: router (HTTP), service (rules), schemas."""
