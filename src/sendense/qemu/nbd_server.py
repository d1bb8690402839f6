"""A managed ``qemu-nbd`` process.

`QemuNbdServer` is configured, then `start()`ed; start returns only when the
server accepts connections (socket file present or TCP port open), and
`stop()` always leaves no process behind (SIGTERM, then SIGKILL). qemu-nbd
closes the image cleanly on SIGTERM (it leaves its main loop and flushes),
which matters for a QCOW2 target that was just written.

TLS: given ``tls_psk_dir`` (a directory holding ``keys.psk``, made by
`sendense.nbd.psk.make_server_dir`), the server requires TLS with that
pre-shared key before any NBD option (qemu-nbd ``--tls-creds``: a client
without TLS gets no export, a client with another key fails the handshake),
and `url` is an ``nbds://`` URL. The readiness handshake uses the same key.
The key file must outlive the process (GnuTLS reads it at each handshake);
whoever made the directory removes it after `stop()`.

Use it as a context manager where the lifetime is lexical; the hub keeps
targets alive across requests and records the pid in a pidfile so that a
restarted hub can find and stop servers left by a crash.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import nbd

from sendense.core.errors import QemuNbdError
from sendense.nbd import psk
from sendense.qemu import img

log = logging.getLogger(__name__)

# glibc malloc settings for every qemu-nbd we start (GLIBC_TUNABLES, glibc
# 2.26+; older versions ignore the variable). qemu-nbd allocates a buffer for
# each NBD request (nbd/server.c, qemu_try_blockalign of the request's
# length: 4 MiB for the mover's full copy) and frees it when the request is
# answered. With glibc's defaults those buffers are mmap()ed and unmapped, or
# carved from the heap top that free() trims back below 128 KiB; either way
# every request of a full faulted in 1,024 fresh zeroed pages: page faults,
# clear_page and munmap were a third of a TLS target's CPU (perf). A static
# mmap threshold of 32 MiB (the largest NBD request) keeps the buffers on the
# heap, and a trim threshold of 64 MiB keeps the freed ones there for the
# next request. Measured A/B, alternating (1 GiB, 60 % data, TLS-PSK,
# cache=none/aio=native, 3 rounds, docs/performance.md "Target malloc"):
# target CPU 1.23 -> 0.70 CPU-s per GiB written, wall 2.16 -> 1.82 s; the
# target's peak RSS 41 -> 81 MiB (the freed buffers it keeps). Either
# setting alone saves nothing (the other one still returns the memory).
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=67108864"


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a qemu-nbd (or qemu-storage-daemon) we start: ours
    with `MALLOC_TUNABLES` added to any GLIBC_TUNABLES already set (those,
    coming last, win)."""
    env = dict(os.environ if base is None else base)
    given = env.get("GLIBC_TUNABLES")
    env["GLIBC_TUNABLES"] = f"{MALLOC_TUNABLES}:{given}" if given else MALLOC_TUNABLES
    return env


class QemuNbdServer:
    def __init__(
        self,
        image: str,
        *,
        fmt: str = "qcow2",
        export_name: str = "",
        socket_path: str | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        read_only: bool = False,
        shared: int = 8,
        cache: str = "writeback",
        aio: str | None = None,
        discard: bool = True,
        detect_zeroes: str | None = None,
        pidfile: str | None = None,
        log_path: str | None = None,
        key: img.ImageKey | None = None,
        tls_psk_dir: str | None = None,
        tls_username: str = psk.USERNAME,
        tune_malloc: bool = True,
    ) -> None:
        if socket_path is None and port is None:
            raise ValueError("either socket_path or port is needed")
        self.image = image
        self.fmt = fmt
        self.export_name = export_name
        self.socket_path = socket_path
        self.host = host
        self.port = port
        self.read_only = read_only
        self.shared = shared
        self.cache = cache
        self.aio = aio
        self.discard = discard
        self.detect_zeroes = detect_zeroes
        self.pidfile = pidfile
        self.log_path = log_path
        # TLS-PSK on the NBD connection (sendense/nbd/psk.py).
        self.tls_psk_dir = tls_psk_dir
        self.tls_username = tls_username
        # An encrypted QCOW2 chain (qemu/img.py): the passphrase goes by a
        # secret file that lives only until the server is up.
        self.key = key
        # MALLOC_TUNABLES in its environment (False: glibc's defaults, as a
        # benchmark's reference qemu-nbd runs).
        self.tune_malloc = tune_malloc
        self._secret: contextlib.ExitStack | None = None
        self._secret_path: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "nbds" if self.tls_psk_dir else "nbd"
        if self.socket_path:
            return f"{scheme}+unix:///{self.export_name}?socket={self.socket_path}"
        return f"{scheme}://{self.host}:{self.port}/{self.export_name}"

    @property
    def tls_psk_file(self) -> str | None:
        """The key file clients use (the server's own one), None without TLS."""
        return os.path.join(self.tls_psk_dir, psk.SERVER_FILE) if self.tls_psk_dir else None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def argv(self) -> list[str]:
        args = [
            "qemu-nbd",
            *self._image_format(),
            f"--export-name={self.export_name}",
            "--persistent",
            f"--shared={self.shared}",
            f"--cache={self.cache}",
        ]
        if self.aio:
            args.append(f"--aio={self.aio}")
        if self.discard and not self.read_only:
            args.append("--discard=unmap")
        if self.detect_zeroes and not self.read_only:
            args.append(f"--detect-zeroes={self.detect_zeroes}")
        if self.read_only:
            args.append("--read-only")
        if self.tls_psk_dir:
            args += ["--object", psk.qemu_object("tls0", self.tls_psk_dir), "--tls-creds=tls0"]
        if self.socket_path:
            args.append(f"--socket={self.socket_path}")
        # TCP: no --bind/--port; the listening socket comes by socket activation.
        if self.pidfile:
            args.append(f"--pid-file={self.pidfile}")
        args += self._image_args()
        return args

    def _image_format(self) -> list[str]:
        return [] if self.key else [f"--format={self.fmt}"]

    def _image_args(self) -> list[str]:
        if not self.key:
            return [self.image]
        if self._secret_path is None:
            raise QemuNbdError("the image's secret file is made by start()")
        return [*img.secret_args(self._secret_path), "--image-opts", img.image_spec(self.image)]

    def _listen(self) -> socket.socket:
        """The TCP listener, made here so that it has TCP_NODELAY.

        qemu-nbd 7.2 does not set TCP_NODELAY on the connections it accepts;
        accepted sockets inherit it from their listener. Without it, Nagle's
        algorithm holds back small replies and a copy of scattered 64 KiB
        blocks runs 2-4x slower (measured: docs/performance.md).
        """
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        lsock = socket.socket(family, socket.SOCK_STREAM)
        try:
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lsock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            lsock.bind((self.host, self.port))
            lsock.listen(16)
        except OSError as e:
            lsock.close()
            raise QemuNbdError(f"cannot listen on {self.host}:{self.port}: {e.strerror}") from e
        return lsock

    def start(self, *, timeout: float = 10.0) -> None:
        if self.key is not None:
            self._secret = contextlib.ExitStack()
            self._secret_path = self._secret.enter_context(img.secret_file(self.key))
        try:
            self._start(timeout)
        finally:
            # qemu-nbd read the secret when it started (or never will): gone.
            self._drop_secret()

    def _drop_secret(self) -> None:
        if self._secret is not None:
            self._secret.close()
            self._secret, self._secret_path = None, None

    def _start(self, timeout: float) -> None:
        argv = self.argv()
        lsock = None
        stdin: int = subprocess.DEVNULL
        if not self.socket_path:
            lsock = self._listen()
            # systemd socket activation (qemu-nbd(8)): the listener must be fd 3
            # and LISTEN_PID qemu-nbd's own pid, which sh keeps through exec.
            # The listener travels as stdin (sh redirects only fds 0-9).
            stdin = lsock.fileno()
            argv = [
                "sh",
                "-c",
                'exec 3<&0 </dev/null; LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"',
                "sh",
                *argv,
            ]
        log.debug("start argv=%s", argv)
        stderr = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            # A new session: a Ctrl-C in the hub's terminal must not kill targets
            # that the hub is still going to flush and check.
            self.proc = subprocess.Popen(
                argv,
                stdin=stdin,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env=server_env() if self.tune_malloc else None,
                start_new_session=True,
            )
        except FileNotFoundError as e:
            raise QemuNbdError("qemu-nbd not found (install qemu-utils)") from e
        finally:
            if self.log_path and hasattr(stderr, "close"):
                stderr.close()
            if lsock is not None:
                lsock.close()  # qemu-nbd has its own copy
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        delay = 0.002
        while True:
            rc = self.proc.poll()
            if rc is not None:
                detail = ""
                if self.log_path and os.path.exists(self.log_path):
                    detail = Path(self.log_path).read_text(errors="replace")[-1000:].strip()
                raise QemuNbdError(
                    f"qemu-nbd exited with code {rc} before serving {self.image}: {detail}"
                )
            if self._accepts():
                return
            if time.monotonic() > deadline:
                raise QemuNbdError(f"qemu-nbd did not start serving {self.image} in {timeout}s")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _accepts(self) -> bool:
        """True once a full NBD handshake succeeds: qemu-nbd may listen before
        it has opened the image, and then exit if opening fails."""
        if self.socket_path and not os.path.exists(self.socket_path):
            return False
        h = nbd.NBD()
        try:
            if self.tls_psk_file:
                psk.use_key_file(h, self.tls_psk_file, self.tls_username)
            h.set_opt_mode(True)
            h.connect_uri(self.url)
            h.opt_abort()
            return True
        except nbd.Error:
            return False

    def stop(self, *, timeout: float = 10.0) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("qemu-nbd pid=%s ignored SIGTERM, killing", proc.pid)
                proc.kill()
                proc.wait()
        self.proc = None
        if self.pidfile:
            Path(self.pidfile).unlink(missing_ok=True)

    def __enter__(self) -> QemuNbdServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def is_qemu_nbd(pid: int) -> bool:
    """True when ``pid`` is a live qemu-nbd process (not a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return (
        bool(cmdline)
        and os.path.basename(cmdline[0].decode(errors="replace")) == "qemu-nbd"
        and not _is_zombie(pid)
    )


def stop_pid(pid: int, *, expect: str = "qemu-nbd", timeout: float = 10.0) -> bool:
    """Stop a process we started earlier (found in a pidfile) if it is still ours.

    Checks /proc/<pid>/cmdline so that a recycled pid is never killed.
    Returns True when a process was stopped.
    """
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if not cmdline or os.path.basename(cmdline[0].decode(errors="replace")) != expect:
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
            return True
        time.sleep(0.02)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"
