"""Logging: stdlib `logging`, configured once per process by the CLI.

Two formats:
- `console`: human-readable lines on stderr, through rich's `RichHandler` on a terminal and as
  plain `time level logger: message` lines otherwise (files, pipes: cheaper, and greppable);
- `json`: one JSON object per line on stderr with `timestamp`, `level`, `logger`, `message`,
  every field passed through `extra=`, and `exc_info` when there is a traceback.

Secrets never reach the output: values registered with `register_secret` (the CLI registers
`DAPR_API_TOKEN`) are replaced by `***` in the fully formatted line, whatever put them there.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import sys
import threading
from typing import IO, Any, Literal

from rich.console import Console
from rich.logging import RichHandler

LogFormat = Literal["console", "json"]
LEVELS = ("debug", "info", "warning", "error")
REDACTED = "***"

_MARK = "_duragate_handler"
_secrets: set[str] = set()
_secrets_lock = threading.Lock()

# Attributes every LogRecord has; anything else on a record came from `extra=`.
# uvicorn adds `color_message`, a copy of the message with ANSI colours: not a field.
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "taskName", "color_message"}
# Libraries whose INFO lines say nothing a user needs ("Started server process ...").
# Libraries whose info lines are per-request noise; shown again at debug level.
_QUIET_AT_INFO = (
    "uvicorn",
    "uvicorn.error",
    "uvicorn.access",
    "httpx",
    "mcp.server.lowlevel.server",
    "mcp.server.streamable_http",
    "mcp.server.streamable_http_manager",
    "durabletask-worker",
    "durabletask-client",
    "WorkflowRuntime",
    "DaprWorkflowClient",
)


class _KnownBenignErrors(logging.Filter):
    """Drops an error the mcp SDK logs when a client ends its session while its standalone
    SSE stream is open (the stream was closed on purpose; nothing failed)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.name == "mcp.server.streamable_http"
            and record.getMessage().startswith("Error in standalone SSE writer")
            and record.exc_info is not None
            and type(record.exc_info[1]).__name__ == "ClosedResourceError"
        )


def register_secret(value: str | None) -> None:
    """Never print `value` in a log line. Short values (under 4 characters) are ignored so that
    redaction cannot mangle ordinary words; tokens are longer than that."""
    if value and len(value) >= 4:
        with _secrets_lock:
            _secrets.add(value)


def redact(text: str) -> str:
    """Replace every registered secret in `text` with `***`."""
    with _secrets_lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a call passed through `extra=`."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}


class ConsoleFormatter(logging.Formatter):
    """The message, then `key=value` for each extra field; secrets redacted."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = extra_fields(record)
        if extras:
            text += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return redact(text)


class JsonFormatter(logging.Formatter):
    """One JSON object per record; secrets redacted."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": _dt.datetime.fromtimestamp(record.created, tz=_dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in extra_fields(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return redact(json.dumps(entry, default=str, ensure_ascii=False))


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def configure_logging(
    level: str = "info", fmt: LogFormat = "console", *, stream: IO[str] | None = None
) -> None:
    """Install Duragate's handler on the root logger (replacing one installed earlier).

    `level` is one of debug/info/warning/error. Output goes to `stream`, default stderr.
    """
    if level.lower() not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
    out = sys.stderr if stream is None else stream
    handler: logging.Handler
    if fmt == "json":
        handler = logging.StreamHandler(out)
        handler.setFormatter(JsonFormatter())
    elif fmt == "console" and not _is_terminal(out):
        # Not a terminal (a file, a pipe, a service manager): plain lines. Rich renders each
        # record as a table row, which costs about a millisecond: too much on a path that logs
        # once per call.
        handler = logging.StreamHandler(out)
        handler.setFormatter(ConsoleFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    elif fmt == "console":
        handler = RichHandler(
            console=Console(file=out, soft_wrap=True),
            show_path=False,
            markup=False,
            rich_tracebacks=False,  # tracebacks go through the formatter, so they are redacted
            log_time_format="[%X]",
        )
        handler.setFormatter(ConsoleFormatter("%(message)s"))
    else:
        raise ValueError(f"log format must be 'console' or 'json', not {fmt!r}")
    setattr(handler, _MARK, True)
    handler.addFilter(_KnownBenignErrors())

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _MARK, False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    quiet = level.lower() == "info"
    for name in _QUIET_AT_INFO:
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.NOTSET)
    logging.captureWarnings(True)
