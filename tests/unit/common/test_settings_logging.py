import json
import logging

import pytest

from services.common.logging import JsonFormatter, correlation_id
from services.common.settings import FleetSettings, SettingsError, env_vars, load_settings
from services.orchestrator.settings import OrchestratorSettings


def test_defaults_and_environment(monkeypatch):
    monkeypatch.setenv("NATS_URL", "nats://nats:4222")
    monkeypatch.setenv("CONSUMER_BACKOFF_SECONDS", "[1, 2]")
    s = load_settings(OrchestratorSettings)
    assert s.nats_url == "nats://nats:4222" and s.consumer_backoff_seconds == [1.0, 2.0]
    assert s.grpc_port == 50055


@pytest.mark.parametrize(
    ("var", "value"),
    [("GRPC_PORT", "70000"), ("NATS_URL", "http://nats"), ("EXECUTOR", "gpu"), ("VLLM_URL", "vllm:8000")],
)
def test_a_wrong_variable_is_named(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError) as info:
        load_settings(OrchestratorSettings)
    assert var in str(info.value) and repr(value) in str(info.value)


def test_env_vars_lists_what_a_service_reads():
    names = env_vars(OrchestratorSettings)
    assert {"NATS_URL", "VALKEY_URL", "VLLM_URL", "VLLM_MODEL", "GRPC_PORT", "CONTEXT_ADDRESS"} <= set(names)
    assert set(env_vars(FleetSettings)) < set(names)


def test_json_logs_carry_the_correlation_id():
    record = logging.LogRecord("fleet.test", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    record.task_id = "T-1"
    token = correlation_id.set("cid-9")
    try:
        line = json.loads(JsonFormatter("orchestrator").format(record))
    finally:
        correlation_id.reset(token)
    assert line["msg"] == "hello world" and line["correlation_id"] == "cid-9"
    assert line["service"] == "orchestrator" and line["task_id"] == "T-1"
