"""qemu-img / qemu-nbd / QMP wrappers against the real programs."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import nbd
import pytest

from fixtures.cluster import port_range
from sendense.core.errors import QemuImgError, QemuNbdError, QmpError
from sendense.qemu import img
from sendense.qemu.nbd_server import QemuNbdServer, stop_pid
from sendense.qemu.qmp import MAX_MESSAGE, QmpClient


def test_create_with_relative_backing_and_info(tmp_path: Path) -> None:
    base = tmp_path / "a" / "base.qcow2"
    base.parent.mkdir()
    img.create(str(base), 1 << 20, cluster_size=65536)
    top = tmp_path / "a" / "top.qcow2"
    img.create(str(top), None, backing="base.qcow2")
    info = img.info(str(top))
    assert info["backing-filename"] == "base.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    assert info["virtual-size"] == 1 << 20
    assert img.info(str(base))["cluster-size"] == 65536
    assert img.check(str(top))["check-errors"] == 0
    assert img.compare(str(top), str(base))


def test_errors_carry_command_and_stderr(tmp_path: Path) -> None:
    with pytest.raises(QemuImgError) as e:
        img.info(str(tmp_path / "missing.qcow2"))
    assert e.value.rc == 1
    assert "missing.qcow2" in e.value.message


@pytest.mark.parametrize("transport", ["unix", "tcp"])
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_qemu_nbd_server_serves_and_always_stops(tmp_path: Path, transport: str, fmt: str) -> None:
    image = tmp_path / f"disk.{fmt}"
    img.create(str(image), 4 << 20, fmt=fmt)
    kwargs: dict = (
        {"socket_path": str(tmp_path / "s.sock")}
        if transport == "unix"
        else {"port": port_range(1)[0]}
    )
    server = QemuNbdServer(
        str(image), fmt=fmt, export_name="e", pidfile=str(tmp_path / "p"), **kwargs
    )
    with server:
        pid = server.pid
        assert (tmp_path / "p").exists()
        h = nbd.NBD()
        h.connect_uri(server.url)
        data = os.urandom(65536)
        h.pwrite(data, 65536)
        h.flush()
        assert h.pread(65536, 65536) == data
        h.shutdown()
    assert pid is not None and not Path(f"/proc/{pid}").exists()
    assert not (tmp_path / "p").exists()
    # stop_pid never touches a pid that is not a qemu-nbd
    assert stop_pid(os.getpid()) is False


def test_qemu_nbd_failure_is_reported(tmp_path: Path) -> None:
    server = QemuNbdServer(
        str(tmp_path / "nope.qcow2"),
        socket_path=str(tmp_path / "s.sock"),
        log_path=str(tmp_path / "log"),
    )
    with pytest.raises(QemuNbdError, match="exited"):
        server.start()
    assert server.proc is None


def test_qmp_client(make_vm) -> None:
    vm = make_vm("q", [1 << 20], start=True)
    with QmpClient(vm.qmp_socket) as qmp:
        names = [n["node-name"] for n in qmp.execute("query-named-block-nodes", flat=True)]
        assert "disk0" in names
        assert qmp.peer_pid() == vm.pid
        with pytest.raises(QmpError, match="no-such-command"):
            qmp.execute("no-such-command")


def test_qmp_unreachable_socket(tmp_path: Path) -> None:
    with pytest.raises(QmpError, match="cannot connect"):
        QmpClient(str(tmp_path / "none.qmp")).connect()


def qmp_peer(path: Path, payload: bytes, *, repeat: int = 1) -> tuple[threading.Thread, list[int]]:
    """A unix socket whose peer sends ``payload`` ``repeat`` times, or until
    the client hangs up; ``sent[0]`` counts the bytes that went out."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    sent = [0]

    def serve() -> None:
        with server:
            conn, _ = server.accept()
            with conn:
                try:
                    for _ in range(repeat):
                        conn.sendall(payload)
                        sent[0] += len(payload)
                except OSError:
                    pass  # the client hung up

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread, sent


def test_qmp_refuses_a_message_without_end_of_line(tmp_path: Path) -> None:
    """A peer that streams without a newline cannot grow the client's buffer
    past MAX_MESSAGE (plus one read): the client gives up and hangs up."""
    path = tmp_path / "flood.qmp"
    thread, sent = qmp_peer(path, b"x" * 65536, repeat=(3 * MAX_MESSAGE) // 65536)
    client = QmpClient(str(path), timeout=10)
    with pytest.raises(QmpError, match=f"exceeded {MAX_MESSAGE} bytes"):
        client.connect()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert sent[0] < 2 * MAX_MESSAGE  # it stopped reading: the rest never went out
    assert client._sock is None and not client._buf  # closed, buffer freed


def test_qmp_garbage_is_a_qmp_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.qmp"
    thread, _ = qmp_peer(path, b"<html>not qmp</html>\n")
    with pytest.raises(QmpError, match="not a JSON message"):
        QmpClient(str(path), timeout=10).connect()
    thread.join(timeout=10)
