"""Durable orchestrator state in Valkey: councils, deliberation records, the task index and stats.

Keys (prefix `fleet:orch:`):
  councils                 hash role -> council JSON
  delib:<deliberation_id>  deliberation result JSON (any replica can answer GetDeliberationResult)
  lease:<deliberation_id>  held (with a TTL) by the process running that deliberation
  task:<task_id>           id of the task's latest deliberation
  running                  set of deliberation ids in flight
  stats:status / stats:role / stats:duration   counters
"""

from __future__ import annotations

import json
from dataclasses import asdict

import valkey.asyncio as valkey_async

from services.common.events import DeliberationStatus, Role
from services.common.valkey import unavailable_on_errors
from services.deliberation.domain import AgentSpec, Council, DeliberationResult

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


def _council(raw: str) -> Council:
    data = json.loads(raw)
    agents = tuple(AgentSpec(**{**a, "role": Role(a["role"])}) for a in data.pop("agents"))
    return Council(**{**data, "role": Role(data["role"]), "agents": agents})
