"""Vocabulary shared by the stores."""

# Job and backup statuses of work in progress.
ACTIVE = ("pending", "running")
