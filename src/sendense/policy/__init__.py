"""Policies: retention planning and schedules (pure: no catalog, no clock)."""
