"""One settings object per process, read from the environment (``SENDENSE_*``)
and overridden by command-line flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class HubSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SENDENSE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8082
    data_dir: Path = Path("var/hub")
    # SQLAlchemy URL; empty means SQLite at <data_dir>/catalog.db.
    database_url: str = ""
    # NBD targets: where qemu-nbd listens and the address nodes are told to use.
    nbd_bind: str = "127.0.0.1"
    nbd_advertise_host: str = ""
    nbd_port_first: int = 10100
    nbd_port_last: int = 10200
    # QCOW2 cluster size of targets; see engine/backup.py for why.
    cluster_size: int = 65536
    poll_interval: float = 0.1
    # A node that has not answered for this long is considered gone.
    node_timeout: float = 30.0
    job_timeout: float = 4 * 3600.0
    # A job's owner renews its lease every third of this; a lease this old
    # means its hub process is gone (engine/lifecycle.py).
    job_lease: float = 30.0
    # Worker threads of the API's sync handlers, per process (see hub/app.py).
    # 0 (default): 4 on SQLite, 16 on PostgreSQL (resolved below). On SQLite a
    # request is CPU under the GIL and more threads only switch more (the API
    # bench: 40 threads doubled a list's CPU per request at 50 clients). On
    # PostgreSQL every request also waits for its round trips to the server,
    # and 4 threads could not overlap them: `make bench-load --quick` at 200
    # requests/s, same run, 4 threads p50 13.5 s / p99 30 s and 922 timeouts,
    # 16 threads p50 1.3 s / p99 10 s and none (docs/performance.md).
    api_threads: int = 0
    # API worker processes (hub/serve.py); 0: one per CPU core, at most 4.
    api_workers: int = 0
    # Set by hub/serve.py in each worker process: which one it is, of how many.
    worker_index: int = 0
    worker_count: int = 1
    # Bytes/s a consolidation's merge (qemu-img commit) may write; 0: no
    # limit. Recovery after a crash rolls forward at full speed.
    merge_rate: int = 0
    # Seconds between two passes of the immutable-lock sweeper (engine/locks.py).
    lock_sweep_interval: float = 600.0
    # Refuse a backup that cannot fit in its repository (engine/backup.py).
    space_check: bool = True
    # Seconds between two health probes of every node (GET /nodes shows the
    # last result and its age; hub/nodes/health.py).
    node_health_interval: float = 10.0
    # Largest request body the API reads (413 beyond; hub/limits.py).
    max_body_bytes: int = 1 << 20
    # A file-level restore session idle this long (seconds) is closed.
    restore_idle_timeout: float = 3600.0
    # Where whole-disk restores may write files, colon-separated absolute
    # directories; empty: <data_dir>/restores (restore/disk.py).
    restore_dirs: str = ""
    # Audit entries older than this many days are removed (hourly); 0: kept.
    audit_retention_days: int = 400
    # The policy scheduler (scheduler/loop.py): off for hubs that only serve
    # the API; seconds between two ticks; policy jobs at a time per node
    # (0: no limit), the rest wait queued in the catalog.
    scheduler: bool = True
    scheduler_interval: float = 10.0
    # Deprecated: the per-node limit is now SENDENSE_NODE_JOB_LIMIT (below),
    # for every backup; this one is read in its place when only it is set.
    scheduler_node_limit: int | None = None
    # Webhooks (notify/sender.py): the sender thread (off: events are still
    # recorded, another hub process sends them); seconds between two passes;
    # per-request timeout; retry backoff base * 2^(attempt-1) seconds, at
    # most backoff_max, given up (failed) after max_attempts attempts.
    webhooks: bool = True
    webhook_interval: float = 2.0
    webhook_timeout: float = 10.0
    webhook_backoff: float = 5.0
    webhook_backoff_max: float = 3600.0
    webhook_max_attempts: int = 12
    # Delivered and failed deliveries older than this many days are removed
    # (hourly); 0: kept. Pending ones stay.
    webhook_retention_days: int = 30
    # GET /metrics (hub/metrics/): a bearer token for scrapers besides API
    # tokens (empty: API tokens only); VM names as labels: "auto" (unless a
    # live scoped token exists, i.e. several tenants), "always" or "never"
    # (the vm_id label is always there).
    metrics_token: str = ""
    metrics_vm_names: Literal["auto", "always", "never"] = "auto"
    # --- Hub <-> node HTTPS (issue 10, docs/security.md): the API serves TLS
    # when both files are given (PEM; hub/serve.py); nodes at http:// URLs are
    # refused unless their host is loopback or this is true (demo, lab).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    allow_plain_http_nodes: bool = False
    # --- Encrypted repositories (issue 10, keystore.py, docs/security.md): the
    # master key wrapping each encrypted repository's data key; empty:
    # <data_dir>/master.key (made, mode 0600, with the first encrypted
    # repository). Keep it on other storage than the repositories and the
    # catalog's backups: without it encrypted backups are unreadable.
    master_key_file: Path | None = None
    # --- NBD over TLS (issue 10, nbd/psk.py, docs/security.md): every backup
    # target requires TLS with a pre-shared key per job and disk, and exports
    # beyond loopback too. False exists ONLY for the two-host benchmark's
    # no-TLS round (bench/topology_bench.py); the hub warns loudly at start.
    nbd_tls: bool = True
    # --- pull (issue 11, engine/pull.py): a full of a VM whose node says
    # transfer=pull is read by ``qemu-img convert`` in the hub. Its coroutines
    # (-m) and target cache mode (-t; "none" = O_DIRECT, flushed at the end;
    # never "unsafe": a restore point is durable): measured, engine/pull.py.
    pull_coroutines: int = 8
    pull_cache: str = "none"
    # --- Targets that survive (issue 11, "hubside"; engine/backup.py): a
    # target whose qemu-nbd dies while the node still copies is served again
    # on the same port, export and key, at most this many times per disk and
    # job (then the job fails). qemu-nbd cache and aio modes of targets:
    # "auto" = none (O_DIRECT) where the repository takes it, else writeback;
    # aio "" = native with O_DIRECT (measured, and why: engine/backup.py).
    nbd_target_restarts: int = 5
    nbd_target_cache: str = "auto"
    nbd_target_aio: str = ""
    # --- Node limits and the queue (issue 12, "dispatch"; engine/dispatch.py):
    # backup jobs at a time per node unless the node's max_jobs says
    # otherwise (0: no limit); further ones wait queued. Seconds between two
    # claim passes of a hub process (it also tries when one of its jobs ends).
    node_job_limit: int = 4
    dispatch_interval: float = 2.0
    # --- Launch (issue 12, "launch"; hub/backups/router.py, engine/backup.py):
    # POST /backups brings a job's targets up and calls its node on threads of
    # its own, at most this many per API process at once, never on the
    # API's `api_threads`: reads do not queue behind launches.
    launch_threads: int = 8
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _resolve_api_threads(self) -> HubSettings:
        if self.api_threads <= 0:
            pg = self.database_url.startswith(("postgresql", "postgres"))
            self.api_threads = 16 if pg else 4
        return self

    @property
    def catalog_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir.resolve() / 'catalog.db'}"

    @property
    def master_key_path(self) -> Path:
        return self.master_key_file or self.data_dir.resolve() / "master.key"

    @property
    def advertise_host(self) -> str:
        return self.nbd_advertise_host or self.nbd_bind

    @property
    def restore_directories(self) -> list[Path]:
        """The directories whole-disk restores may write into."""
        given = [Path(p) for p in self.restore_dirs.split(":") if p.strip()]
        return given or [self.data_dir.resolve() / "restores"]


class NodeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SENDENSE_NODE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8081
    data_dir: Path = Path("var/node")
    # Requests in flight per disk at most (64: the NBD limit qemu answers
    # well); the read buffers in flight are bounded by window_bytes below
    # (issue 11), so a full's 4 MiB requests stay 8 at a time while an
    # incremental's 64 KiB ones can be 64: 2x faster across 10 ms RTT, the
    # same on loopback (docs/performance.md).
    in_flight: int = 64
    request_size: int = 4 << 20
    # Bandwidth limit of each job's data mover in bytes/s (0: unlimited).
    max_rate: int = 0
    # Disks of one VM copied at the same time (separate connections and movers).
    parallel_disks: int = 2
    # Digest algorithm of restore points (mover/digest.py): x3-64k or b3-64k.
    digest: str = "x3-64k"
    # Seconds an ended job's folder (<data_dir>/jobs/<id>: status, log) is
    # kept after its last change; 0 keeps them all.
    job_retention: float = 7 * 86400.0
    # --- Hub <-> node HTTPS (issue 10): serve HTTPS with the certificate made on
    # first start under <data_dir>/tls/ (the hub pins it); false serves plain
    # HTTP, for loopback and demos only (a hub refuses it beyond loopback).
    tls: bool = True
    # --- pull (issue 11, node/pull.py, docs/guide.md "Push or pull"): "push"
    # (the node dials the hub's NBD targets) or "pull" (the node serves each
    # frozen disk over NBD with TLS-PSK on a port of its own, the hub reads it
    # and writes the restore point itself; fulls only, incrementals stay push).
    # The hub learns it from GET /api/v1/health. Pull needs the hub to reach
    # pull_advertise_host:pull_port_first..last; a node that can only dial out
    # stays push. pull_bind "" = host (the API's, also when given as --host);
    # pull_advertise_host "" = pull_bind, or when that is 0.0.0.0/:: the host
    # the hub reached the node's API at (node/pull.py for_worker).
    # pull_wait: seconds the node serves a disk the hub never finishes reading;
    # pull_confirm_timeout: seconds it waits, after the hub closed its
    # connections, for the hub's "pulled" (else the job fails: a hub that died
    # mid-read must not make a restore point the node counts as done).
    transfer: Literal["push", "pull"] = "push"
    pull_bind: str = ""
    pull_advertise_host: str = ""
    pull_port_first: int = 10300
    pull_port_last: int = 10399
    pull_wait: float = 4 * 3600.0
    pull_confirm_timeout: float = 30.0
    # --- mover (issue 11, "mover"; mover/copy.py, node/worker.py): a copy
    # whose NBD connection (to the hub's target or to the VM's disk) drops is
    # connected again, with backoff, for up to reconnect_deadline seconds
    # (0: fail at once), and goes on from the last flushed position; the
    # target is flushed every flush_bytes or flush_seconds (the most a drop
    # costs in data copied again). window_bytes: read buffers in flight per
    # disk (in_flight stays the cap on requests); target_connections: NBD
    # connections per target when it advertises multi-conn (TLS decryption
    # of each runs on its own qemu-nbd thread). Measured: docs/performance.md.
    reconnect_deadline: float = 300.0
    flush_bytes: int = 256 << 20
    flush_seconds: float = 5.0
    window_bytes: int = 32 << 20
    target_connections: int = 1
    # A reconnecting copy gives up early (code target_lost / source_lost)
    # once the hub has not asked about its job for hub_silence seconds: the
    # hub gave the job up (node unreachable past its SENDENSE_NODE_TIMEOUT) and
    # stopped its targets, or this node's agent is gone and nobody can tell
    # the hub; the VM's frozen view is then released at once rather than at
    # the reconnect deadline. 0: only the deadline counts.
    hub_silence: float = 60.0
    log_level: str = "INFO"
