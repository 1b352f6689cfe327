"""Schemathesis fuzzes every operation of /openapi.json (valid and invalid inputs): no 5xx for any input.

The one 5xx allowed is the documented 503 naming the orchestrator, which is not running here: a dependency
being down is not an input error. Responses must also match their documented status codes, content types
and schemas; what the schema calls invalid must be rejected, and what it calls valid accepted (the plan rules
across tasks that JSON Schema cannot state, which the schema describes in words, excepted).
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)

from services.monitoring.main import RunningMonitoring, start

from .conftest import monitoring_settings, wait_ready

pytestmark = pytest.mark.integration

EXAMPLES = 250

# The request schema's own format for a task's tests (services/monitoring/app.py): pytest source with a test.
schemathesis.openapi.format(
    "pytest",
    st.sampled_from(
        ["", "def test_it():\n    assert True\n", "import math\n\n\ndef test_pi():\n    assert math.pi > 3\n"]
    ),
)
# Rules across a plan's tasks that JSON Schema cannot state (the schema's `tasks` description says them).
CROSS_TASK_RULES = ("task ids must be unique", "].depends_on: ")


@schemathesis.check
def no_server_error_but_a_down_orchestrator(ctx, response, case) -> bool | None:
    if response.status_code < 500:
        return True
    body = response.json() if response.headers.get("content-type", [""])[0].startswith("application/json") else {}
    if response.status_code == 503 and body.get("dependency") == "orchestrator":
        return True
    raise AssertionError(f"{response.status_code} for {case.method} {case.formatted_path}: {response.text[:500]}")


@schemathesis.check
def schema_valid_input_is_accepted(ctx, response, case) -> bool | None:
    """ST202 (positive data acceptance), except a plan refused only for a rule across its tasks."""
    if response.status_code == 422 and case.meta is not None and case.meta.generation.mode.is_positive:
        errors = response.json()["detail"]
        if all(e["loc"] == ["body", "tasks"] and any(r in e["msg"] for r in CROSS_TASK_RULES) for e in errors):
            return True
    return positive_data_acceptance(ctx, response, case)


async def test_no_input_makes_the_api_fail(monitoring: RunningMonitoring, client: httpx.AsyncClient):
    await fuzz_api(monitoring.url, client)


async def test_no_input_makes_the_api_fail_with_authentication_on(nats_url: str, bus, issuer):
    """The same with bearer tokens checked: the schema-valid cases carry a product owner's token, the invalid ones
    none (401 is then among what the schema documents)."""
    running = await start(monitoring_settings(nats_url, auth_issuer=issuer.url), port=0)
    token = issuer.mint("fuzzer", ["product-owner"], email="fuzz@example.com")
    try:
        async with httpx.AsyncClient(base_url=running.url, timeout=10) as client:
            await wait_ready(client)
            await fuzz_api(running.url, client, {"Authorization": f"Bearer {token}"})
    finally:
        await running.stop()


async def fuzz_api(base: str, client: httpx.AsyncClient, headers: dict[str, str] | None = None) -> None:

    def fuzz() -> int:
        schema = schemathesis.openapi.from_url(f"{base}/openapi.json").exclude(path="/api/events/stream")
        strategy = st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))
        calls = 0

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate, Phase.shrink],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def check(case: schemathesis.Case) -> None:
            nonlocal calls
            calls += 1
            # The token goes with schema-valid cases; an invalid one may be invalid by its missing credentials.
            positive = case.meta is not None and case.meta.generation.mode.is_positive
            response = case.call(base_url=base, timeout=10, headers=headers if positive else None)
            case.validate_response(
                response,
                checks=[
                    no_server_error_but_a_down_orchestrator,
                    status_code_conformance,
                    content_type_conformance,
                    response_schema_conformance,
                    negative_data_rejection,
                    schema_valid_input_is_accepted,
                ],
            )

        check()
        return calls

    calls = await asyncio.to_thread(fuzz)
    assert calls >= EXAMPLES // 2
    # The service is still healthy after the barrage.
    assert (await client.get("/readyz")).status_code == 200
    if headers:  # and the token was checked, not ignored
        assert (await client.get("/api/catalog")).status_code == 401
