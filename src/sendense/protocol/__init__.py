"""The typed contracts between Sendense processes, shared by both ends.

`node`: what the hub sends a node and what the node answers (SPEC §4), and
the job a node hands to its worker process.
"""
