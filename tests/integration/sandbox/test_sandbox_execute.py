"""Execute through real gRPC against the real service (bwrap): what comes back for passing, failing and broken
code, for scripts, and which requests are refused (INVALID_ARGUMENT naming the field)."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from sandbox_service import PASSING, script, suite

from fleet.sandbox.v1 import sandbox_pb2 as pb
from services.common.errors import InvalidArgument
from services.common.execution import Execution, Outcome

pytestmark = pytest.mark.integration

SOLUTION = "def slugify(text):\n    return text.lower().replace(' ', '-')\n"
TESTS = """\
from solution import slugify


def test_spaces():
    assert slugify("Hello World") == "hello-world"


def test_lower():
    assert slugify("ABC") == "abc"


def test_underscores():
    assert slugify("a_b c") == "a-b-c"
"""


async def test_a_passing_run_reports_each_case(client):
    result = await client.execute(PASSING)
    assert result.outcome == Outcome.PASSED, result
    assert (result.exit_code, result.isolation, result.reason) == (0, "bwrap", "1 test passed")
    assert [(c.name, c.outcome, c.message) for c in result.tests.cases] == [("test_add.py::test_add", "passed", "")]
    assert "1 passed" in result.stdout and 0 < result.duration_ms < 10_000


async def test_a_failing_run_names_the_case_and_its_assertion(client):
    result = await client.execute(suite(TESTS, SOLUTION))
    assert result.outcome == Outcome.FAILED and result.exit_code == 1, result
    assert (result.tests.passed, result.tests.failed) == (2, 1)
    outcomes = {c.name: c.outcome for c in result.tests.cases}
    assert outcomes == {
        "test_task.py::test_spaces": "passed",
        "test_task.py::test_lower": "passed",
        "test_task.py::test_underscores": "failed",
    }
    failed = next(c for c in result.tests.cases if c.outcome == "failed")
    assert "assert 'a_b-c' == 'a-b-c'" in failed.message, failed.message
    assert result.reason.startswith("1 of 3 tests failed; first: test_task.py::test_underscores: AssertionError")


async def test_tests_in_a_folder_import_the_solution_from_the_work_dir(client):
    execution = Execution(files={"solution.py": SOLUTION}, test_files={"tests/test_slug.py": TESTS})
    result = await client.execute(execution)
    assert result.outcome == Outcome.FAILED and result.tests.passed == 2, result
    assert result.tests.cases[0].name == "tests/test_slug.py::test_spaces"


@pytest.mark.parametrize(
    ("solution", "expected"),
    [
        ("def slugify(text)\n    return text\n", "SyntaxError"),
        ("import not_a_module_anywhere\n", "ModuleNotFoundError: No module named 'not_a_module_anywhere'"),
    ],
)
async def test_code_that_does_not_import_is_an_error(client, solution, expected):
    result = await client.execute(suite(TESTS, solution))
    assert result.outcome == Outcome.ERROR and result.exit_code == 2, result
    assert result.reason.startswith("the tests could not be collected: test_task.py: "), result.reason
    assert expected in result.reason
    [case] = result.tests.cases
    assert (case.name, case.outcome) == ("test_task.py", "error") and expected in case.message


async def test_zero_tests_is_an_error(client):
    result = await client.execute(suite("def helper():\n    return 1\n"))
    assert result.outcome == Outcome.ERROR and result.exit_code == 5, result
    assert result.reason == "no tests were collected from test_task.py"


async def test_only_skipped_tests_is_an_error(client):
    body = "import pytest\n\n\n@pytest.mark.skip(reason='later')\ndef test_x():\n    pass\n"
    result = await client.execute(suite(body))
    assert result.outcome == Outcome.ERROR, result
    assert result.reason == "no test ran: all 1 test were skipped"
    assert [(c.outcome, c.message) for c in result.tests.cases] == [("skipped", "Skipped: later")]


async def test_an_entrypoint_that_exits_0_passes(client):
    result = await client.execute(script("print('hello from main')\n"))
    assert result.outcome == Outcome.PASSED and result.exit_code == 0, result
    assert result.stdout == "hello from main\n" and result.reason == "main.py exited with code 0"


async def test_an_entrypoint_that_exits_3_fails_with_its_code(client):
    result = await client.execute(script("import sys\nprint('bad input', file=sys.stderr)\nsys.exit(3)\n"))
    assert result.outcome == Outcome.FAILED and result.exit_code == 3, result
    assert result.reason == "main.py exited with code 3: bad input"


async def test_an_entrypoint_that_raises_fails_with_the_exception(client):
    files = {"main.py": "from helper import div\nprint(div(1, 0))\n", "helper.py": "def div(a, b):\n    return a / b\n"}
    result = await client.execute(Execution(files=files, entrypoint="main.py"))
    assert result.outcome == Outcome.FAILED and result.exit_code == 1, result
    assert result.reason == "main.py exited with code 1: ZeroDivisionError: division by zero"
    assert 'helper.py", line 2, in div' in result.stderr


# --- refused requests -------------------------------------------------------------------------------------------


def field_of(err: grpc.aio.AioRpcError) -> str:
    status = status_pb2.Status.FromString(dict(err.trailing_metadata())["grpc-status-details-bin"])
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    return bad.field_violations[0].field


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"files": {"../x.py": ""}, "entrypoint": "../x.py"}, "files['../x.py']"),
        ({"files": {"/etc/x.py": ""}, "entrypoint": "/etc/x.py"}, "files['/etc/x.py']"),
        ({"files": {"a.py": ""}, "test_files": {"t/../../x.py": ""}}, "test_files['t/../../x.py']"),
        ({"test_files": {"test_a.py": ""}, "timeout_seconds": 60.5}, "timeout_seconds"),
        ({"test_files": {"test_a.py": ""}, "timeout_seconds": -1}, "timeout_seconds"),
        ({"test_files": {"test_a.py": ""}, "memory_mb": 10}, "memory_mb"),
        ({"files": {"a.py": ""}, "entrypoint": "b.py"}, "entrypoint"),
        ({"files": {"a.py": ""}, "test_files": {"test_a.py": ""}, "entrypoint": "a.py"}, "entrypoint"),
        ({"files": {"a.py": ""}}, "test_files"),
        ({"test_files": {"test_a.py": ""}, "language": "rust"}, "language"),
    ],
)
async def test_a_bad_request_is_invalid_argument_naming_the_field(stub, request_fields, field):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Execute(pb.ExecuteRequest(**{"language": "python", **request_fields}))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert field_of(info.value) == field
    assert info.value.details().startswith(f"{field}: ")


async def test_the_client_raises_invalid_argument_naming_the_field(client):
    with pytest.raises(InvalidArgument) as info:
        await client.execute(Execution(test_files={"test_a.py": ""}, timeout_seconds=61))
    assert (info.value.field, info.value.description) == ("timeout_seconds", "must be > 0 and <= 60, got 61.0")
