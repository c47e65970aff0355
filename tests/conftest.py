"""Shared test setup. Keep this file small: fixtures belong next to the tests that use them."""

from __future__ import annotations

from collections.abc import Iterator

# Imported now, not at the end of the session: hypothesis's pytest plugin imports it while
# printing the summary, pytest's assertion rewriting then parses it with ast, and there (with
# other threads still running) CPython 3.11.7 sometimes fails with "AST constructor recursion
# depth mismatch": seen about once in twelve runs, turning a green run red.
import hypothesis  # noqa: F401
import pytest

from tests.webhook import Webhook, serving_webhook

# Settings read from the environment by the `duragate` CLI. A developer's own values must not
# change what a test sees; a test that wants one sets it explicitly.
_DURAGATE_ENV = (
    "DURAGATE_DATA_DIR",
    "DURAGATE_LOG_LEVEL",
    "DURAGATE_LOG_FORMAT",
    "DURAGATE_CONFIG",
    "DURAGATE_HEALTH_LISTEN",
    "DURAGATE_URL",
    "DURAGATE_TOKEN",
)


@pytest.fixture(autouse=True)
def _isolate_duragate_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _DURAGATE_ENV:
        monkeypatch.delenv(name, raising=False)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--crash-seeds",
        type=int,
        default=None,
        help="seeds of the crash matrix (tests/test_crash_matrix.py) to run; default 1, or the "
        "environment variable DURAGATE_CRASH_SEEDS",
    )


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    """A local webhook that records push notifications (tests/webhook.py)."""
    with serving_webhook() as hook:
        yield hook
