"""`fleet eval`'s command line: what it refuses before touching any server, and saying why."""

from __future__ import annotations

from typer.testing import CliRunner

from services import cli

ENDPOINTS = [
    "--llm-url",
    "http://127.0.0.1:9",
    "--llm-model",
    "m",
    "--orchestrator",
    "127.0.0.1:9",
    "--sandbox",
    "127.0.0.1:9",
]


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli.app, ["eval", *args])
    return result.exit_code, " ".join(result.output.split())


def test_unknown_modes_are_refused(tmp_path):
    code, said = invoke("--modes", "single,debate", "--output", str(tmp_path), *ENDPOINTS)
    assert (
        code == 2 and "--modes: unknown debate; choose from single, self-consistency, council, council-no-exec" in said
    )


def test_a_missing_dataset_file_is_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    code, said = invoke("--dataset", str(missing), "--output", str(tmp_path / "out"), *ENDPOINTS)
    assert code == 1 and f"error: dataset {missing}: no such file" in said


def test_missing_endpoints_are_named_with_their_option_and_variable(tmp_path, monkeypatch):
    for var in ("VLLM_URL", "VLLM_MODEL", "ORCHESTRATOR_ADDRESS", "SANDBOX_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    code, said = invoke("--output", str(tmp_path / "out"), "--base-dir", str(tmp_path / "no-fleet"), "--llm-model", "m")
    assert code == 1 and "no llm_url, sandbox, orchestrator: give --llm-url (or VLLM_URL)" in said, said


def test_match_budget_needs_the_council(tmp_path):
    code, said = invoke("--modes", "single,self-consistency", "--match-budget", "--output", str(tmp_path), *ENDPOINTS)
    assert code == 1 and "--match-budget takes k from the council's measured tokens: add council to --modes" in said
