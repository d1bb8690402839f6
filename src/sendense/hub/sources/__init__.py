"""The sources resource: router (HTTP), service (rules), schemas."""
