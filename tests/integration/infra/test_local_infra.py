"""LocalInfra and the start_* functions against the real servers, used through the real clients."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import nats
import pytest
import valkey.asyncio as avalkey
from infra_helpers import listening_sockets, wait_gone
from neo4j import AsyncGraphDatabase

from services.common.falkordb import unstick_falkordb_bolt
from services.local import infra as infra_module
from services.local.infra import LocalInfra, start_nats, start_ray_head, stop_infra
from services.local.processes import (
    ProcessStartError,
    free_port,
    pid_alive,
    port_is_free,
    process_tree,
    read_state,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]


async def test_local_infra_serves_real_clients_and_leaves_nothing_behind(tmp_path: Path) -> None:
    async with LocalInfra(tmp_path) as infra:
        components = infra.components
        assert [c.name for c in components] == ["nats", "valkey", "falkordb"]
        for c in components:
            assert c.state == "ready" and c.pid and c.started_in is not None
            assert c.log_path == tmp_path / "logs" / f"{c.name}.log" and c.log_path.is_file()
            assert (tmp_path / "data" / c.name).is_dir()
        env = infra.env()
        assert env == {
            "NATS_URL": infra.nats_url,
            "VALKEY_URL": infra.valkey_url,
            "NEO4J_URI": infra.bolt_uri,
            "NEO4J_USER": "falkordb",
            "NEO4J_PASSWORD": "",
        }
        assert infra.nats_url.startswith("nats://127.0.0.1:")
        assert infra.valkey_url.startswith("redis://127.0.0.1:") and infra.valkey_url.endswith("/0")
        assert infra.bolt_uri.startswith("bolt://127.0.0.1:")
        assert infra.falkordb_url.startswith("redis://127.0.0.1:")

        nc = await nats.connect(infra.nats_url)
        js = nc.jetstream()
        info = await js.account_info()
        assert info.limits is not None
        await js.add_stream(name="INFRA", subjects=["infra.>"])
        ack = await js.publish("infra.test", b"hello")
        assert (ack.stream, ack.seq) == ("INFRA", 1)
        await nc.close()

        kv = avalkey.from_url(infra.valkey_url)
        await kv.set("greeting", "hello")
        assert await kv.get("greeting") == b"hello"
        await kv.aclose()

        graphs = avalkey.from_url(infra.falkordb_url, socket_timeout=5)
        await graphs.ping()  # connected now: a driver's close() would make FalkorDB drop the next new connection
        auth = (env["NEO4J_USER"], env["NEO4J_PASSWORD"])
        async with AsyncGraphDatabase.driver(infra.bolt_uri, auth=auth, connection_timeout=5) as driver:
            records, _, _ = await driver.execute_query("RETURN 1 AS one")
            assert records[0]["one"] == 1
            # NB: FalkorDB 4.16 ignores database_ in transactions (all land in the graph "falkordb"), so the ids
            # are what keeps this apart from other data, not the graph name.
            await driver.execute_query(
                "CREATE (:Story {id: $s})-[:HAS_PLAN]->(:Plan {id: $p})", s="s-infra", p="p-1", database_="infra_test"
            )
            records, _, _ = await driver.execute_query(
                "MATCH (s:Story {id: $s})-[:HAS_PLAN]->(p:Plan) RETURN p.id AS plan",
                s="s-infra",
                database_="infra_test",
            )
            assert [r["plan"] for r in records] == ["p-1"]
        result = await graphs.execute_command(
            "GRAPH.QUERY", "falkordb", "MATCH (s:Story {id: 's-infra'}) RETURN count(s)"
        )
        assert result[1] == [[1]]  # the same data, seen over the redis protocol
        await graphs.aclose()

        for c in components:  # loopback only, except the Bolt listener FalkorDB always opens on every interface
            sockets = listening_sockets({c.pid})  # type: ignore[arg-type]
            assert {port for _, port in sockets} == set(c.ports.values()) - {0}, (c.name, sockets)
            exposed = {s for s in sockets if s[0] != "127.0.0.1"}
            assert exposed == ({("::", c.ports["bolt"])} if c.name == "falkordb" else set()), (c.name, exposed)

        state = read_state(infra.state_file)
        assert {name: entry["pid"] for name, entry in state.items()} == {c.name: c.pid for c in components}
        assert state["nats"]["address"] == infra.nats_url
        pids = [c.pid for c in components]
        ports = [p for c in components for p in c.ports.values()]

    assert all(c.state == "stopped" for c in components)
    for pid in pids:
        wait_gone(pid)  # type: ignore[arg-type]
    assert all(port_is_free(p) for p in ports)
    assert not infra.state_file.exists()


def test_nats_sync_always_is_configured(tmp_path: Path) -> None:
    for sync_always in (False, True):
        c = start_nats(tmp_path / f"data-{sync_always}", tmp_path / "logs", sync_always=sync_always)
        try:
            config = httpx.get(f"{c.urls['monitor']}/varz").json()["jetstream"]["config"]
            assert config.get("sync_always", False) is sync_always
            assert config["store_dir"].startswith(str(tmp_path / f"data-{sync_always}"))
        finally:
            c.stop()
        assert c.state == "stopped"


def test_port_already_taken_fails_with_the_servers_words(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ProcessStartError) as info:
            start_nats(tmp_path / "data", tmp_path / "logs", port=port, monitor_port=free_port())
    assert info.value.name == "nats"
    assert "address already in use" in str(info.value)
    assert info.value.returncode not in (None, 0)


def test_falkordb_refuses_a_bolt_port_it_would_silently_ignore(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="32767"):
        infra_module.start_falkordb(tmp_path, tmp_path, bolt_port=40000)


def test_one_failing_component_stops_the_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server, _ = infra_module.falkordb_binaries()
    monkeypatch.setattr(infra_module, "falkordb_binaries", lambda: (server, str(tmp_path / "missing.so")))
    local = LocalInfra(tmp_path / "infra")
    with pytest.raises(ProcessStartError) as info:
        local.start()
    assert info.value.name == "falkordb"
    assert "missing.so" in info.value.log_tail
    started = local.group.components
    assert {c.name for c in started} == {"nats", "valkey", "falkordb"}
    for c in started:
        assert c.state in ("stopped", "failed")
        wait_gone(c.pid)  # type: ignore[arg-type]
    assert not local.state_file.exists()


def test_a_base_dir_in_use_is_refused(tmp_path: Path) -> None:
    with LocalInfra(tmp_path, components=("nats",)) as first:
        with pytest.raises(RuntimeError, match="in use"):
            LocalInfra(tmp_path, components=("valkey",)).start()
        assert first["nats"].alive()
    with pytest.raises(ValueError, match="unknown components"):
        LocalInfra(tmp_path, components=("postgres",))
    with LocalInfra(tmp_path, components=("valkey",)) as second, pytest.raises(KeyError, match="nats"):
        _ = second.nats_url


OWNER = textwrap.dedent(
    """
    import sys, threading
    from services.local.infra import LocalInfra

    mode, die_with_parent = sys.argv[2], sys.argv[3] == "1"
    LocalInfra(sys.argv[1], install_signal_handlers=mode == "graceful", die_with_parent=die_with_parent).start()
    print("READY", flush=True)
    threading.Event().wait()
    """
)


@pytest.mark.parametrize(
    ("owner", "die_with_parent", "outcomes"),
    [
        ("graceful", True, {"not running"}),  # the owner's SIGTERM handler stops its own group
        ("dies-on-sigterm", False, {"stopped"}),  # the owner just dies: stop_infra stops the servers
        ("dies-on-sigterm", True, {"stopped", "not running"}),  # ... or they already got their parent-death signal
        ("killed-before", False, {"stopped"}),  # orphans, still running: stop_infra finds and stops them
        ("killed-before", True, {"not running"}),  # SIGKILLed owner: the servers stopped by themselves
    ],
    ids=["graceful", "owner-dies", "owner-dies-servers-too", "owner-killed-orphans", "owner-killed-servers-follow"],
)
def test_stop_infra_stops_a_group_started_by_another_process(
    tmp_path: Path, owner: str, die_with_parent: bool, outcomes: set[str]
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(tmp_path), owner, "1" if die_with_parent else "0"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "READY"
        state = json.loads((tmp_path / "state.json").read_text())
        assert set(state) == {"nats", "valkey", "falkordb"}
        servers = {name: entry["pid"] for name, entry in state.items()}
        assert all(entry["owner"]["pid"] == proc.pid for entry in state.values())
        if owner == "killed-before":
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            if die_with_parent:
                for pid in servers.values():
                    wait_gone(pid)
            else:
                time.sleep(0.2)
                assert all(pid_alive(pid) for pid in servers.values())  # orphans

        t0 = time.monotonic()
        outcome = stop_infra(tmp_path)
        assert time.monotonic() - t0 < 8
        assert set(outcome) == set(servers)
        assert set(outcome.values()) <= outcomes, outcome
        assert proc.wait(10) in (-signal.SIGTERM, -signal.SIGKILL)
        for pid in servers.values():
            wait_gone(pid)
        assert not (tmp_path / "state.json").exists()
        ports = [p for entry in state.values() for p in entry["ports"].values()]
        assert all(port_is_free(p) for p in ports)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.ray
def test_ray_head_starts_and_stops_by_pid(tmp_path: Path) -> None:
    t0 = time.monotonic()
    c = start_ray_head(tmp_path / "data", tmp_path / "logs", num_cpus=1)
    started = time.monotonic() - t0
    temp_dirs = [Path(a.split("=", 1)[1]) for a in c.process.argv if a.startswith("--temp-dir=")]  # type: ignore[union-attr]
    try:
        assert c.address == f"127.0.0.1:{c.ports['gcs']}"
        code = textwrap.dedent(
            f"""
            import ray
            ray.init(address={c.address!r}, logging_level="ERROR", log_to_driver=False)

            @ray.remote
            def square(x):
                return x * x

            print(sum(ray.get([square.remote(i) for i in range(10)])))
            ray.shutdown()
            """
        )
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, **infra_module.RAY_ENV},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().splitlines()[-1] == "285"
        tree = {c.pid, *process_tree(c.pid)}  # type: ignore[arg-type]
        sockets = listening_sockets(tree)  # type: ignore[arg-type]
        assert ("127.0.0.1", c.ports["gcs"]) in sockets
        assert {s for s in sockets if s[0] != "127.0.0.1"} == set(), sockets
    finally:
        t1 = time.monotonic()
        c.stop()
        stopped = time.monotonic() - t1
    for pid in tree:
        wait_gone(pid)
    assert port_is_free(c.ports["gcs"])
    assert stopped < 15, stopped
    assert started < 90, started
    if temp_dirs and str(temp_dirs[0]).startswith("/tmp/ray-"):
        assert not temp_dirs[0].exists()


async def test_falkordb_serves_new_connections_after_drivers_close(tmp_path: Path) -> None:
    """FalkorDB 4.16 drops the next connection it accepts after each Bolt GOODBYE (sent by a driver's close()):
    the readiness check sends none, and `unstick_falkordb_bolt` absorbs those a client's close() left."""
    c = infra_module.start_falkordb(tmp_path / "data", tmp_path / "logs")
    try:

        def new_connection_pings() -> bool:
            with socket.create_connection(("127.0.0.1", c.ports["redis"]), timeout=2) as s:
                s.sendall(b"*1\r\n$4\r\nPING\r\n")
                return s.recv(16).startswith(b"+PONG")

        assert new_connection_pings()  # right after start: nothing left behind by the readiness check
        for round_ in range(3):
            async with AsyncGraphDatabase.driver(c.urls["bolt"], auth=("falkordb", ""), connection_timeout=5) as driver:
                await driver.execute_query("CREATE (:Probe {round: $r})", r=round_)
                records, _, _ = await driver.execute_query("MATCH (p:Probe {round: $r}) RETURN count(p) AS n", r=round_)
                assert records[0]["n"] == 1
            await asyncio.to_thread(unstick_falkordb_bolt, c.urls["bolt"])
            assert await asyncio.to_thread(new_connection_pings)
            assert await asyncio.to_thread(new_connection_pings)
    finally:
        c.stop()


def test_fleet_infra_down_stops_a_backgrounded_infra_up(tmp_path: Path) -> None:
    fleet = str(Path(sys.executable).with_name("fleet"))
    up = subprocess.Popen(
        [fleet, "infra", "up", "--base-dir", str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert up.stdout is not None
        for line in up.stdout:
            if "Ctrl-C stops everything" in line:
                break
        else:
            pytest.fail(f"`fleet infra up` ended early with {up.wait()}")
        servers = {name: entry["pid"] for name, entry in read_state(tmp_path / "state.json").items()}
        assert set(servers) == {"nats", "valkey", "falkordb"}
        down = subprocess.run(
            [fleet, "infra", "down", "--base-dir", str(tmp_path)], capture_output=True, text=True, timeout=60
        )
        assert down.returncode == 0, down.stderr
        assert all(f"{name}: " in down.stdout for name in servers), down.stdout
        assert up.wait(15) == 0  # the owner got SIGTERM and shut down cleanly
        for pid in servers.values():
            wait_gone(pid)
        again = subprocess.run([fleet, "infra", "down", "--base-dir", str(tmp_path)], capture_output=True, text=True)
        assert again.returncode == 0 and "nothing to stop" in again.stdout
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
