"""The generic process layer with real child processes: readiness, failures with log tails, stopping whole trees."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from infra_helpers import wait_gone

from services.local.infra import nats_server_binary
from services.local.processes import (
    Component,
    ManagedProcess,
    ProcessGroup,
    ProcessStartError,
    free_port,
    free_port_in,
    http_ok,
    pid_alive,
    port_is_free,
    process_identity,
    process_tree,
    same_process,
    stop_from_state,
    wait_exec,
)

pytestmark = pytest.mark.integration


def test_free_port_never_hands_out_the_same_port_twice() -> None:
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert all(port_is_free(p) for p in ports[:20])
    low = [free_port_in(20000, 32768) for _ in range(50)]
    assert len(set(low)) == 50
    assert all(20000 <= p < 32768 for p in low)
    assert not set(low) & set(ports)


def test_process_exiting_at_start_raises_with_exit_code_and_log_tail(tmp_path: Path) -> None:
    missing = tmp_path / "missing.conf"
    proc = ManagedProcess("bad-nats", [nats_server_binary(), "-c", str(missing)], log_dir=tmp_path)
    proc.start()
    with pytest.raises(ProcessStartError) as info:
        proc.wait_ready(lambda: False, timeout=10)
    err = info.value
    assert err.name == "bad-nats"
    assert err.returncode not in (None, 0)
    assert "bad-nats" in str(err)
    assert f"exit code {err.returncode}" in str(err)
    assert "missing.conf" in err.log_tail and "no such file" in err.log_tail  # nats-server's words, from the log
    assert err.log_tail in str(err)
    assert (tmp_path / "bad-nats.log").exists()
    wait_gone(proc.pid)  # type: ignore[arg-type]


def test_child_dies_with_its_parent_unless_told_otherwise(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from services.local.processes import ManagedProcess\n"
        "for name, die in (('bound', True), ('free', False)):\n"
        "    p = ManagedProcess(name, ['sleep', '60'], log_dir=sys.argv[1], die_with_parent=die).start()\n"
        "    print(p.pid, flush=True)\n"
        "sys.stdin.read()\n"
    )
    root = Path(__file__).resolve().parents[3]
    parent = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert parent.stdout is not None
    bound, free = int(parent.stdout.readline()), int(parent.stdout.readline())
    try:
        assert pid_alive(bound) and pid_alive(free)
        assert psutil.Process(bound).cmdline() == ["sleep", "60"]  # setpriv exec'd the real program in place
        parent.kill()
        parent.wait()
        wait_gone(bound)  # got SIGTERM when its parent died
        assert pid_alive(free)  # an orphan, as asked
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(free, signal.SIGKILL)
    wait_gone(free)


def test_missing_executable_raises_process_start_error(tmp_path: Path) -> None:
    with pytest.raises(ProcessStartError, match="cannot execute"):
        ManagedProcess("ghost", [str(tmp_path / "no-such-binary")], log_dir=tmp_path).start()


def test_log_tail_is_limited_to_this_run_and_40_lines(tmp_path: Path) -> None:
    (tmp_path / "chatty.log").write_text("an older run\n")
    script = "for i in $(seq 1 100); do echo line $i; done; exit 3"
    proc = ManagedProcess("chatty", ["sh", "-c", script], log_dir=tmp_path).start()
    with pytest.raises(ProcessStartError) as info:
        proc.wait_ready(lambda: False, timeout=10)
    lines = info.value.log_tail.splitlines()
    assert len(lines) == 40
    assert lines[-1] == "line 100"
    assert info.value.returncode == 3
    assert "an older run" in (tmp_path / "chatty.log").read_text()  # appended, not truncated


def test_not_ready_in_time_stops_the_process_and_says_why(tmp_path: Path) -> None:
    proc = ManagedProcess("sleepy", ["sleep", "60"], log_dir=tmp_path).start()

    def check() -> bool:
        raise ConnectionRefusedError("nobody home")

    t0 = time.monotonic()
    with pytest.raises(ProcessStartError, match=r"not ready after 0\.3s.*nobody home"):
        proc.wait_ready(check, timeout=0.3)
    assert time.monotonic() - t0 < 5
    assert not proc.alive()
    wait_gone(proc.pid)  # type: ignore[arg-type]


def test_stop_reaches_the_whole_tree_even_children_that_left_the_group(tmp_path: Path) -> None:
    script = "sleep 60 & sleep 60 & setsid sleep 60 & wait"
    proc = ManagedProcess("tree", ["sh", "-c", script], log_dir=tmp_path).start()

    def started() -> bool:  # all three children forked, and the setsid one already in a group of its own
        members = process_tree(proc.pid)  # type: ignore[arg-type]
        return len(members) >= 3 and any(os.getpgid(p) != proc.pid for p in members)

    proc.wait_ready(started, timeout=10)
    members = process_tree(proc.pid)  # type: ignore[arg-type]
    assert any(os.getpgid(p) != proc.pid for p in members)  # the setsid one is in a group of its own
    proc.stop(timeout=5)
    for pid in [proc.pid, *members]:
        wait_gone(pid)  # type: ignore[arg-type]
    assert proc.stop() == proc.returncode  # idempotent


def test_stop_escalates_to_sigkill_when_sigterm_is_ignored(tmp_path: Path) -> None:
    proc = ManagedProcess("stubborn", ["sh", "-c", "trap '' TERM; sleep 60 & wait; sleep 60"], log_dir=tmp_path)
    proc.start()
    proc.wait_ready(lambda: len(process_tree(proc.pid)) >= 1, timeout=10)  # type: ignore[arg-type]
    members = process_tree(proc.pid)  # type: ignore[arg-type]
    t0 = time.monotonic()
    assert proc.stop(timeout=0.5) == -signal.SIGKILL
    assert time.monotonic() - t0 < 5
    for pid in [proc.pid, *members]:
        wait_gone(pid)  # type: ignore[arg-type]


def test_http_check_waits_for_a_real_server_and_stop_frees_its_ports(tmp_path: Path) -> None:
    port, monitor = free_port(), free_port()
    argv = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(tmp_path), "-m", str(monitor)]
    proc = ManagedProcess("nats", argv, log_dir=tmp_path).start()
    try:
        assert proc.wait_ready(http_ok(f"http://127.0.0.1:{monitor}/healthz?js-enabled-only=true"), timeout=10) < 10
    finally:
        proc.stop()
    assert port_is_free(port) and port_is_free(monitor)


def test_group_stops_in_reverse_order_on_error_and_writes_state(tmp_path: Path) -> None:
    stopped: list[str] = []
    state = tmp_path / "group.json"
    with pytest.raises(RuntimeError, match="boom"), ProcessGroup(state) as group:
        for name in ("first", "second", "third"):
            proc = ManagedProcess(name, ["sleep", "60"], log_dir=tmp_path, after_stop=lambda n=name: stopped.append(n))
            group.start(proc, lambda: True, address=f"{name}://here")
        data = json.loads(state.read_text())
        assert list(data) == ["first", "second", "third"]
        assert {d["state"] for d in data.values()} == {"ready"}
        assert data["second"]["pid"] == group["second"].pid
        assert data["second"]["log"] == str(tmp_path / "second.log")
        assert data["second"]["owner"]["pid"] == os.getpid()
        pids = [c.pid for c in group.components]
        raise RuntimeError("boom")
    assert stopped == ["third", "second", "first"]
    assert not state.exists()
    assert all(c.state == "stopped" for c in group.components)
    for pid in pids:
        wait_gone(pid)  # type: ignore[arg-type]


def test_closed_group_refuses_and_stops_new_members(tmp_path: Path) -> None:
    group = ProcessGroup()
    group.close()
    proc = ManagedProcess("late", ["sleep", "60"], log_dir=tmp_path)
    with pytest.raises(RuntimeError, match="closed"):
        group.start(proc, lambda: True, address="late://")
    assert not proc.alive()


def test_group_signal_handler_stops_everything_then_chains(tmp_path: Path) -> None:
    seen: list[int] = []

    def mine(signum: int, frame: object) -> None:
        seen.append(signum)

    previous = signal.signal(signal.SIGUSR1, mine)
    try:
        group = ProcessGroup()
        comp = group.start(ManagedProcess("victim", ["sleep", "60"], log_dir=tmp_path), lambda: True, address="x://")
        group.install_signal_handlers([signal.SIGUSR1])
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen == [signal.SIGUSR1]  # the previous handler ran after the group stopped
        assert comp.state == "stopped"
        wait_gone(comp.pid)  # type: ignore[arg-type]
        assert signal.getsignal(signal.SIGUSR1) is mine  # the group's handler is gone again
    finally:
        signal.signal(signal.SIGUSR1, previous)


def _proc_start_tick(pid: int) -> int:
    """/proc's start time of `pid` (clock ticks since boot): what state files recorded before psutil."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def test_stop_from_state_leaves_a_recycled_pid_alone(tmp_path: Path) -> None:
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        assert wait_exec(bystander.pid, ["sleep", "60"])
        state = tmp_path / "state.json"
        identity = process_identity(bystander.pid)
        start, tick = identity["start_time"], _proc_start_tick(bystander.pid)
        assert identity["cmdline"] == ["sleep", "60"] and isinstance(start, float)
        assert same_process(bystander.pid, start, ["sleep", "60"])
        assert same_process(bystander.pid, tick, ["sleep", "60"])  # an older state file's /proc ticks still match
        state.write_text(
            json.dumps(
                {
                    "old-server": {"pid": bystander.pid, "start_time": start - 10, "cmdline": ["sleep", "60"]},
                    "old-file": {"pid": bystander.pid, "start_time": tick - 1000, "cmdline": ["sleep", "60"]},
                    "other-command": {"pid": bystander.pid, "start_time": start, "cmdline": ["valkey-server"]},
                }
            )
        )
        outcome = stop_from_state(state, timeout=1)
        assert all("left alone" in v for v in outcome.values()), outcome
        assert bystander.poll() is None
        assert same_process(bystander.pid, start, ["sleep", "60"])
    finally:
        bystander.kill()
        bystander.wait()
    assert not pid_alive(bystander.pid)
    assert not same_process(bystander.pid, start, ["sleep", "60"])


def test_component_record_for_a_table() -> None:
    c = Component("nats", "nats://127.0.0.1:1", pid=None)
    assert (c.name, c.address, c.state) == ("nats", "nats://127.0.0.1:1", "starting")
    c.stop()
    assert c.state == "stopped"
    assert sys.platform.startswith("linux")
