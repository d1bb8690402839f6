"""HTTP plumbing shared by hub and node: the one error body."""
