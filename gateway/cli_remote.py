"""CLI commands that talk to a running gateway: `duragate call` and `duragate tasks ...`."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Coroutine
from typing import Annotated, Any, TypeVar

import httpx
import typer
from mcp import types
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from gateway import remote

T = TypeVar("T")
URL_OPTION = typer.Option("--url", envvar="DURAGATE_URL", help="The gateway's MCP endpoint.")
err = Console(stderr=True)
out = Console()

tasks_app = typer.Typer(help="Tasks (long calls) of a running gateway.", no_args_is_help=True)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    # The HTTP client's per-request lines are noise on a command line.
    for name in ("httpx", "mcp"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        return asyncio.run(coro)
    except remote.RemoteError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None


def _parse_args(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise typer.BadParameter(f"not JSON: {exc}", param_hint="'--args'") from None
    if not isinstance(value, dict):
        raise typer.BadParameter("must be a JSON object", param_hint="'--args'")
    return value


def _print_result(result: types.CallToolResult) -> None:
    payload = remote.render(remote.result_payload(result))
    if result.isError:
        err.print(f"[red]the tool failed:[/] {payload}")
        raise typer.Exit(1)
    print(payload)


def call(
    tool: Annotated[str, typer.Argument(help="The tool's name.")],
    args: Annotated[str, typer.Option("--args", help="Arguments as a JSON object.")] = "{}",
    url: Annotated[str, URL_OPTION] = remote.DEFAULT_URL,
    task: Annotated[
        bool, typer.Option("--task", help="Start it as a task and print the task id.")
    ] = False,
    idempotency_key: Annotated[
        str | None,
        typer.Option("--idempotency-key", help="Same key, same arguments: the stored result."),
    ] = None,
) -> None:
    """Call a tool on a running gateway and print its result (or, with --task, its task id)."""
    arguments = _parse_args(args)
    if task:
        created = _run(remote.start_task(url, tool, arguments))
        print(created.taskId)
        return

    async def with_progress() -> types.CallToolResult:
        display = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=err,
            transient=True,
            disable=not err.is_terminal,
        )
        with display:
            bar = display.add_task(f"calling {tool}", total=None)

            async def on_progress(
                progress: float, total: float | None, message: str | None
            ) -> None:
                display.update(
                    bar, description=message or f"calling {tool}", total=total, completed=progress
                )

            return await remote.call_tool(
                url, tool, arguments, idempotency_key=idempotency_key, on_progress=on_progress
            )

    _print_result(_run(with_progress()))


@tasks_app.command("list")
def tasks_list(url: Annotated[str, URL_OPTION] = remote.DEFAULT_URL) -> None:
    """The tasks this caller may see."""
    tasks = _run(remote.list_tasks(url))
    table = Table("task", "status", "created", "message")
    for t in tasks:
        table.add_row(t.taskId, t.status, str(t.createdAt), t.statusMessage or "")
    out.print(table)


@tasks_app.command("show")
def tasks_show(
    task_id: Annotated[str, typer.Argument(help="The task id.")],
    url: Annotated[str, URL_OPTION] = remote.DEFAULT_URL,
) -> None:
    """A task's status."""
    task = _run(remote.get_task(url, task_id))
    print(json.dumps(task.model_dump(mode="json", exclude_none=True), indent=2))


@tasks_app.command("result")
def tasks_result(
    task_id: Annotated[str, typer.Argument(help="The task id.")],
    url: Annotated[str, URL_OPTION] = remote.DEFAULT_URL,
) -> None:
    """Wait for a task to finish and print its result."""
    _print_result(_run(remote.task_result(url, task_id)))


@tasks_app.command("cancel")
def tasks_cancel(
    task_id: Annotated[str, typer.Argument(help="The task id.")],
    url: Annotated[str, URL_OPTION] = remote.DEFAULT_URL,
) -> None:
    """Cancel a task: its workflow is terminated."""
    task = _run(remote.cancel_task(url, task_id))
    print(f"{task.taskId}: {task.status}")


@tasks_app.command("input")
def tasks_input(
    task_id: Annotated[str, typer.Argument(help="The task id.")],
    value: Annotated[str, typer.Option("--value", help="The input, as a JSON value.")],
    url: Annotated[str, URL_OPTION] = remote.DEFAULT_URL,
    token: Annotated[str | None, typer.Option("--token", envvar="DURAGATE_TOKEN")] = None,
) -> None:
    """Supply the input a task waits for (its status is input_required): it goes on."""
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise typer.BadParameter(f"not JSON: {exc}", param_hint="'--value'") from None
    _approvals_request(url, token, "POST", f"/tasks/{task_id}/input", json={"value": parsed})
    print(f"{task_id}: input supplied")


approvals_app = typer.Typer(
    help="Calls waiting for a person's approval, on a running gateway.", no_args_is_help=True
)
TOKEN_OPTION = typer.Option(
    "--token", envvar="DURAGATE_TOKEN", help="A bearer token (JWT-SVID) identifying you."
)


def _approvals_request(url: str, token: str | None, method: str, path: str, **kw: Any) -> Any:
    base = url.removesuffix("/mcp").rstrip("/")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.request(method, f"{base}{path}", headers=headers, timeout=30, **kw)
    except httpx.HTTPError as exc:
        err.print(f"[red]error:[/] cannot reach a gateway at {base}: {exc}")
        raise typer.Exit(1) from None
    body = (
        response.json()
        if response.headers.get("content-type", "").startswith("application/json")
        else {}
    )
    if response.status_code != 200:
        err.print(f"[red]error:[/] {body.get('message') or response.text}")
        raise typer.Exit(1)
    return body


@approvals_app.command("list")
def approvals_list(
    url: Annotated[str, URL_OPTION] = remote.DEFAULT_URL,
    token: Annotated[str | None, TOKEN_OPTION] = None,
) -> None:
    """The calls you may approve."""
    body = _approvals_request(url, token, "GET", "/approvals")
    table = Table("task", "tool", "waiting since", "message")
    for a in body["approvals"]:
        table.add_row(a["task_id"], a["tool"], a["created_at"], a["message"] or "")
    out.print(table)


def _decide(url: str, token: str | None, task_id: str, approve: bool, reason: str) -> None:
    path = f"/approvals/{task_id}"
    _approvals_request(url, token, "POST", path, json={"approve": approve, "reason": reason})
    print(f"{task_id}: {'approved' if approve else 'denied'}")


@approvals_app.command("approve")
def approvals_approve(
    task_id: Annotated[str, typer.Argument(help="The task id.")],
    reason: Annotated[str, typer.Option("--reason")] = "",
    url: Annotated[str, URL_OPTION] = remote.DEFAULT_URL,
    token: Annotated[str | None, TOKEN_OPTION] = None,
) -> None:
    """Approve a waiting call: it runs."""
    _decide(url, token, task_id, True, reason)


@approvals_app.command("deny")
def approvals_deny(
    task_id: Annotated[str, typer.Argument(help="The task id.")],
    reason: Annotated[str, typer.Option("--reason", help="Told to the caller.")],
    url: Annotated[str, URL_OPTION] = remote.DEFAULT_URL,
    token: Annotated[str | None, TOKEN_OPTION] = None,
) -> None:
    """Deny a waiting call: it fails with your reason."""
    _decide(url, token, task_id, False, reason)


def register(app: typer.Typer) -> None:
    app.command()(call)
    app.add_typer(tasks_app, name="tasks")
    app.add_typer(approvals_app, name="approvals")
