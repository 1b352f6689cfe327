"""deploy/docker/fleet_wait.py: the bounded waits of the Kubernetes initContainers (loopback only)."""

from __future__ import annotations

import importlib.util
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[3] / "deploy" / "docker" / "fleet_wait.py"


def load():
    spec = importlib.util.spec_from_file_location("fleet_wait", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fleet_wait = load()


@pytest.fixture
def http_server() -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/ok" else 503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tcp_ready_when_something_listens():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert fleet_wait.main(["tcp", f"127.0.0.1:{port}", "--timeout", "5"]) == 0


def test_tcp_gives_up_after_the_timeout(capsys):
    port = free_port()
    t0 = time.monotonic()
    assert fleet_wait.main(["tcp", f"127.0.0.1:{port}", "--timeout", "0.6", "--interval", "0.2"]) == 1
    assert time.monotonic() - t0 < 5
    assert "gave up after" in capsys.readouterr().err


def test_tcp_waits_for_a_late_listener():
    port = free_port()
    listener = socket.socket()

    def late() -> None:
        time.sleep(0.5)
        listener.bind(("127.0.0.1", port))
        listener.listen()

    threading.Thread(target=late, daemon=True).start()
    try:
        assert fleet_wait.main(["tcp", f"127.0.0.1:{port}", "--timeout", "10", "--interval", "0.1"]) == 0
    finally:
        listener.close()


def test_http_needs_a_2xx(http_server):
    assert fleet_wait.main(["http", f"{http_server}/ok", "--timeout", "5"]) == 0
    assert fleet_wait.main(["http", f"{http_server}/not-ready", "--timeout", "0.3", "--interval", "0.1"]) == 1


@pytest.mark.parametrize(
    "argv", [["tcp", "no-port"], ["tcp"], ["http"], ["dns", "x"], ["tcp", "h:1", "--timeout", "x"]]
)
def test_a_wrong_command_line_exits(argv):
    with pytest.raises(SystemExit):
        fleet_wait.main(argv)
