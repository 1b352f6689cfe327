"""Durable orchestrator state in Valkey: councils, deliberation records, the task index and stats.

Keys (prefix `fleet:orch:`):
  councils                 hash role -> council JSON
  delib:<deliberation_id>  deliberation result JSON (any replica can answer GetDeliberationResult)
  lease:<deliberation_id>  held (with a TTL) by the process running that deliberation
  task:<task_id>           id of the task's latest deliberation
  running                  set of deliberation ids in flight
  stats:status / stats:role / stats:duration   counters
  caps:started:<subject>          deliberations the caller started in its current one-minute window (TTL 60 s)
  caps:tokens:<subject>:<hour>    tokens its deliberations spent in that hour (epoch // 3600; TTL 25 h)
  caps:roles:<subject>            its roles when last seen (TTL 24 h)
  caps:callers                    sorted set subject -> last seen (epoch s): the last day's, at most MAX_CALLERS
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict

import valkey.asyncio as valkey_async

from services.common.events import DeliberationStatus, Role
from services.common.valkey import unavailable_on_errors
from services.deliberation.domain import AgentSpec, Council, DeliberationResult
from services.orchestrator.caps import DAY_HOURS, HOUR, MINUTE, Usage

PREFIX = "fleet:orch"


class ValkeyStore:
    def __init__(self, client: valkey_async.Valkey) -> None:
        self.r = client

    # --- councils ------------------------------------------------------------------------------------------

    @unavailable_on_errors
    async def add_council(self, council: Council) -> bool:
        """Store a council; False when the role already has one."""
        return bool(await self.r.hsetnx(f"{PREFIX}:councils", council.role, json.dumps(asdict(council))))

    @unavailable_on_errors
    async def councils(self) -> list[Council]:
        raw = await self.r.hgetall(f"{PREFIX}:councils")
        return sorted((_council(v) for v in raw.values()), key=lambda c: list(Role).index(c.role))

    @unavailable_on_errors
    async def council(self, role: Role) -> Council | None:
        raw = await self.r.hget(f"{PREFIX}:councils", role)
        return _council(raw) if raw else None

    @unavailable_on_errors
    async def delete_council(self, role: Role) -> Council | None:
        raw = await self.r.hget(f"{PREFIX}:councils", role)
        if raw is None or not await self.r.hdel(f"{PREFIX}:councils", role):
            return None
        return _council(raw)

    # --- deliberations ---------------------------------------------------------------------------------------

    @unavailable_on_errors
    async def save(self, result: DeliberationResult) -> None:
        """Store a deliberation record (any status); terminal ones update the stats exactly once."""
        key = f"{PREFIX}:delib:{result.deliberation_id}"
        async with self.r.pipeline(transaction=True) as p:
            p.set(key, json.dumps(result.to_dict()))
            p.set(f"{PREFIX}:task:{result.task_id}", result.deliberation_id)
            if result.status.ended:
                p.srem(f"{PREFIX}:running", result.deliberation_id)
            else:
                p.sadd(f"{PREFIX}:running", result.deliberation_id)
            await p.execute()
        if result.status.ended and await self.r.set(f"{key}:counted", "1", nx=True):
            async with self.r.pipeline(transaction=True) as p:
                p.hincrby(f"{PREFIX}:stats:status", result.status, 1)
                p.hincrby(f"{PREFIX}:stats:role", result.role, 1)
                p.hincrbyfloat(f"{PREFIX}:stats:duration", "sum_ms", float(result.duration_ms))
                p.hincrby(f"{PREFIX}:stats:duration", "count", 1)
                await p.execute()

    @unavailable_on_errors
    async def get(self, deliberation_id: str) -> DeliberationResult | None:
        raw = await self.r.get(f"{PREFIX}:delib:{deliberation_id}")
        return DeliberationResult.from_dict(json.loads(raw)) if raw else None

    @unavailable_on_errors
    async def latest_for_task(self, task_id: str) -> DeliberationResult | None:
        deliberation_id = await self.r.get(f"{PREFIX}:task:{task_id}")
        return await self.get(deliberation_id) if deliberation_id else None

    @unavailable_on_errors
    async def running(self) -> list[str]:
        return sorted(await self.r.smembers(f"{PREFIX}:running"))

    # --- leases: which process runs a deliberation ------------------------------------------------------------

    @unavailable_on_errors
    async def take_lease(self, deliberation_id: str, owner: str, seconds: float) -> bool:
        return bool(await self.r.set(f"{PREFIX}:lease:{deliberation_id}", owner, nx=True, px=int(seconds * 1000)))

    @unavailable_on_errors
    async def renew_lease(self, deliberation_id: str, seconds: float) -> None:
        await self.r.pexpire(f"{PREFIX}:lease:{deliberation_id}", int(seconds * 1000))

    @unavailable_on_errors
    async def drop_lease(self, deliberation_id: str) -> None:
        await self.r.delete(f"{PREFIX}:lease:{deliberation_id}")

    @unavailable_on_errors
    async def lease_holder(self, deliberation_id: str) -> str | None:
        return await self.r.get(f"{PREFIX}:lease:{deliberation_id}")

    # --- stats -------------------------------------------------------------------------------------------------

    @unavailable_on_errors
    async def stats(self) -> tuple[dict[str, int], dict[str, int], float, int]:
        """(by status, by role, average duration ms, in flight)."""
        by_status = {k: int(v) for k, v in (await self.r.hgetall(f"{PREFIX}:stats:status")).items()}
        by_role = {k: int(v) for k, v in (await self.r.hgetall(f"{PREFIX}:stats:role")).items()}
        d = await self.r.hgetall(f"{PREFIX}:stats:duration")
        count = int(d.get("count", 0))
        avg = float(d.get("sum_ms", 0.0)) / count if count else 0.0
        running = await self.r.scard(f"{PREFIX}:running")
        if running:
            by_status[DeliberationStatus.IN_PROGRESS] = running
        return by_status, by_role, avg, running


class ValkeyMeter:
    """The spending-cap counters (services/orchestrator/caps.py), shared by every replica; keys expire on their own.
    Hours are numbered by this process's clock (replicas are kept in time by NTP: an hour's edge is what moves)."""

    MAX_CALLERS = 1000

    def __init__(self, client: valkey_async.Valkey, clock: Callable[[], float] = time.time) -> None:
        self.r = client
        self.clock = clock

    @staticmethod
    def _started(subject: str) -> str:
        return f"{PREFIX}:caps:started:{subject}"

    @staticmethod
    def _tokens(subject: str, hour: int) -> str:
        return f"{PREFIX}:caps:tokens:{subject}:{hour}"

    def _day(self, subject: str, now: float) -> list[tuple[int, str]]:
        current = int(now // HOUR)
        return [(h, self._tokens(subject, h)) for h in range(current - DAY_HOURS + 1, current + 1)]

    @staticmethod
    def _usage(subject: str, now: float, started: str | int | None, pttl: int, day: list, tokens: list) -> Usage:
        by_hour = {h: int(t) for (h, _), t in zip(day, tokens, strict=True) if t}
        return Usage(subject, int(started or 0), max(pttl, 0) / 1000, by_hour, now)

    @unavailable_on_errors
    async def start(self, subject: str, roles: frozenset[str]) -> Usage:
        """Count one deliberation started (INCR; the window's EXPIRE only when it opens) and note the caller as
        seen, atomically; its usage, this deliberation included."""
        now = self.clock()
        key, day = self._started(subject), self._day(subject, now)
        async with self.r.pipeline(transaction=True) as p:
            p.incr(key)
            p.expire(key, MINUTE, nx=True)
            p.pttl(key)
            p.mget([k for _, k in day])
            p.set(f"{PREFIX}:caps:roles:{subject}", " ".join(sorted(roles)), ex=DAY_HOURS * HOUR)
            p.zadd(f"{PREFIX}:caps:callers", {subject: now})
            p.zremrangebyscore(f"{PREFIX}:caps:callers", "-inf", now - DAY_HOURS * HOUR)
            p.zremrangebyrank(f"{PREFIX}:caps:callers", 0, -self.MAX_CALLERS - 1)
            started, _, pttl, tokens, *_ = await p.execute()
        return self._usage(subject, now, started, pttl, day, tokens)

    @unavailable_on_errors
    async def unstart(self, subject: str) -> None:
        """Take back a start that was refused. Should the window have closed in between, the -1 opens a new one
        (with its TTL): one extra start in that minute at most."""
        key = self._started(subject)
        async with self.r.pipeline(transaction=True) as p:
            p.decr(key)
            p.expire(key, MINUTE, nx=True)
            await p.execute()

    @unavailable_on_errors
    async def spend(self, subject: str, tokens: int) -> None:
        """Add a finished deliberation's tokens to the caller's current hour."""
        if tokens <= 0:
            return
        key = self._tokens(subject, int(self.clock() // HOUR))
        async with self.r.pipeline(transaction=True) as p:
            p.incrby(key, tokens)
            p.expire(key, (DAY_HOURS + 1) * HOUR)
            await p.execute()

    @unavailable_on_errors
    async def usage(self, subjects: list[str]) -> list[Usage]:
        now = self.clock()
        days = [self._day(s, now) for s in subjects]
        async with self.r.pipeline(transaction=False) as p:
            for subject, day in zip(subjects, days, strict=True):
                p.get(self._started(subject))
                p.pttl(self._started(subject))
                p.mget([k for _, k in day])
            raw = await p.execute()
        return [
            self._usage(subject, now, *raw[3 * i : 3 * i + 2], day, raw[3 * i + 2])
            for i, (subject, day) in enumerate(zip(subjects, days, strict=True))
        ]

    @unavailable_on_errors
    async def callers(self, limit: int) -> list[tuple[str, frozenset[str]]]:
        """The callers seen in the last day, most recent first (at most `limit`), with their roles then."""
        subjects = await self.r.zrevrangebyscore(
            f"{PREFIX}:caps:callers", "+inf", self.clock() - DAY_HOURS * HOUR, start=0, num=limit
        )
        if not subjects:
            return []
        roles = await self.r.mget([f"{PREFIX}:caps:roles:{s}" for s in subjects])
        return [(s, frozenset((r or "").split())) for s, r in zip(subjects, roles, strict=True)]


def _council(raw: str) -> Council:
    data = json.loads(raw)
    agents = tuple(AgentSpec(**{**a, "role": Role(a["role"])}) for a in data.pop("agents"))
    return Council(**{**data, "role": Role(data["role"]), "agents": agents})
