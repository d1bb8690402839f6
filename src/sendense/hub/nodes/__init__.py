"""The nodes resource: router (HTTP), service (rules), schemas."""
