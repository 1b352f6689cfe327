"""The decision graph through the official `neo4j` async driver: Neo4j in Kubernetes, FalkorDB's Bolt port locally.

Model (every node carries `story_id`; ids are unique per story):
  (:Story {id})-[:HAS_PLAN]->(:Plan)-[:HAS_TASK]->(:Task)-[:HAS_TASK]->(:Task)   subtasks hang off their parent
  (:Task)-[:DEPENDS_ON]->(:Task)
  (:Decision)-[:AFFECTS]->(:Task), (:Decision)-[:SUPERSEDES]->(:Decision), (:Plan)-[:SUPERSEDES]->(:Plan)
  (:Decision)-[:DECIDED_IN]->(:Deliberation)-[:SELECTED]->(:Proposal)             the winning proposal
Writes are MERGE-based, so replaying an event changes nothing. Only Cypher that both Neo4j 5 and FalkorDB run.

FalkorDB (the local stand-in) needs care. What and why is in `services/common/falkordb.py`, numbered; each place
here that depends on it names the point: parameters are inlined as literals for FalkorDB (1), writes are batched
(2), every query is auto-commit in write mode (3), `close()` sends no GOODBYE (4), reads pack rows into records (5).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Any

from neo4j import WRITE_ACCESS, AsyncDriver, AsyncGraphDatabase
from neo4j.exceptions import AuthError, DriverError, Neo4jError, ServiceUnavailable, SessionExpired

from services.common import falkordb
from services.common.errors import FleetError, Unavailable
from services.common.events import Role
from services.context.domain import (
    Decision,
    DecisionStatus,
    Deliberation,
    Plan,
    Proposal,
    Story,
    StorySnapshot,
    Task,
    TaskStatus,
    plan_chain,
    supersession,
    with_versions,
)

log = logging.getLogger("fleet.context.graph")


class Backend(StrEnum):
    NEO4J = "neo4j"
    FALKORDB = "falkordb"


class GraphError(FleetError):
    """The graph rejected a query (a bug here, or a server problem that is not connectivity)."""


# --- the store ------------------------------------------------------------------------------------------------


NODE_LABELS = ("Story", "Plan", "Task", "Decision", "Deliberation", "Proposal")
# Rounds of writing a supersession chain while replicas add to it at the same moment (see `_settled`).
SETTLE_ROUNDS = 8


_ROLES = {r.value: r for r in Role}
_TASK_STATUSES = {s.value: s for s in TaskStatus}
_DECISION_STATUSES = {s.value: s for s in DecisionStatus}


def _role(value: Any) -> Role | None:
    return _ROLES.get(value) if value else None


def _task_status(value: Any) -> TaskStatus:
    return _TASK_STATUSES.get(value, TaskStatus.PLANNED) if value else TaskStatus.PLANNED


def _decision_status(value: Any) -> DecisionStatus:
    if not value:
        return DecisionStatus.ACCEPTED
    return _DECISION_STATUSES.get(value, DecisionStatus.PROPOSED)


def _strs(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in value or () if v is not None)


class GraphStore:
    """Reads and idempotent writes of story graphs. Connects lazily: a graph that is down answers Unavailable."""

    def __init__(
        self,
        uri: str,
        user: str,
        password: str,
        database: str = "neo4j",
        backend: str = "auto",
        *,
        connect_timeout: float = 3.0,
        query_timeout: float = 10.0,
    ) -> None:
        self.uri = uri
        self.database = database
        self.query_timeout = query_timeout
        self.backend: Backend | None = None if backend == "auto" else Backend(backend)
        self.driver: AsyncDriver = AsyncGraphDatabase.driver(
            uri,
            auth=(user, password),
            connection_timeout=connect_timeout,
            connection_acquisition_timeout=connect_timeout + query_timeout,
            max_transaction_retry_time=0,
            max_connection_pool_size=32,
            keep_alive=True,
        )
        self._ready = False
        self._lock = asyncio.Lock()

    # --- plumbing -------------------------------------------------------------------------------------------

    def _unavailable(self, e: BaseException) -> Unavailable:
        return Unavailable(f"graph at {self.uri} unreachable: {type(e).__name__}: {e}".strip())

    async def _raw(self, text: str, params: Mapping[str, Any] | None) -> list[list[Any]]:
        """Run one query. Every query here is idempotent (reads, MERGE-based writes), so one whose connection
        broke under it is run once more on a fresh connection before the graph counts as unavailable."""
        for attempt in (1, 2):
            try:
                return await self._once(text, params)
            except (ServiceUnavailable, SessionExpired) as e:
                if attempt == 2 or "defunct connection" not in str(e):
                    raise self._unavailable(e) from e
                log.warning("graph connection broke during a query (%s); running it again", e)
        raise AssertionError("unreachable")

    async def _once(self, text: str, params: Mapping[str, Any] | None) -> list[list[Any]]:
        on_falkordb = self.backend is not Backend.NEO4J
        try:
            async with asyncio.timeout(self.query_timeout):
                # Auto-commit, write mode: FalkorDB picks the graph from RUN's metadata (falkordb.py, point 3).
                async with self.driver.session(database=self.database, default_access_mode=WRITE_ACCESS) as s:
                    if on_falkordb:  # the delayed-ACK stall (falkordb.py, point 5)
                        falkordb.quickack(self.driver)
                    result = await s.run(text, params)
                    if on_falkordb:  # a connection opened by this run gets the hook now
                        falkordb.quickack(self.driver)
                    return [list(r.values()) async for r in result]
        except TimeoutError as e:
            raise Unavailable(f"graph at {self.uri} did not answer within {self.query_timeout:.0f}s") from e
        except (ServiceUnavailable, SessionExpired):
            raise
        except (AuthError, OSError) as e:
            raise self._unavailable(e) from e
        except Neo4jError as e:
            raise GraphError(f"graph query failed: {e.message or e}") from e
        except DriverError as e:
            raise self._unavailable(e) from e

    async def run(self, query: str, **params: Any) -> list[list[Any]]:
        """Run one auto-commit query; rows as lists of values."""
        await self.ensure_ready()
        return await self._run(query, params)

    async def _run(self, query: str, params: Mapping[str, Any]) -> list[list[Any]]:
        if self.backend is Backend.FALKORDB:  # no Bolt parameters: literals (falkordb.py, points 1 and 2)
            text = falkordb.inline(query, params)
            if len(text.encode()) > falkordb.MAX_QUERY_BYTES:
                raise GraphError(f"query of {len(text.encode())} bytes exceeds what FalkorDB's Bolt port takes")
            return await self._raw(text, None)
        return await self._raw(query, dict(params))

    async def ensure_ready(self) -> None:
        """Detect the backend (when `auto`) and set up the schema, once; retried after a failure."""
        if self._ready:
            return
        async with self._lock:
            if self._ready:
                return
            if self.backend is None:
                self.backend = await self._detect()
                log.info("graph backend at %s: %s", self.uri, self.backend)
            await self._schema()
            self._ready = True

    async def _detect(self) -> Backend:
        try:
            await self._raw("CALL dbms.components() YIELD name RETURN name", None)
        except GraphError:  # FalkorDB has no dbms.components (and answers HELLO as "Neo4j/5.13.0")
            return Backend.FALKORDB
        return Backend.NEO4J

    async def _schema(self) -> None:
        """Uniqueness and lookup indexes. The one backend-specific place: the two servers' DDL differs."""
        if self.backend is Backend.NEO4J:
            await self._raw("CREATE CONSTRAINT story_id IF NOT EXISTS FOR (n:Story) REQUIRE n.id IS UNIQUE", None)
            for label in NODE_LABELS[1:]:
                low = label.lower()
                await self._raw(
                    f"CREATE CONSTRAINT {low}_key IF NOT EXISTS FOR (n:{label}) REQUIRE (n.story_id, n.id) IS UNIQUE",
                    None,
                )
                await self._raw(f"CREATE INDEX {low}_story IF NOT EXISTS FOR (n:{label}) ON (n.story_id)", None)
            return
        rows = await self._raw("CALL db.indexes() YIELD label, properties RETURN label, properties", None)
        have = {(label, prop) for label, props in rows for prop in props or ()}
        for label in NODE_LABELS:
            for prop in ("id", "story_id"):
                if (label, prop) not in have:
                    try:
                        await self._raw(f"CREATE INDEX FOR (n:{label}) ON (n.{prop})", None)
                    except GraphError:  # created meanwhile by another replica
                        log.debug("index on %s.%s exists", label, prop)

    async def close(self) -> None:
        if self.backend is not Backend.NEO4J:  # FalkorDB stalls a connection after a GOODBYE (falkordb.py, point 4)
            falkordb.kill_connections(self.driver)
        with contextlib.suppress(Exception):
            await self.driver.close()

    async def ping(self) -> None:
        await self.ensure_ready()
        await self._run("RETURN 1 AS one", {})

    # --- reads ----------------------------------------------------------------------------------------------

    async def _batched(self, match: str, row: str, width: str, **params: Any) -> list[list[Any]]:
        """Rows of `match` as lists (`row`), packed several per record but every record under REPLY_BYTES
        (falkordb.py, point 5): the batch size comes from the widest row (`width`, in characters; at most 3 UTF-8
        bytes each)."""
        query = (
            f"{match} WITH collect({row}) AS rows, max({width}) AS widest "
            "WITH rows, toInteger($reply / (3 * coalesce(widest, 0) + $overhead)) AS b "
            "WITH rows, CASE WHEN b < 1 THEN 1 WHEN b > $most THEN $most ELSE b END AS b "
            "UNWIND range(0, size(rows) - 1, b) AS i RETURN rows[i..i + b]"
        )
        rows: list[list[Any]] = []
        for (batch,) in await self.run(
            query, reply=falkordb.REPLY_BYTES, overhead=falkordb.ROW_OVERHEAD, most=falkordb.READ_BATCH, **params
        ):
            rows.extend(batch or ())
        return rows

    async def _pairs(self, pattern: str, **params: Any) -> list[tuple[str, str]]:
        """(a.id, b.id) of every match of `pattern` (ids are ASCII and at most 128 characters)."""
        rows = await self._batched(f"MATCH {pattern}", "[a.id, b.id]", "0", **params)
        return [(a, b) for a, b in rows]

    async def load(self, story_id: str) -> StorySnapshot | None:
        """The story's graph (no timeline or summary: those live in Valkey), or None when it is unknown."""
        await self.ensure_ready()
        head, task_rows, decision_rows, depends, affects, supersedes = await asyncio.gather(
            self.run(
                "MATCH (s:Story {id: $sid}) OPTIONAL MATCH (s)-[:HAS_PLAN]->(p:Plan) "
                "RETURN s.title, s.description, collect([p.id, p.approved_by, p.approved_at, p.roles])",
                sid=story_id,
            ),
            self._batched(
                "MATCH (t:Task {story_id: $sid})",
                "[t.id, t.title, t.description, t.role, t.status, t.priority, t.parent_task_id, t.requirements]",
                "size(coalesce(t.title, '')) + size(coalesce(t.description, '')) "
                "+ reduce(n = 0, r IN coalesce(t.requirements, []) | n + size(r) + 3)",
                sid=story_id,
            ),
            self._batched(
                "MATCH (d:Decision {story_id: $sid})",
                "[d.id, d.title, d.rationale, d.status, d.decided_by, d.decided_at, d.alternatives, d.task_id, "
                "d.role, d.deliberation_id, d.proposal_id]",
                "size(coalesce(d.title, '')) + size(coalesce(d.rationale, '')) + size(coalesce(d.decided_by, '')) "
                "+ size(coalesce(d.proposal_id, '')) + reduce(n = 0, x IN coalesce(d.alternatives, []) | n + size(x) + 3)",
                sid=story_id,
            ),
            self._pairs("(a:Task {story_id: $sid})-[:DEPENDS_ON]->(b:Task)", sid=story_id),
            self._pairs("(a:Decision {story_id: $sid})-[:AFFECTS]->(b:Task)", sid=story_id),
            self._pairs("(a:Decision {story_id: $sid})-[:SUPERSEDES]->(b:Decision)", sid=story_id),
        )
        if not head:
            return None
        deps: dict[str, list[str]] = {}
        for a, b in depends:
            deps.setdefault(a, []).append(b)
        affected: dict[str, list[str]] = {}
        for a, b in affects:
            affected.setdefault(a, []).append(b)
        superseded: dict[str, list[str]] = {}
        for a, b in supersedes:
            superseded.setdefault(a, []).append(b)
        title, description, plan_rows = head[0]
        plans = [
            Plan(pid, by or "", int(at or 0), tuple(r for r in map(_role, roles or ()) if r))
            for pid, by, at, roles in plan_rows
            if pid is not None
        ]
        tasks = [
            Task(
                task_id=tid,
                title=t or "",
                description=desc or "",
                role=_role(role),
                status=_task_status(status),
                priority=int(prio or 0),
                parent_task_id=parent or "",
                requirements=_strs(reqs),
                depends_on=tuple(sorted(deps.get(tid, ()))),
            )
            for tid, t, desc, role, status, prio, parent, reqs in task_rows
        ]
        decisions = [
            Decision(
                decision_id=did,
                title=t or "",
                rationale=why or "",
                status=_decision_status(status),
                decided_by=by or "",
                decided_at=int(at or 0),
                alternatives=_strs(alts),
                affects_task_ids=tuple(sorted(affected.get(did, ()))),
                supersedes=tuple(sorted(superseded.get(did, ()))),
                task_id=task_id or "",
                role=_role(role),
                deliberation_id=delib or "",
                proposal_id=prop or "",
            )
            for did, t, why, status, by, at, alts, task_id, role, delib, prop in decision_rows
        ]
        return StorySnapshot(
            story=Story(story_id, title or "", description or ""),
            plans=with_versions(plans),
            tasks=tuple(tasks),
            decisions=tuple(decisions),
        )

    async def story_exists(self, story_id: str) -> bool:
        return bool(await self.run("MATCH (s:Story {id: $sid}) RETURN s.id", sid=story_id))

    async def proposals(self, story_id: str, proposal_ids: Sequence[str]) -> dict[str, Proposal]:
        if not proposal_ids:
            return {}
        rows = await self.run(
            "UNWIND $ids AS pid MATCH (p:Proposal {story_id: $sid, id: pid}) "
            "RETURN p.id, p.author_id, p.content, p.score",
            sid=story_id,
            ids=list(proposal_ids),
        )
        return {
            pid: Proposal(pid, author or "", content or "", float(score or 0.0)) for pid, author, content, score in rows
        }

    async def stories_of_task(self, task_id: str) -> list[str]:
        rows = await self.run("MATCH (t:Task {id: $tid}) RETURN DISTINCT t.story_id", tid=task_id)
        return sorted(r[0] for r in rows if r[0])

    async def existing(self, story_id: str, label: str, ids: Iterable[str]) -> set[str]:
        if label not in NODE_LABELS:
            raise ValueError(label)
        wanted = sorted(set(ids))
        if not wanted:
            return set()
        rows = await self.run(
            f"UNWIND $ids AS x MATCH (n:{label} {{story_id: $sid, id: x}}) RETURN n.id", sid=story_id, ids=wanted
        )
        return {r[0] for r in rows}

    # --- writes: plan approvals -----------------------------------------------------------------------------

    async def record_plan(self, story: Story, plan: Plan, tasks: Sequence[Task]) -> None:
        """Story, plan and tasks (with their dependencies). A replayed or older approval changes nothing."""
        sid, at = story.story_id, plan.approved_at
        props = {k: v for k, v in (("title", story.title), ("description", story.description)) if v}
        await self.run(
            "MERGE (s:Story {id: $sid}) ON CREATE SET s.story_id = $sid "
            "WITH s WHERE coalesce(s.updated_at, 0) <= $at SET s += $props, s.updated_at = $at",
            sid=sid,
            at=at,
            props=props,
        )
        await self.run(
            "MATCH (s:Story {id: $sid}) MERGE (p:Plan {story_id: $sid, id: $pid}) "
            "SET p.approved_by = $by, p.approved_at = $at, p.roles = $roles MERGE (s)-[:HAS_PLAN]->(p)",
            sid=sid,
            pid=plan.plan_id,
            by=plan.approved_by,
            at=at,
            roles=[str(r) for r in plan.roles],
        )
        rows = [
            {
                "id": t.task_id,
                "props": {
                    "title": t.title,
                    "description": t.description,
                    "role": str(t.role) if t.role else "",
                    "priority": t.priority,
                    "requirements": list(t.requirements),
                    "depends_on": list(t.depends_on),
                },
            }
            for t in tasks
        ]
        for group in falkordb.batches(rows):  # under FalkorDB's message size (point 2)
            await self.run(
                "MATCH (p:Plan {story_id: $sid, id: $pid}) UNWIND $rows AS row "
                "MERGE (t:Task {story_id: $sid, id: row.id}) ON CREATE SET t.status = 'PLANNED' "
                "MERGE (p)-[:HAS_TASK]->(t) "
                "WITH t, row WHERE coalesce(t.plan_at, 0) <= $at SET t += row.props, t.plan_at = $at",
                sid=sid,
                pid=plan.plan_id,
                at=at,
                rows=group,
            )
        await self._relink_dependencies(sid)
        await self._relink_plans(sid)

    async def _relink_dependencies(self, sid: str) -> None:
        """DEPENDS_ON edges = the tasks' declared `depends_on` that exist (also when the target came later)."""
        await self.run(
            "MATCH (a:Task {story_id: $sid})-[r:DEPENDS_ON]->(b:Task) "
            "WHERE a.depends_on IS NULL OR NOT b.id IN a.depends_on DELETE r",
            sid=sid,
        )
        await self.run(
            "MATCH (a:Task {story_id: $sid}) WHERE size(coalesce(a.depends_on, [])) > 0 "
            "UNWIND a.depends_on AS dep MATCH (b:Task {story_id: $sid, id: dep}) WHERE b.id <> a.id "
            "MERGE (a)-[:DEPENDS_ON]->(b)",
            sid=sid,
        )

    async def _relink_plans(self, sid: str) -> None:
        """SUPERSEDES edges of the story's plans: each supersedes the one approved just before it."""

        async def chain(rows: list[list[Any]]) -> None:
            want = set(plan_chain(Plan(pid, approved_at=int(at or 0)) for pid, at in rows))
            have = {
                (a, b)
                for a, b in await self.run(
                    "MATCH (a:Plan {story_id: $sid})-[:SUPERSEDES]->(b:Plan) RETURN a.id, b.id", sid=sid
                )
            }
            await self._set_edges(sid, "Plan", have - want, want - have)

        await self._settled(
            f"the plans of story {sid}",
            lambda: self.run("MATCH (p:Plan {story_id: $sid}) RETURN p.id, p.approved_at", sid=sid),
            chain,
        )

    async def _settled(
        self,
        what: str,
        read: Callable[[], Awaitable[list[list[Any]]]],
        chain: Callable[[list[list[Any]]], Awaitable[None]],
    ) -> None:
        """Write a chain (`chain`) computed from the members `read` answers (rows of id, time, ...), then read them
        again, until they are what the chain was computed from.

        Replicas record one story's plans, or one task's deliberations, at the same moment, each computing the chain
        from what it read: one that read before another's member existed wrote a chain no longer right (an edge
        newest -> oldest too many; found by tests/integration/context/test_replicas.py). With the second read,
        whoever writes last has seen every member, and a wrong edge it did not see is removed by the one that wrote
        it, on its next round."""
        computed_from: frozenset[tuple[Any, Any]] | None = None
        for _ in range(SETTLE_ROUNDS):
            rows = await read()
            members = frozenset((r[0], r[1]) for r in rows)
            if members == computed_from:
                return
            await chain(rows)
            computed_from = members
        raise Unavailable(f"{what} kept changing while their supersession chain was written")

    async def _set_edges(
        self, sid: str, label: str, remove: set[tuple[str, str]], add: set[tuple[str, str]], rel: str = "SUPERSEDES"
    ) -> None:
        if remove:
            await self.run(
                f"UNWIND $pairs AS pr MATCH (a:{label} {{story_id: $sid, id: pr[0]}})-[r:{rel}]->"
                f"(b:{label} {{story_id: $sid, id: pr[1]}}) DELETE r",
                sid=sid,
                pairs=sorted(map(list, remove)),
            )
        if add:
            await self.run(
                f"UNWIND $pairs AS pr MATCH (a:{label} {{story_id: $sid, id: pr[0]}}) "
                f"MATCH (b:{label} {{story_id: $sid, id: pr[1]}}) MERGE (a)-[:{rel}]->(b)",
                sid=sid,
                pairs=sorted(map(list, add)),
            )

    # --- writes: completed deliberations ---------------------------------------------------------------------

    async def record_deliberation(
        self, story_id: str, deliberation: Deliberation, decision: Decision, proposal: Proposal
    ) -> bool:
        """Deliberation, winning proposal and decision, linked to the task; earlier decisions of the same
        (task, role) become SUPERSEDED by the newest. Idempotent. True when the decision was announced already
        (`mark_announced`), so DecisionAdded is published once even if a handler fails after publishing."""
        sid, d = story_id, deliberation
        await self.run(
            "MERGE (s:Story {id: $sid}) ON CREATE SET s.story_id = $sid "
            "MERGE (t:Task {story_id: $sid, id: $tid}) "
            "ON CREATE SET t.role = $role, t.status = 'PLANNED', t.priority = 0, t.title = '', t.description = '' "
            "MERGE (dl:Deliberation {story_id: $sid, id: $did}) SET dl += $dl "
            "MERGE (p:Proposal {story_id: $sid, id: $pid}) SET p += $p "
            "MERGE (dl)-[:SELECTED]->(p)",
            sid=sid,
            tid=d.task_id,
            role=str(d.role),
            did=d.deliberation_id,
            dl={
                "task_id": d.task_id,
                "role": str(d.role),
                "selection_method": d.selection_method,
                "winner_score": float(d.winner_score),
                "duration_ms": d.duration_ms,
                "total_tokens": d.total_tokens,
                "checks_passed": d.checks_passed,
                "checks_failed": d.checks_failed,
                "context_version": d.context_version,
                "completed_at": d.completed_at,
            },
            pid=proposal.proposal_id,
            p={"author_id": proposal.author_id, "content": proposal.content, "score": float(proposal.score)},
        )
        rows = await self.run(
            "MATCH (dl:Deliberation {story_id: $sid, id: $did}) MATCH (t:Task {story_id: $sid, id: $tid}) "
            "MERGE (d:Decision {story_id: $sid, id: $decid}) ON CREATE SET d += $props "
            "MERGE (d)-[:DECIDED_IN]->(dl) MERGE (d)-[:AFFECTS]->(t) "
            "SET t.status = CASE WHEN t.status = 'PLANNED' THEN 'DECIDED' ELSE t.status END "
            "RETURN coalesce(d.announced, false)",
            sid=sid,
            did=d.deliberation_id,
            tid=d.task_id,
            decid=decision.decision_id,
            props=_decision_props(decision),
        )
        await self._supersede(sid, d.task_id, d.role)
        return bool(rows and rows[0][0])

    async def _supersede(self, sid: str, task_id: str, role: Role) -> None:
        """Statuses and SUPERSEDES edges of the decisions of one (task, role): the newest stays ACCEPTED."""
        await self._settled(
            f"the decisions of task {task_id} ({role})",
            lambda: self.run(
                "MATCH (d:Decision {story_id: $sid}) WHERE d.task_id = $tid AND d.role = $role "
                "AND d.status <> 'REJECTED' RETURN d.id, d.decided_at, d.status",
                sid=sid,
                tid=task_id,
                role=str(role),
            ),
            lambda rows: self._chain_decisions(
                sid, [Decision(did, "", decided_at=int(at or 0), status=_decision_status(st)) for did, at, st in rows]
            ),
        )

    async def _chain_decisions(self, sid: str, group: list[Decision]) -> None:
        statuses, edges = supersession(group)
        changed = [[d.decision_id, statuses[d.decision_id]] for d in group if d.status != statuses[d.decision_id]]
        if changed:
            await self.run(
                "UNWIND $rows AS row MATCH (d:Decision {story_id: $sid, id: row[0]}) SET d.status = row[1]",
                sid=sid,
                rows=changed,
            )
        ids = [d.decision_id for d in group]
        have = {
            (a, b)
            for a, b in await self.run(
                "MATCH (a:Decision {story_id: $sid})-[:SUPERSEDES]->(b:Decision) WHERE a.id IN $ids AND b.id IN $ids "
                "RETURN a.id, b.id",
                sid=sid,
                ids=ids,
            )
        }
        want = set(edges)
        await self._set_edges(sid, "Decision", have - want, want - have)

    async def mark_announced(self, story_id: str, decision_id: str) -> None:
        await self.run(
            "MATCH (d:Decision {story_id: $sid, id: $id}) SET d.announced = true", sid=story_id, id=decision_id
        )

    # --- writes: UpdateContext ------------------------------------------------------------------------------

    async def upsert_decision(self, story_id: str, decision: Decision, fields: frozenset[str] | None) -> None:
        """Create or update (only `fields`, or everything when None) a decision and its edges."""
        props = _decision_props(decision)
        if fields is not None:
            props = {k: v for k, v in props.items() if k in fields}
        await self.run(
            "MERGE (d:Decision {story_id: $sid, id: $id}) SET d += $props",
            sid=story_id,
            id=decision.decision_id,
            props=props,
        )
        if fields is None or "affects_task_ids" in fields:
            await self.run(
                "MATCH (d:Decision {story_id: $sid, id: $id})-[r:AFFECTS]->(t:Task) WHERE NOT t.id IN $ids DELETE r",
                sid=story_id,
                id=decision.decision_id,
                ids=list(decision.affects_task_ids),
            )
            await self.run(
                "MATCH (d:Decision {story_id: $sid, id: $id}) UNWIND $ids AS tid "
                "MATCH (t:Task {story_id: $sid, id: tid}) MERGE (d)-[:AFFECTS]->(t)",
                sid=story_id,
                id=decision.decision_id,
                ids=list(decision.affects_task_ids),
            )
        if decision.supersedes and (fields is None or "supersedes" in fields):
            await self.run(
                "MATCH (d:Decision {story_id: $sid, id: $id}) UNWIND $old AS oid "
                "MATCH (o:Decision {story_id: $sid, id: oid}) WHERE o.id <> d.id "
                "MERGE (d)-[:SUPERSEDES]->(o) SET o.status = 'SUPERSEDED'",
                sid=story_id,
                id=decision.decision_id,
                old=list(decision.supersedes),
            )

    async def upsert_task(self, story_id: str, task: Task, fields: frozenset[str] | None) -> None:
        """Create or update a task; a new one hangs off its parent task, else off the story's current plan."""
        props = {
            "title": task.title,
            "description": task.description,
            "role": str(task.role) if task.role else "",
            "status": str(task.status),
            "priority": task.priority,
            "requirements": list(task.requirements),
            "depends_on": list(task.depends_on),
            "parent_task_id": task.parent_task_id,
        }
        if fields is not None:
            props = {k: v for k, v in props.items() if k in fields}
        await self.run(
            "MERGE (t:Task {story_id: $sid, id: $id}) "
            "ON CREATE SET t.status = 'PLANNED', t.priority = 0, t.title = '', t.description = '' SET t += $props",
            sid=story_id,
            id=task.task_id,
            props=props,
        )
        if fields is None or "parent_task_id" in fields:
            await self.run(
                "MATCH (x)-[r:HAS_TASK]->(t:Task {story_id: $sid, id: $id}) WHERE x.id <> $parent DELETE r",
                sid=story_id,
                id=task.task_id,
                parent=task.parent_task_id,
            )
            if task.parent_task_id:
                await self.run(
                    "MATCH (p:Task {story_id: $sid, id: $parent}) MATCH (t:Task {story_id: $sid, id: $id}) "
                    "WHERE p.id <> t.id MERGE (p)-[:HAS_TASK]->(t)",
                    sid=story_id,
                    id=task.task_id,
                    parent=task.parent_task_id,
                )
            else:
                await self.run(
                    "MATCH (p:Plan {story_id: $sid}) WITH p ORDER BY p.approved_at DESC, p.id DESC LIMIT 1 "
                    "MATCH (t:Task {story_id: $sid, id: $id}) MERGE (p)-[:HAS_TASK]->(t)",
                    sid=story_id,
                    id=task.task_id,
                )
        await self._relink_dependencies(story_id)

    async def delete(self, story_id: str, label: str, entity_id: str) -> bool:
        if label not in ("Decision", "Task"):
            raise ValueError(label)
        rows = await self.run(
            f"MATCH (n:{label} {{story_id: $sid, id: $id}}) DETACH DELETE n RETURN 1", sid=story_id, id=entity_id
        )
        return bool(rows)

    # --- for tests and the benchmark ------------------------------------------------------------------------

    async def counts(self, story_id: str) -> dict[str, int]:
        """Nodes per label and edges per type of one story (what idempotency tests compare)."""
        out: dict[str, int] = {}
        for label, n in await self.run("MATCH (n) WHERE n.story_id = $sid RETURN labels(n)[0], count(n)", sid=story_id):
            out[f"node:{label}"] = n
        for rel, n in await self.run(
            "MATCH (a)-[r]->(b) WHERE a.story_id = $sid RETURN type(r), count(r)", sid=story_id
        ):
            out[f"edge:{rel}"] = n
        return dict(sorted(out.items()))

    async def delete_story(self, story_id: str) -> None:
        await self.run("MATCH (n) WHERE n.story_id = $sid DETACH DELETE n", sid=story_id)


def _decision_props(d: Decision) -> dict[str, Any]:
    props: dict[str, Any] = {
        "title": d.title,
        "rationale": d.rationale,
        "status": str(d.status),
        "decided_by": d.decided_by,
        "decided_at": d.decided_at,
        "alternatives": list(d.alternatives),
    }
    if d.task_id:
        props.update(task_id=d.task_id, role=str(d.role) if d.role else "", deliberation_id=d.deliberation_id)
        props["proposal_id"] = d.proposal_id
    return props
