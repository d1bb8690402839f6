"""A managed ``nbdkit`` process serving one disk read-only on a unix socket.

`NbdkitServer` is configured, then `start()`ed; start returns once a full NBD
handshake succeeds, and `stop()` always leaves no process behind (SIGTERM,
then SIGKILL). ``--exit-with-parent`` also ends it if the worker dies.
Secrets never go on its command line (visible in /proc to every user): the
caller passes them as ``key=+FILE`` parameters (nbdkit(1), "Reading
passwords and secrets"), files it keeps mode 0600 and removes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from pathlib import Path

import nbd

from sendense.core.errors import DiskReadFailed

log = logging.getLogger(__name__)


class NbdkitServer:
    def __init__(
        self,
        plugin: str,
        params: list[tuple[str, str]],
        *,
        socket_path: str,
        filters: list[str] | None = None,
        log_path: str | None = None,
    ) -> None:
        self.plugin = plugin
        self.params = params
        self.filters = filters or []
        self.socket_path = socket_path
        self.log_path = log_path
        self.pid: int | None = None
        self._returncode: int | None = None

    @property
    def url(self) -> str:
        return f"nbd+unix:///?socket={self.socket_path}"

    def argv(self) -> list[str]:
        args = [
            "nbdkit",
            "--foreground",
            "--readonly",
            "--exit-with-parent",
            "--unix",
            self.socket_path,
        ]
        args += [f"--filter={f}" for f in self.filters]
        args.append(self.plugin)
        args += [f"{k}={v}" for k, v in self.params]
        return args

    def start(self, *, timeout: float = 30.0) -> None:
        argv = self.argv()
        log.debug("start argv=%s", argv)
        out = self.log_path or os.devnull
        # posix_spawn, not Popen: the node's worker blocks SIGTERM and SIGINT
        # in all its threads (it takes them with sigwait), and a child inherits
        # that mask through exec. nbdkit would then ignore the SIGTERM that
        # stops it and the one --exit-with-parent sends (PR_SET_PDEATHSIG), so
        # it starts with an empty mask; SIGPIPE back to its default as well.
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
            (os.POSIX_SPAWN_OPEN, 2, out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600),
        ]
        try:
            self.pid = os.posix_spawnp(
                "nbdkit",
                argv,
                os.environ,
                file_actions=actions,
                setsigmask=(),
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
            )
        except FileNotFoundError as e:
            raise DiskReadFailed("nbdkit not found (install nbdkit)") from e
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def poll(self) -> int | None:
        """The exit status once the process has ended (and is reaped), else None."""
        if self.pid is None:
            return self._returncode
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            return None
        self.pid = None
        self._returncode = os.waitstatus_to_exitcode(status)
        return self._returncode

    def _detail(self) -> str:
        if self.log_path and os.path.exists(self.log_path):
            return Path(self.log_path).read_text(errors="replace")[-1000:].strip()
        return ""

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            rc = self.poll()
            if rc is not None:
                raise DiskReadFailed(
                    f"nbdkit {self.plugin} exited with code {rc} before serving: {self._detail()}"
                )
            if self._accepts():
                return
            if time.monotonic() > deadline:
                raise DiskReadFailed(f"nbdkit {self.plugin} did not start serving in {timeout}s")
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _accepts(self) -> bool:
        if not os.path.exists(self.socket_path):
            return False
        h = nbd.NBD()
        try:
            h.set_opt_mode(True)
            h.connect_uri(self.url)
            h.opt_abort()
            return True
        except nbd.Error:
            return False

    def stop(self, *, timeout: float = 10.0) -> None:
        if self.pid is not None and self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.poll() is None:
                if time.monotonic() > deadline:
                    log.warning("nbdkit pid=%s ignored SIGTERM: killed", self.pid)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid, signal.SIGKILL)
                    os.waitpid(self.pid, 0)
                    self.pid = None
                    break
                time.sleep(0.01)
        with contextlib.suppress(OSError):
            os.unlink(self.socket_path)
