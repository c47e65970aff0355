"""`duragate call` and `duragate tasks` against a running gateway, as a person would use them."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.gateway.conftest import REPO_ROOT, GatewayProcess, child_env


def duragate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_call_prints_the_result_or_a_clear_error(shared_gateway: GatewayProcess) -> None:
    url = ("--url", shared_gateway.url)
    ok = duragate("call", "add", "--args", '{"a": 2, "b": 3}', *url)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == {"result": 5.0}
    unknown = duragate("call", "nope", *url)
    assert unknown.returncode == 1 and "unknown tool 'nope'" in unknown.stderr
    bad = duragate("call", "add", "--args", '{"a": "x", "b": 1}', *url)
    assert bad.returncode == 1 and "a: 'x' is not of type 'number'" in bad.stderr
    not_json = duragate("call", "add", "--args", "{nope", *url)
    assert not_json.returncode == 2 and "--args" in not_json.stderr


def test_tasks_round_trip(shared_gateway: GatewayProcess) -> None:
    url = ("--url", shared_gateway.url)
    started = duragate(
        "call", "slow_echo", "--args", '{"text": "t", "seconds": 0.5}', "--task", *url
    )
    assert started.returncode == 0, started.stderr
    task_id = started.stdout.strip()
    shown = duragate("tasks", "show", task_id, *url)
    assert json.loads(shown.stdout)["taskId"] == task_id
    result = duragate("tasks", "result", task_id, *url)
    assert result.returncode == 0 and json.loads(result.stdout) == {"result": "t"}
    listed = duragate("tasks", "list", *url)
    assert task_id[:12] in listed.stdout

    long = duragate("call", "slow_echo", "--args", '{"text": "t", "seconds": 30}', "--task", *url)
    cancelled = duragate("tasks", "cancel", long.stdout.strip(), *url)
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    missing = duragate("tasks", "show", "no-such-task", *url)
    assert missing.returncode == 1 and "no task" in missing.stderr


def test_unreachable_gateway_is_a_clear_error() -> None:
    result = duragate("call", "add", "--url", "http://127.0.0.1:9/mcp")
    assert result.returncode == 1
    assert "cannot reach a gateway at http://127.0.0.1:9/mcp" in result.stderr
