"""The vms resource: router (HTTP), service (rules), schemas."""
