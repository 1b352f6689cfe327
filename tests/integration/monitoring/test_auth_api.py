"""The monitoring API with bearer tokens checked against a real issuer on loopback: who may read, who may approve,
and the approver recorded from the token, never from the body."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import httpx
import pytest

from services.common import events as ev
from services.common.bus import EventBus
from services.monitoring.main import start

from .conftest import monitoring_settings, wait_ready

pytestmark = pytest.mark.integration

PLAN = {"story_id": "S-AUTH", "plan_id": "P-1", "approved_by": "someone-else", "roles": ["DEV"]}


@pytest.fixture
async def guarded(nats_url: str, bus: EventBus, issuer) -> AsyncIterator[httpx.AsyncClient]:
    running = await start(monitoring_settings(nats_url, auth_issuer=issuer.url), port=0)
    async with httpx.AsyncClient(base_url=running.url, timeout=10) as client:
        await wait_ready(client)
        yield client
    await running.stop()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def planning_seq(bus: EventBus) -> int:
    return (await bus.js.stream_info(ev.Streams.PLANNING_EVENTS)).state.last_seq


async def test_reading_needs_a_valid_token(guarded: httpx.AsyncClient, issuer):
    assert (await guarded.get("/healthz")).status_code == 200  # probes stay open
    assert (await guarded.get("/readyz")).status_code == 200
    refused = await guarded.get("/api/catalog")
    assert refused.status_code == 401 and refused.json()["detail"].startswith("no bearer token")
    assert refused.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
    expired = await guarded.get("/api/catalog", headers=bearer(issuer.mint("v", ["viewer"], ttl_seconds=-60)))
    assert expired.status_code == 401 and expired.json()["detail"] == "token expired"
    no_role = await guarded.get("/api/catalog", headers=bearer(issuer.mint("nobody", [])))
    assert no_role.status_code == 403 and "nobody lacks role viewer" in no_role.json()["detail"]

    viewer = issuer.mint("v-1", ["viewer"], email="vera@example.com")
    assert (await guarded.get("/api/catalog", headers=bearer(viewer))).status_code == 200
    me = (await guarded.get("/api/me", headers=bearer(viewer))).json()
    assert me == {"authentication": True, "actor": "vera@example.com", "subject": "v-1", "roles": ["viewer"]}


async def test_only_a_product_owner_approves_and_the_token_names_the_approver(
    guarded: httpx.AsyncClient, issuer, bus: EventBus, caplog
):
    caplog.set_level(logging.INFO, logger="fleet.audit")
    before = await planning_seq(bus)
    assert (await guarded.post("/api/approve-plan", json=PLAN)).status_code == 401
    viewer = await guarded.post("/api/approve-plan", json=PLAN, headers=bearer(issuer.mint("v", ["viewer"])))
    assert viewer.status_code == 403 and "lacks role product-owner" in viewer.json()["detail"]
    assert await planning_seq(bus) == before  # nothing was published

    owner = bearer(issuer.mint("po-7", ["product-owner"], email="paula@example.com"))
    accepted = await guarded.post("/api/approve-plan", json=PLAN, headers={**owner, "Idempotency-Key": "auth-1"})
    assert accepted.status_code == 201, accepted.text
    stored = ev.parse_event((await bus.js.get_msg(ev.Streams.PLANNING_EVENTS, accepted.json()["seq"])).data)
    assert stored.payload.approved_by == "paula@example.com"  # the body's "someone-else" is ignored
    assert stored.actor == "paula@example.com"

    audit = [(r.actor, r.method, r.outcome) for r in caplog.records if r.name == "fleet.audit"]
    assert ("paula@example.com", "POST /api/approve-plan", "OK") in audit
    assert ("v", "POST /api/approve-plan", "PERMISSION_DENIED") in audit
    assert ("", "POST /api/approve-plan", "UNAUTHENTICATED") in audit


async def test_without_authentication_the_body_names_the_approver(client: httpx.AsyncClient, bus: EventBus):
    me = (await client.get("/api/me")).json()
    assert me == {"authentication": False, "actor": "anonymous", "subject": "anonymous", "roles": ["admin"]}
    accepted = await client.post("/api/approve-plan", json=PLAN)
    stored = ev.parse_event((await bus.js.get_msg(ev.Streams.PLANNING_EVENTS, accepted.json()["seq"])).data)
    assert stored.payload.approved_by == "someone-else"
    anonymous = await client.post("/api/approve-plan", json={k: v for k, v in PLAN.items() if k != "approved_by"})
    stored = ev.parse_event((await bus.js.get_msg(ev.Streams.PLANNING_EVENTS, anonymous.json()["seq"])).data)
    assert stored.payload.approved_by == "anonymous"
    spec = (await client.get("/openapi.json")).json()
    assert "securitySchemes" not in spec.get("components", {})  # nothing documented that is not enforced
