"""Valkey state of the context service: the per-story timeline, the last summary, the rendered-context cache.

Keys (prefix `fleet:ctx:`; the story id in braces keeps a story's keys in one cluster slot):
  {story}:milestones   hash milestone_id -> milestone JSON (the timeline; ordered by `at` when read)
  {story}:summary      hash at, text (the newest summary wins, whatever order they arrive in)
  {story}:gen          generation counter, bumped by every write that affects the story's context
  {story}:cache        hash "<role>|<phase>|<subtask>|<budget>" -> {"gen": n, "ctx": RenderedContext JSON}
  {story}:version      the story version last announced with context.updated
  {story}:announcing   held (with a lease) by the replica announcing the story's version: one at a time

Invalidation: `invalidate()` bumps the generation and deletes the cache hash in one transaction. A reader that
computed from the graph before a write finished stores its entry under the generation it read first, so the
entry is never served (its generation is old): no stale context survives a write.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict

import valkey.asyncio as valkey_async

from services.common.errors import Unavailable
from services.common.valkey import unavailable_on_errors
from services.context.domain import Milestone, Summary
from services.context.rendering import RenderedContext

PREFIX = "fleet:ctx"

# Set the summary only when it is at least as new as the stored one.
_SET_SUMMARY = """
local cur = redis.call('HGET', KEYS[1], 'at')
if (not cur) or tonumber(cur) <= tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'at', ARGV[1], 'text', ARGV[2])
  return 1
end
return 0
"""


# Drop the announcement lock only if this holder still has it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _key(story_id: str, what: str) -> str:
    return f"{PREFIX}:{{{story_id}}}:{what}"


class ContextState:
    def __init__(self, client: valkey_async.Valkey, cache_ttl_seconds: int = 3600) -> None:
        self.r = client
        self.ttl = cache_ttl_seconds

    # --- timeline and summary --------------------------------------------------------------------------------

    @unavailable_on_errors
    async def put_milestone(self, story_id: str, milestone: Milestone) -> None:
        await self.r.hset(_key(story_id, "milestones"), milestone.milestone_id, json.dumps(asdict(milestone)))

    @unavailable_on_errors
    async def delete_milestone(self, story_id: str, milestone_id: str) -> bool:
        return bool(await self.r.hdel(_key(story_id, "milestones"), milestone_id))

    @unavailable_on_errors
    async def set_summary(self, story_id: str, summary: Summary) -> bool:
        return bool(await self.r.eval(_SET_SUMMARY, 1, _key(story_id, "summary"), summary.at, summary.text))

    @unavailable_on_errors
    async def timeline(self, story_id: str) -> tuple[list[Milestone], Summary | None]:
        async with self.r.pipeline(transaction=False) as p:
            p.hgetall(_key(story_id, "milestones"))
            p.hgetall(_key(story_id, "summary"))
            raw_m, raw_s = await p.execute()
        milestones = sorted((Milestone(**json.loads(v)) for v in raw_m.values()), key=lambda m: (m.at, m.milestone_id))
        summary = Summary(raw_s.get("text", ""), int(raw_s.get("at", 0))) if raw_s else None
        return milestones, summary

    # --- rendered-context cache ----------------------------------------------------------------------------

    @unavailable_on_errors
    async def cached(self, story_id: str, field: str) -> tuple[RenderedContext | None, int]:
        """(the cached context or None, the current generation to store a fresh one under)."""
        async with self.r.pipeline(transaction=False) as p:
            p.get(_key(story_id, "gen"))
            p.hget(_key(story_id, "cache"), field)
            gen_raw, entry = await p.execute()
        gen = int(gen_raw or 0)
        if entry:
            doc = json.loads(entry)
            if doc.get("gen") == gen:
                return RenderedContext.from_json(doc["ctx"]), gen
        return None, gen

    @unavailable_on_errors
    async def store(self, story_id: str, field: str, gen: int, ctx: RenderedContext) -> None:
        key = _key(story_id, "cache")
        async with self.r.pipeline(transaction=True) as p:
            p.hset(key, field, json.dumps({"gen": gen, "ctx": ctx.to_json()}))
            p.expire(key, self.ttl)
            await p.execute()

    @unavailable_on_errors
    async def invalidate(self, story_id: str) -> int:
        """Make every cached context of the story stale; returns the new generation."""
        async with self.r.pipeline(transaction=True) as p:
            p.incr(_key(story_id, "gen"))
            p.delete(_key(story_id, "cache"))
            gen, _ = await p.execute()
        return int(gen)

    # --- announced version ----------------------------------------------------------------------------------

    @unavailable_on_errors
    async def announced_version(self, story_id: str) -> str:
        return await self.r.get(_key(story_id, "version")) or ""

    @unavailable_on_errors
    async def set_announced_version(self, story_id: str, version: str) -> None:
        await self.r.set(_key(story_id, "version"), version)

    @contextlib.asynccontextmanager
    async def announcing(
        self, story_id: str, lease_seconds: float = 5.0, wait_seconds: float = 30.0
    ) -> AsyncIterator[None]:
        """Hold the story's announcement lock (one replica at a time). A holder that dies leaves it for
        `lease_seconds` (one slower than that, e.g. on a stalled graph, may be overtaken: the order of the story's
        announcements is then not guaranteed, nothing else is lost); Unavailable after waiting `wait_seconds`."""
        key, token = _key(story_id, "announcing"), uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_seconds
        while not await self._take(key, token, lease_seconds):
            if loop.time() > deadline:
                raise Unavailable(f"story {story_id} is being announced elsewhere for over {wait_seconds:.0f}s")
            await asyncio.sleep(0.02)
        try:
            yield
        finally:
            await self._release(key, token)

    @unavailable_on_errors
    async def _take(self, key: str, token: str, lease_seconds: float) -> bool:
        return bool(await self.r.set(key, token, nx=True, px=int(lease_seconds * 1000)))

    @unavailable_on_errors
    async def _release(self, key: str, token: str) -> None:
        await self.r.eval(_RELEASE, 1, key, token)
