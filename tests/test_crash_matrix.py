"""The crash matrix: every front door x every tool kind, SIGKILLed at a random point.

For each seed, one gateway serves one tool per cell (front door x kind; each tool does a few
steps over a couple of seconds, every step an observable, idempotent side effect: see
tests/crash_tools.py and tests/crash_crew.py). All cells start their call at offsets chosen by a
seeded RNG so that one crash lands at a random point inside each call's run; the crash SIGKILLs
the gateway, whose embedded engine runs inside it, and every process it started (every process
group, frozen first with SIGSTOP so that nothing runs on in one while another dies, as when a
machine stops; with `engine.sidecar: process` that includes the sidecar). Then a gateway restarts
on the same data directory and each cell checks that:

- the call completes with the right result (each step's value chains the previous one, so a
  resumed run that lost its saved state gives a wrong result);
- the result reaches the caller: MCP sync call, the call re-issued with the same idempotency key;
  MCP task, tasks/result from a new session (or the creation re-issued with its key, if the
  crash came before the task id was returned); A2A blocking, the same message resent (it
  replays) and GetTask; A2A streaming, SubscribeToTask (GetTask once the task has ended), and
  the push to a webhook;
- the call is recorded once: one workflow instance (no other in the engine), never two
  `scheduled` audit records (none is counted as `no-audit`: a crash the instant after the call
  was scheduled loses its queued record, a known gap that tests/test_crash_points.py pins down);
- side effects happened once for every step finished before the crash; only the step running
  at the crash may have run again (the python tool skips steps whose side effect is recorded;
  graphs and crews are checkpointed after each node or task).

CI runs one seed (all twelve cells in one gateway, one crash); `--crash-seeds N` (or the
environment variable DURAGATE_CRASH_SEEDS) runs seeds 0..N-1, each with its own gateway. The
counts per cell are printed at the end and written to `<pytest base temp>/crash-matrix.json`.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from a2a.types import GetTaskRequest, SubscribeToTaskRequest, Task, TaskPushNotificationConfig
from a2a.types import TaskState as A2AState
from google.protobuf.json_format import MessageToDict
from mcp import types

from gateway.mcp_front import IDEMPOTENCY_META, REPLAYED_META, TASK_ID_META
from tests.crash_tools import CREW_STEPS, STEPS, TRACE_DIR_ENV, Trace, expected_values
from tests.gateway.conftest import (
    REPO_ROOT,
    GatewayFactory,
    GatewayProcess,
    child_env,
    mcp_session,
)
from tests.gateway.test_a2a import ERRORS, a2a_client, message, send
from tests.webhook import Webhook

pytestmark = [
    pytest.mark.crash,
    pytest.mark.timeout(240),
    pytest.mark.filterwarnings("ignore:The experimental tasks API:DeprecationWarning"),
]

SEEDS_ENV = "DURAGATE_CRASH_SEEDS"
DOORS = ("mcp_sync", "mcp_task", "a2a_blocking", "a2a_streaming")
KINDS: dict[str, tuple[str, int]] = {  # kind -> (target, steps)
    "python": ("tests.crash_tools:steps", STEPS),
    "langgraph": ("tests.crash_tools:build_graph", STEPS),
    "crewai": ("tests.crash_crew:step_crew", CREW_STEPS),
}
PACE = 0.5  # seconds per step
# Roughly how long a call runs from its request (steps, plus scheduling and, for a crew,
# CrewAI's own work). Crash points are drawn from 0 to 1.15 times this: mostly inside a step,
# sometimes before the tool starts or after it has returned.
RUN_SECONDS = {"python": STEPS * PACE + 0.2, "langgraph": STEPS * PACE + 0.3}
RUN_SECONDS["crewai"] = CREW_STEPS * PACE + 0.6
RECOVERY_SECONDS = 90.0  # bound on every wait after the restart (shared, loaded machines)
CONNECT_SECONDS = 1.5  # time for the clients to connect before the first request is sent


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "seed" in metafunc.fixturenames:
        count = metafunc.config.getoption("crash_seeds", None) or int(
            os.environ.get(SEEDS_ENV) or 1
        )
        metafunc.parametrize("seed", range(count), ids=[f"seed{s}" for s in range(count)])


# --- processes ------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for tid in tasks:
        try:
            found += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for child in _children(todo.pop()):
            out.append(child)
            todo.append(child)
    return out


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"  # a zombie waiting for init: dead


class CrashableGateway(GatewayProcess):
    """A test gateway (tests.gateway.launcher) in a session of its own, so that its process
    group can be killed without the test's. Anything it starts in yet another session (the
    sidecar of `engine.sidecar: process`, gateway.runtime.SidecarProcess): `crash()` kills that
    group too."""

    def __init__(self, config: Path, data_dir: Path, log_path: Path) -> None:
        self.config = config
        self.data_dir = data_dir
        self.log_path = log_path
        self._log = log_path.open("ab")
        cmd = [sys.executable, "-m", "tests.gateway.launcher"]
        cmd += ["--config", str(config), "--data-dir", str(data_dir), "--port", "0"]
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=self._log,
            start_new_session=True,
        )
        self.url = self._wait_ready()
        self.base = self.url.removesuffix("/mcp")

    def crash(self) -> list[str]:
        """SIGKILL every process group of the gateway and its descendants, after freezing them
        all (SIGSTOP) so that none goes on alone. Returns the command lines of those killed."""
        pids = [self.proc.pid, *descendants(self.proc.pid)]
        commands = [_command(pid) for pid in pids]
        groups = set()
        for pid in pids:
            try:
                groups.add(os.getpgid(pid))
            except ProcessLookupError:
                continue
        assert os.getpgid(0) not in groups  # never the test's own group
        for group in groups:
            os.killpg(group, signal.SIGSTOP)
        for group in groups:
            os.killpg(group, signal.SIGKILL)
        self.proc.wait(15)
        deadline = time.monotonic() + 15
        while not all(_gone(pid) for pid in pids):
            assert time.monotonic() < deadline, f"processes {pids} outlived SIGKILL"
            time.sleep(0.02)
        return commands


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[GatewayFactory]:
    started = GatewayFactory(tmp_path, process=CrashableGateway)
    yield started
    started.stop_all()


# --- the cells ------------------------------------------------------------------------------


@dataclass
class Cell:
    door: str
    kind: str
    seed: int
    kill_after: float  # seconds into the call (from its request) at which the crash comes
    events: list[str] = field(default_factory=list)  # what happened, for failure messages
    task_id: str | None = None
    before: Trace | None = None  # the trace at the crash
    finished_before_crash: bool = False
    result: Any = None
    delivered_by: str = ""
    replayed: bool | None = None
    message_id: str = ""
    start_at: float = 0.0  # when (event loop time) the request is sent

    @property
    def tool(self) -> str:
        return f"{self.kind}_{self.door}"

    @property
    def run(self) -> str:
        return f"s{self.seed}-{self.kind}-{self.door}"

    @property
    def key(self) -> str:
        return f"crash-{self.run}"

    @property
    def steps(self) -> int:
        return KINDS[self.kind][1]

    def arguments(self) -> dict[str, Any]:
        pace: Any = str(PACE) if self.kind == "crewai" else PACE  # a crew's inputs are text
        return {"run": self.run, "pace": pace}

    def expected(self) -> Any:
        values = expected_values(self.run, self.steps)
        if self.kind == "crewai":
            return {"result": f"step {self.steps} value={values[-1]}"}
        return {"run": self.run, "values": values}

    def note(self, event: str) -> None:
        self.events.append(event)


def config_for(tmp: Path) -> Path:
    tools = []
    for kind, (target, _) in KINDS.items():
        for door in DOORS:
            tools.append(
                {
                    "name": f"{kind}_{door}",
                    "kind": kind,
                    "target": target,
                    "timeout_seconds": 120,
                    "task_support": "optional",
                }
            )
    config = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "identity": {"allow_anonymous": True},
        "limits": {"max_body_bytes": 65536, "max_wait_seconds": RECOVERY_SECONDS},
        "tools": tools,
        "a2a": {
            "blocking_wait_seconds": RECOVERY_SECONDS,
            "push": {"allowed_hosts": ["127.0.0.1"], "first_retry_seconds": 0.2},
        },
    }
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _mcp_value(result: types.CallToolResult) -> Any:
    assert not result.isError, result
    return result.structuredContent


def _a2a_value(task: Task) -> Any:
    assert task.status.state == A2AState.TASK_STATE_COMPLETED, task
    assert task.artifacts, task
    return MessageToDict(task.artifacts[0].parts[0].data)


def _a2a_message(cell: Cell) -> Any:
    msg = message(cell.tool, cell.arguments())
    if cell.message_id:
        msg.message_id = cell.message_id  # the same message, resent
    cell.message_id = msg.message_id
    return msg


# Before the crash: connect, send the request at the cell's moment, and follow the call as a
# client would, until the crash cuts it.


async def _at_start(cell: Cell) -> None:
    loop = asyncio.get_running_loop()
    late = loop.time() - cell.start_at
    if late > 0.05:  # connecting took longer than planned: the crash comes earlier in the call
        cell.note(f"sent {late:.2f} s late")
    await asyncio.sleep(max(0.0, cell.start_at - loop.time()))


async def start_mcp_sync(cell: Cell, gw: CrashableGateway, hook: Webhook) -> None:
    async with mcp_session(gw.url) as session:
        await _at_start(cell)
        cell.note("call sent")
        result = await session.call_tool(
            cell.tool, cell.arguments(), meta={IDEMPOTENCY_META: cell.key}
        )
        cell.task_id = (result.meta or {}).get(TASK_ID_META)
        cell.result = _mcp_value(result)
        cell.finished_before_crash = True


async def start_mcp_task(cell: Cell, gw: CrashableGateway, hook: Webhook) -> None:
    async with mcp_session(gw.url) as session:
        await _at_start(cell)
        cell.note("task call sent")
        created = await session.experimental.call_tool_as_task(
            cell.tool, cell.arguments(), meta={IDEMPOTENCY_META: cell.key}
        )
        cell.task_id = created.task.taskId
        while True:
            task = await session.experimental.get_task(cell.task_id)
            if task.status in ("completed", "failed", "cancelled"):
                cell.finished_before_crash = task.status == "completed"
                return
            await asyncio.sleep(0.2)


async def start_a2a_blocking(cell: Cell, gw: CrashableGateway, hook: Webhook) -> None:
    async with a2a_client(gw.base) as client:
        await _at_start(cell)
        cell.note("message sent (blocking)")
        events = [e async for e in client.send_message(send(_a2a_message(cell)))]
        task = [e.task for e in events if e.HasField("task")][-1]
        cell.task_id = task.id
        cell.result = _a2a_value(task)
        cell.finished_before_crash = True


def _push(hook: Webhook) -> TaskPushNotificationConfig:
    return TaskPushNotificationConfig(url=hook.url, token="crash-matrix")


async def start_a2a_streaming(cell: Cell, gw: CrashableGateway, hook: Webhook) -> None:
    async with a2a_client(gw.base, streaming=True) as client:
        await _at_start(cell)
        cell.note("message sent (streaming, with push)")
        async for event in client.send_message(send(_a2a_message(cell), push=_push(hook))):
            if event.HasField("task"):
                cell.task_id = event.task.id
            state = event.status_update.status.state if event.HasField("status_update") else None
            if state == A2AState.TASK_STATE_COMPLETED:
                cell.finished_before_crash = True


# After the restart: get the result delivered, through the door the call came in by.


async def recover_mcp_sync(cell: Cell, gw: CrashableGateway, hook: Webhook) -> None:
    async with mcp_session(gw.url) as session:
        result = await session.call_tool(
            cell.tool, cell.arguments(), meta={IDEMPOTENCY_META: cell.key}
        )
    meta = result.meta or {}
    assert cell.task_id in (None, meta.get(TASK_ID_META)), (cell.task_id, meta)
    cell.task_id = meta.get(TASK_ID_META)
    cell.replayed = bool(meta.get(REPLAYED_META))
    cell.result = _mcp_value(result)
    cell.delivered_by = "re-issued call (same idempotency key)"


async def recover_mcp_task(cell: Cell, gw: CrashableGateway, hook: Webhook) -> None:
    async with mcp_session(gw.url) as session:
        if cell.task_id is None:  # the crash came before the task id was returned
            created = await session.experimental.call_tool_as_task(
                cell.tool, cell.arguments(), meta={IDEMPOTENCY_META: cell.key}
            )
            cell.task_id = created.task.taskId
            cell.replayed = bool((created.meta or {}).get(REPLAYED_META))
            cell.delivered_by = "re-issued task call, then tasks/result"
        else:
            cell.delivered_by = "tasks/result from a new session"
        result = await session.experimental.get_task_result(cell.task_id, types.CallToolResult)
        task = await session.experimental.get_task(cell.task_id)
    assert task.status == "completed", task
    cell.result = _mcp_value(result)


async def recover_a2a_blocking(cell: Cell, gw: CrashableGateway, hook: Webhook) -> None:
    async with a2a_client(gw.base) as client:
        events = [e async for e in client.send_message(send(_a2a_message(cell)))]
        task = [e.task for e in events if e.HasField("task")][-1]
        assert cell.task_id in (None, task.id), (cell.task_id, task.id)
        cell.task_id = task.id
        got = await client.get_task(GetTaskRequest(id=task.id))
    assert _a2a_value(got) == _a2a_value(task)
    cell.result = _a2a_value(task)
    cell.delivered_by = "message resent (replayed), then GetTask"


async def recover_a2a_streaming(cell: Cell, gw: CrashableGateway, hook: Webhook) -> None:
    if cell.task_id is None:  # the crash came before the task was returned: resend
        async with a2a_client(gw.base, streaming=True) as client:
            request = send(_a2a_message(cell), push=_push(hook))
            events = [e async for e in client.send_message(request)]
        cell.task_id = events[0].task.id
        cell.delivered_by = "message resent on a stream"
    else:
        cell.delivered_by = "SubscribeToTask"
        async with a2a_client(gw.base, streaming=True) as client:
            try:
                events = [
                    e async for e in client.subscribe(SubscribeToTaskRequest(id=cell.task_id))
                ]
            except ERRORS as exc:  # it ended before the subscription: nothing to follow
                cell.note(f"subscribe refused: {exc}")
                events = []
                cell.delivered_by = "GetTask (ended before SubscribeToTask)"
        if events:
            states = [e.status_update.status.state for e in events if e.HasField("status_update")]
            assert states and states[-1] == A2AState.TASK_STATE_COMPLETED, events
    async with a2a_client(gw.base) as client:
        task = await client.get_task(GetTaskRequest(id=cell.task_id))
    cell.result = _a2a_value(task)
    # The push configured with the call reaches the webhook after the restart.
    await asyncio.to_thread(hook.wait_for, cell.task_id, "TASK_STATE_COMPLETED", RECOVERY_SECONDS)
    pushed = [
        body["task"]
        for _, body in hook.received
        if body.get("task", {}).get("id") == cell.task_id
        and body["task"]["status"]["state"] == "TASK_STATE_COMPLETED"
    ]
    assert MessageToDict(task)["artifacts"] == pushed[-1]["artifacts"], pushed[-1]
    cell.delivered_by += " + push"


Step = Callable[[Cell, CrashableGateway, Webhook], Awaitable[None]]
START: dict[str, Step] = {
    "mcp_sync": start_mcp_sync,
    "mcp_task": start_mcp_task,
    "a2a_blocking": start_a2a_blocking,
    "a2a_streaming": start_a2a_streaming,
}
RECOVER: dict[str, Step] = {
    "mcp_sync": recover_mcp_sync,
    "mcp_task": recover_mcp_task,
    "a2a_blocking": recover_a2a_blocking,
    "a2a_streaming": recover_a2a_streaming,
}


# --- the checks -----------------------------------------------------------------------------


def audit_records(data_dir: Path) -> list[dict[str, Any]]:
    path = data_dir / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def workflow_instances(data_dir: Path) -> list[str]:
    db = sqlite3.connect(f"file:{data_dir / 'engine.db'}?mode=ro", uri=True)
    try:
        return [row[0] for row in db.execute("SELECT instance_id FROM wf_instances")]
    finally:
        db.close()


@dataclass
class Outcome:
    passed: bool
    resumed_mid_step: bool
    replayed_steps: int
    phase: str  # where the crash hit the call: before-start | step N | after-end
    problems: list[str]
    audit_lost: bool = False  # no `scheduled` record: see check_cell


def check_cell(cell: Cell, trace_dir: Path, audit: list[dict[str, Any]]) -> Outcome:
    problems: list[str] = []
    expected = cell.expected()
    if cell.result != expected:
        problems.append(f"result {cell.result!r}, expected {expected!r}")
    scheduled = [r for r in audit if r.get("event") == "scheduled" and r.get("tool") == cell.tool]
    # Never twice. None at all happens when the crash comes the instant after the call was
    # scheduled: its record was still queued for the audit writer (a known gap, pinned down by
    # tests/test_crash_points.py); the call itself is one workflow instance (checked by the
    # test), so it is counted in the report, not failed.
    audit_lost = not scheduled
    if len(scheduled) > 1 or any(r.get("task") != cell.task_id for r in scheduled):
        problems.append(f"{len(scheduled)} `scheduled` audit records: {scheduled}")

    before = cell.before or Trace()
    if cell.replayed is False and before.begins:
        problems.append("the re-issued call was not a replay of the one that ran before")
    after = Trace.read(trace_dir / f"{cell.run}.log")
    steps = range(1, cell.steps + 1)
    values = expected_values(cell.run, cell.steps)
    for step in steps:
        if after.dones[step] < 1:
            problems.append(f"step {step} never finished")
        elif after.values[step] != values[step - 1]:
            problems.append(f"step {step} recorded value {after.values[step]}")
    # The step running at the crash may run again; every other step ran exactly once. For the
    # python tool a step whose side effect was recorded before the crash counts as finished
    # (it checks its own markers); graphs and crews save a step when the next one starts.
    running = before.last_begun()
    if cell.kind == "python" and before.dones[running]:
        running = 0
    for step in steps:
        allowed = 2 if step == running else 1
        if after.begins[step] > allowed or after.dones[step] > allowed:
            problems.append(
                f"step {step} ran {after.begins[step]} time(s), its side effect happened "
                f"{after.dones[step]} time(s) (step running at the crash: {running or 'none'})"
            )
    if not before.begins:
        phase = "before-start"
    elif cell.finished_before_crash:
        phase = "after-end"
    else:
        phase = f"step {before.last_begun()}"
    return Outcome(
        passed=not problems,
        resumed_mid_step=bool(running) and after.begins[running] > 1,
        replayed_steps=sum(after.begins.values()) - len(after.begins),
        phase=phase,
        problems=problems,
        audit_lost=audit_lost,
    )


# --- the report -----------------------------------------------------------------------------


@dataclass
class Report:
    rows: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    cells: list[dict[str, Any]] = field(default_factory=list)

    def add(self, cell: Cell, outcome: Outcome) -> None:
        row = self.rows.setdefault(
            (cell.door, cell.kind),
            {
                "door": cell.door,
                "kind": cell.kind,
                "seeds": 0,
                "passed": 0,
                "resumed_mid_step": 0,
                "replayed_steps": 0,
                "audit_lost": 0,
                "phases": {},
                "delivered_by": {},
            },
        )
        self.cells.append(
            {
                "seed": cell.seed,
                "door": cell.door,
                "kind": cell.kind,
                "crash_after_seconds": round(cell.kill_after, 3),
                "crash_point": outcome.phase,
                "task_id": cell.task_id,
                "delivered_by": cell.delivered_by,
                "replayed": cell.replayed,
                "passed": outcome.passed,
                "resumed_mid_step": outcome.resumed_mid_step,
                "replayed_steps": outcome.replayed_steps,
                "audit_lost": outcome.audit_lost,
                "problems": outcome.problems,
                "events": cell.events,
            }
        )
        row["seeds"] += 1
        row["passed"] += outcome.passed
        row["resumed_mid_step"] += outcome.resumed_mid_step
        row["replayed_steps"] += outcome.replayed_steps
        row["audit_lost"] += outcome.audit_lost
        row["phases"][outcome.phase] = row["phases"].get(outcome.phase, 0) + 1
        row["delivered_by"][cell.delivered_by] = row["delivered_by"].get(cell.delivered_by, 0) + 1

    def table(self) -> list[str]:
        head = f"{'front door':<14} {'kind':<10} {'seeds':>5} {'passed':>6} "
        head += f"{'mid-step':>8} {'replayed':>8} {'no-audit':>8}  crash points"
        lines = ["crash matrix: front door x kind", head]
        for row in self.rows.values():
            phases = ", ".join(f"{k}: {v}" for k, v in sorted(row["phases"].items()))
            lines.append(
                f"{row['door']:<14} {row['kind']:<10} {row['seeds']:>5} {row['passed']:>6} "
                f"{row['resumed_mid_step']:>8} {row['replayed_steps']:>8} "
                f"{row['audit_lost']:>8}  {phases}"
            )
        return lines


@pytest.fixture(scope="module")
def report(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Report]:
    collected = Report()
    yield collected
    if not collected.rows:
        return
    path = tmp_path_factory.getbasetemp() / "crash-matrix.json"
    summary = {"table": list(collected.rows.values()), "cells": collected.cells}
    path.write_text(json.dumps(summary, indent=2))
    lines = ["", *collected.table(), f"details: {path}"]
    capture = request.config.pluginmanager.getplugin("capturemanager")
    terminal = request.config.pluginmanager.getplugin("terminalreporter")
    if capture is not None and terminal is not None:
        with capture.global_and_fixture_disabled():
            for line in lines:
                terminal.write_line(line)
    else:
        print("\n".join(lines))


# --- the test -------------------------------------------------------------------------------


async def _run_until_crash(
    cells: list[Cell], gw: CrashableGateway, hook: Webhook, trace_dir: Path
) -> None:
    """Start each cell's call at its offset, crash the gateway when every cell has reached its
    kill point, and leave the clients to fail as the connection drops."""
    crash_at = max(c.kill_after for c in cells)
    loop = asyncio.get_running_loop()
    epoch = loop.time() + CONNECT_SECONDS  # every client connects first, then sends on time
    for cell in cells:
        cell.start_at = epoch + crash_at - cell.kill_after

    async def client(cell: Cell) -> None:
        try:
            await START[cell.door](cell, gw, hook)
        except Exception as exc:  # noqa: BLE001 - the crash cuts the call: expected
            cell.note(f"client before the crash: {type(exc).__name__}: {exc}")

    tasks = [asyncio.create_task(client(c)) for c in cells]
    await asyncio.sleep(max(0.0, epoch + crash_at - loop.time()))
    killed = await asyncio.to_thread(gw.crash)
    assert any("tests.gateway.launcher" in c for c in killed), f"no gateway among {killed}"
    for cell in cells:
        cell.before = Trace.read(trace_dir / f"{cell.run}.log")
    # Clients of a dead server: give them a moment to notice, then stop them.
    await asyncio.wait(tasks, timeout=5)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_crash_matrix(
    seed: int,
    gateways: GatewayFactory,
    webhook: Webhook,
    report: Report,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = random.Random(seed)
    trace_dir = tmp_path / "traces"
    trace_dir.mkdir()
    monkeypatch.setenv(TRACE_DIR_ENV, str(trace_dir))  # the gateways inherit it
    config, data = config_for(tmp_path), tmp_path / "data"
    cells = [
        Cell(door, kind, seed, kill_after=rng.uniform(0.0, 1.15 * RUN_SECONDS[kind]))
        for kind in KINDS
        for door in DOORS
    ]

    first = gateways(config, data)
    await _run_until_crash(cells, first, webhook, trace_dir)

    second = gateways(config, data)
    errors: dict[str, BaseException] = {}

    async def recover(cell: Cell) -> None:
        try:
            async with asyncio.timeout(RECOVERY_SECONDS):
                await RECOVER[cell.door](cell, second, webhook)
        except Exception as exc:  # noqa: BLE001 - reported per cell below
            errors[cell.tool] = exc

    await asyncio.gather(*(recover(c) for c in cells))
    log = second.log()
    second.stop()  # the audit log is complete once the gateway has stopped
    audit = audit_records(data)
    instances = workflow_instances(data)

    failures: list[str] = []
    for cell in cells:
        outcome = check_cell(cell, trace_dir, audit)
        if cell.tool in errors:
            outcome.passed = False
            outcome.problems.insert(0, f"no result delivered: {errors[cell.tool]!r}")
        report.add(cell, outcome)
        if not outcome.passed:
            failures.append(
                f"{cell.door} x {cell.kind} (seed {seed}, crash {cell.kill_after:.2f} s into "
                f"the call, at {outcome.phase}): {'; '.join(outcome.problems)}; "
                f"events: {cell.events}"
            )
    # One workflow instance per call, and none other.
    task_ids = sorted(c.task_id for c in cells if c.task_id)
    if sorted(instances) != task_ids:
        failures.append(f"workflow instances {sorted(instances)} != the calls' tasks {task_ids}")
    assert not failures, "\n".join(failures) + f"\nlast gateway log:\n{log}"
