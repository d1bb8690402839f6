"""The jobs resource: router (HTTP), service (rules), schemas."""
