"""Helpers for the tests of services.local: is a PID gone, which sockets does a process listen on."""

from __future__ import annotations

import os
import time
from pathlib import Path

from services.local.processes import pid_alive


def wait_gone(pid: int, seconds: float = 10.0) -> None:
    """Assert `pid` is gone: os.kill(pid, 0) raises (or, if init has not reaped it yet, it is a zombie)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    assert not pid_alive(pid), f"pid {pid} still runs"


def listening_sockets(pids: set[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state that one of `pids` holds (from /proc/net/tcp*)."""
    inodes: set[str] = set()
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        try:
            links = [os.readlink(fd_dir / fd) for fd in os.listdir(fd_dir)]
        except OSError:
            continue
        inodes.update(link[8:-1] for link in links if link.startswith("socket:["))
    found: set[tuple[str, int]] = set()
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A = LISTEN
                continue
            addr_hex, port_hex = fields[1].split(":")
            found.add((_address(addr_hex, v6), int(port_hex, 16)))
    return found


def _address(hex_addr: str, v6: bool) -> str:
    if not v6:
        return ".".join(str(b) for b in reversed(bytes.fromhex(hex_addr)))
    raw = b"".join(bytes.fromhex(hex_addr[i : i + 8])[::-1] for i in range(0, 32, 8))
    if raw[:12] == b"\0" * 10 + b"\xff\xff":
        return ".".join(str(b) for b in raw[12:])
    import ipaddress

    return str(ipaddress.IPv6Address(raw))
