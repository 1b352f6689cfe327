"""Hostile code against the real service (bwrap): each fault ends with a clear outcome within its limits, and
afterwards the service is healthy, nothing of the execution runs any more and the next execution passes."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import psutil
import pytest
from sandbox_service import PASSING, SECRET, SECRET_VAR, script, suite

from services.common.execution import Outcome

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
async def afterwards(sandbox, client):
    yield
    assert sandbox.leftovers() == []
    assert await sandbox.serving()
    after = await client.execute(PASSING)
    assert after.outcome == Outcome.PASSED, after


async def test_an_infinite_loop_times_out_at_the_wall_clock(client):
    result = await client.execute(suite("def test_forever():\n    while True:\n        pass\n", timeout_seconds=1.5))
    assert result.outcome == Outcome.TIMEOUT and result.exit_code == -9, result
    assert result.reason == "wall-clock limit of 1.5s reached; everything was killed"
    assert 1500 <= result.duration_ms < 3000


async def test_a_sleeping_child_left_behind_is_killed_with_its_execution(client):
    body = "import subprocess\n\n\ndef test_spawn():\n    subprocess.Popen(['sleep', '1000'], start_new_session=True)\n"
    result = await client.execute(suite(body))
    assert result.outcome == Outcome.PASSED, result  # `afterwards` proves that no sleep is left


async def test_a_fork_bomb_is_bounded_by_the_process_limit(client):
    host_processes = len(psutil.pids())
    body = "import os\n\n\ndef test_bomb():\n    while True:\n        os.fork()\n"
    result = await client.execute(suite(body, timeout_seconds=5))
    assert result.outcome in (Outcome.FAILED, Outcome.KILLED, Outcome.TIMEOUT), result
    assert result.reason and result.duration_ms < 6500
    if result.outcome == Outcome.FAILED:
        [case] = result.tests.cases
        assert "BlockingIOError" in case.message, case  # fork(): Resource temporarily unavailable
    assert len(psutil.pids()) < host_processes + 10


async def test_allocating_10_gb_fails_with_memory_error(client):
    result = await client.execute(suite("def test_big():\n    block = bytearray(10 * 1024**3)\n    assert block\n"))
    assert result.outcome == Outcome.FAILED, result
    assert result.tests.cases[0].message == "MemoryError"


async def test_writing_1_gb_fails_at_the_file_size_limit(client):
    body = (
        "def test_write():\n"
        "    with open('big.bin', 'wb') as f:\n"
        "        for _ in range(1024):\n"
        "            f.write(bytes(1 << 20))\n"
    )
    result = await client.execute(suite(body))
    assert result.outcome == Outcome.FAILED, result
    assert "File too large" in result.tests.cases[0].message, result.tests.cases


async def test_many_files_fill_only_the_size_limited_work_dir(client):
    body = (
        "def test_fill():\n"
        "    for i in range(100):\n"
        "        with open(f'part{i}.bin', 'wb') as f:\n"
        "            f.write(bytes(10 << 20))\n"
    )
    result = await client.execute(suite(body))
    assert result.outcome == Outcome.FAILED, result
    assert "No space left on device" in result.tests.cases[0].message, result.tests.cases


async def test_no_network_even_to_a_server_on_the_host_loopback(client):
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    port = server.getsockname()[1]
    body = f"import socket\n\n\ndef test_connect():\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
    try:
        result = await client.execute(suite(body))
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody came
    finally:
        server.close()
    assert result.outcome == Outcome.FAILED, result
    assert "ConnectionRefusedError" in result.tests.cases[0].message, result.tests.cases


async def test_etc_shadow_is_not_there(client):
    result = await client.execute(script("print(open('/etc/shadow').read())\n"))
    assert result.outcome == Outcome.FAILED, result
    assert result.reason.endswith("FileNotFoundError: [Errno 2] No such file or directory: '/etc/shadow'")
    assert "root:" not in result.stdout


async def test_the_service_environment_is_invisible(client):
    # Everything the code can see of environments: its own and every readable /proc/<pid>/environ and cmdline.
    code = (
        "import os\n"
        "print(sorted(os.environ.items()))\n"
        "for pid in [p for p in os.listdir('/proc') if p.isdigit()]:\n"
        "    for part in ('environ', 'cmdline'):\n"
        "        try:\n"
        "            print(pid, part, open(f'/proc/{pid}/{part}', 'rb').read())\n"
        "        except OSError as e:\n"
        "            print(pid, part, e)\n"
    )
    result = await client.execute(script(code))
    assert result.outcome == Outcome.PASSED and not result.truncated, result
    assert SECRET not in result.stdout and SECRET_VAR not in result.stdout
    assert "PYTHONPATH=/opt/sandbox-site" in result.stdout  # it did read an environ: its own


async def test_files_outside_the_work_dir_cannot_be_deleted(client, tmp_path: Path):
    keep = tmp_path / "keep.txt"
    keep.write_text("still here")
    code = (
        "import os, shutil\n"
        "errors = []\n"
        f"for attempt in (lambda: os.remove({str(keep)!r}), lambda: shutil.rmtree({str(tmp_path)!r}),\n"
        "                lambda: os.remove('/usr/bin/python3'), lambda: open('/usr/evil', 'w')):\n"
        "    try:\n"
        "        attempt()\n"
        "    except OSError as e:\n"
        "        errors.append(type(e).__name__)\n"
        "print(errors)\n"
    )
    result = await client.execute(script(code))
    assert result.outcome == Outcome.PASSED, result
    assert result.stdout.strip() == "['FileNotFoundError', 'FileNotFoundError', 'OSError', 'OSError']", result.stdout
    assert keep.read_text() == "still here"


async def test_output_flooding_is_cut_and_killed_at_the_hard_cap(client):
    result = await client.execute(script("while True:\n    print('x' * 1000)\n", timeout_seconds=20))
    assert result.outcome == Outcome.KILLED, result
    assert result.reason == "output limit reached: more than 4 MiB of output; everything was killed"
    assert result.truncated and len(result.stdout) == 16 * 1024 and result.duration_ms < 10_000


async def test_large_output_is_truncated_and_the_run_still_counts(client):
    code = "import sys\nprint('o' * 100_000)\nprint('e' * 50_000, file=sys.stderr)\n"
    result = await client.execute(script(code))
    assert result.outcome == Outcome.PASSED and result.truncated, result
    assert result.stdout == "o" * 16 * 1024 and result.stderr == "e" * 16 * 1024


async def test_the_limits_are_in_force_inside(client):
    code = (
        "import os, resource\n"
        "for name in ('CPU', 'AS', 'FSIZE', 'NOFILE', 'NPROC', 'CORE'):\n"
        "    print(name, *resource.getrlimit(getattr(resource, 'RLIMIT_' + name)))\n"
        "print('uid', os.getuid())\n"
    )
    result = await client.execute(script(code, timeout_seconds=4, memory_mb=256))
    assert result.outcome == Outcome.PASSED, result
    seen = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert seen["CPU"] == "5 6"  # ceil(timeout) + 1: SIGXCPU, then SIGKILL a second later
    assert (seen["AS"], seen["FSIZE"], seen["NOFILE"], seen["CORE"]) == (
        f"{256 << 20} {256 << 20}",
        f"{16 << 20} {16 << 20}",
        "256 256",
        "0 0",
    )
    if os.geteuid() == 0:  # root: a uid of the slot's own, so the process limit counts this execution alone
        assert seen["NPROC"] == "64 64" and int(seen["uid"]) in (210_000, 210_001, 210_002), seen
    else:
        assert int(seen["NPROC"].split()[0]) >= 64


async def test_the_code_cannot_raise_its_limits_back_to_the_warm_process_ceiling(client):
    """A slot's process is started ahead of its execution under the largest limits a request may have; the trusted
    script lowers them, soft and hard, before the code exists: the code cannot raise them again."""
    code = (
        "import resource\n"
        "for name in ('AS', 'CPU'):\n"
        "    which = getattr(resource, 'RLIMIT_' + name)\n"
        "    try:\n"
        "        resource.setrlimit(which, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))\n"
        "        print(name, 'raised')\n"
        "    except (ValueError, OSError) as e:\n"
        "        print(name, 'refused')\n"
        "try:\n"
        "    block = bytearray(300 << 20)\n"
        "    print('allocated')\n"
        "except MemoryError:\n"
        "    print('MemoryError')\n"
    )
    for _ in range(2):  # the first execution of a slot and the next (both on processes started ahead)
        result = await client.execute(script(code, timeout_seconds=4, memory_mb=128))
        assert result.outcome == Outcome.PASSED, result
        assert result.stdout.split() == ["AS", "refused", "CPU", "refused", "MemoryError"], result.stdout


async def test_cpu_time_past_the_limit_is_a_timeout(client):
    # The code lowers its own soft CPU limit (allowed) to meet it in a second whatever the machine's load.
    code = (
        "import resource\n"
        "resource.setrlimit(resource.RLIMIT_CPU, (1, resource.getrlimit(resource.RLIMIT_CPU)[1]))\n"
        "while True:\n"
        "    pass\n"
    )
    result = await client.execute(script(code, timeout_seconds=10))
    assert result.outcome == Outcome.TIMEOUT and result.exit_code == -24, result
    assert result.reason == "CPU-time limit of 11s reached (SIGXCPU)"


async def test_a_councils_three_executions_run_at_once_in_their_own_slots(client):
    code = "import os, time\nstart = time.time()\ntime.sleep(1)\nprint(start, time.time(), os.getuid())\n"
    results = await asyncio.gather(*(client.execute(script(code)) for _ in range(3)))
    assert [r.outcome for r in results] == [Outcome.PASSED] * 3, results
    runs = [r.stdout.split() for r in results]
    assert max(float(start) for start, _, _ in runs) < min(float(end) for _, end, _ in runs)  # all three overlapped
    if os.geteuid() == 0:
        assert {uid for _, _, uid in runs} == {"210000", "210001", "210002"}
