"""The scheduler: policies' runs, their per-VM queues, and the loop in the hub.

- `matched_vms(s, policy)`: which VMs a policy protects now (selector.py);
- `run_policy_now(st, policy_id, created_by=...)`: a manual run (runs.py);
- `Scheduler` (loop.py): claims due runs, drains queues, follows up jobs;
  `due_set(policies, now)` is its pure, benchmarkable core;
- `events`: where a missed or finished run is told to others (webhooks).
"""

from sendense.scheduler.loop import Clock, PolicyTiming, Scheduler, SystemClock, due_set
from sendense.scheduler.runs import drain, finish_runs, follow_up, run_policy_now
from sendense.scheduler.selector import matched_vms, selector_matches

__all__ = [
    "Clock",
    "PolicyTiming",
    "Scheduler",
    "SystemClock",
    "drain",
    "due_set",
    "finish_runs",
    "follow_up",
    "matched_vms",
    "run_policy_now",
    "selector_matches",
]
