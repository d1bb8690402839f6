"""The audit log: who did what, when, with what result."""
