"""Monitoring settings from the environment, and the orchestrator's proto messages as the API's JSON."""

from __future__ import annotations

import pytest

from fleet.deliberation.v1 import deliberation_pb2 as d
from fleet.orchestrator.v1 import orchestrator_pb2 as o
from services.common.settings import SettingsError, env_vars, load_settings
from services.monitoring.orchestrator_client import (
    Councils,
    DeliberationResult,
    OrchestratorClient,
    OrchestratorStatus,
    OrchestratorUnavailable,
    to_dict,
)
from services.monitoring.settings import MonitoringSettings


def test_defaults_and_environment(monkeypatch: pytest.MonkeyPatch):
    assert load_settings(MonitoringSettings).monitoring_port == 8080
    monkeypatch.setenv("MONITORING_PORT", "9999")
    monkeypatch.setenv("ORCHESTRATOR_ADDRESS", "orchestrator:50055")
    monkeypatch.setenv("MONITORING_HISTORY_SIZE", "50")
    s = load_settings(MonitoringSettings)
    assert (s.monitoring_port, s.orchestrator_address, s.monitoring_history_size) == (9999, "orchestrator:50055", 50)
    assert {"MONITORING_PORT", "ORCHESTRATOR_ADDRESS", "NATS_URL"} <= set(env_vars(MonitoringSettings))


@pytest.mark.parametrize(("name", "value"), [("ORCHESTRATOR_ADDRESS", "http://x:1"), ("MONITORING_PORT", "80000")])
def test_bad_settings_are_named(monkeypatch: pytest.MonkeyPatch, name: str, value: str):
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=name):
        load_settings(MonitoringSettings)


def test_deliberation_result_becomes_json_with_short_enum_names():
    msg = o.GetDeliberationResultResponse(
        task_id="T-1",
        status=d.DELIBERATION_STATUS_TIMEOUT,
        total_tokens=12_345_678_901,
        selection=d.Selection(winner_id="a", method=d.SELECTION_METHOD_FALLBACK),
        results=[
            d.RankedProposal(
                rank=1, score=7.5, proposal=d.Proposal(proposal_id="p", content="x"), votes=[d.Vote(scores={"c": 9})]
            )
        ],
    )
    r = DeliberationResult.model_validate(to_dict(msg))
    assert r.status == "TIMEOUT" and r.selection is not None and r.selection.method == "FALLBACK"
    assert r.total_tokens == 12_345_678_901 and r.results[0].votes[0].scores == {"c": 9}
    assert DeliberationResult.model_validate(to_dict(o.GetDeliberationResultResponse())).selection is None


def test_councils_and_status_become_json():
    councils = o.ListCouncilsResponse(
        councils=[
            o.Council(council_id="council-qa", role="QA", num_agents=1, agents=[d.Agent(agent_id="agent-qa-001")])
        ]
    )
    assert Councils.model_validate(to_dict(councils)).councils[0].agents[0].agent_id == "agent-qa-001"
    status = OrchestratorStatus.model_validate(
        to_dict(o.GetStatusResponse(status="SERVING", stats=o.Stats(deliberations_by_status={"COMPLETED": 2})))
    )
    assert status.stats is not None and status.stats.deliberations_by_status == {"COMPLETED": 2}


async def test_no_orchestrator_configured_is_said_plainly():
    client = OrchestratorClient("", timeout=1)
    with pytest.raises(OrchestratorUnavailable, match="not configured"):
        await client.councils()
    assert client.ok is False
