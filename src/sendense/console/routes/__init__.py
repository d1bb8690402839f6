"""The console's pages, one module per resource."""

from sendense.console.routes import admin, auth, backups, dashboard, jobs, policies, restore, vms

ROUTERS = [
    auth.router,
    dashboard.router,
    vms.router,
    jobs.router,
    backups.router,
    restore.router,
    policies.router,
    admin.router,
]
