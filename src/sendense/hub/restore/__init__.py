"""Restores: whole disks (POST /api/v1/restores) and instant access exports."""
