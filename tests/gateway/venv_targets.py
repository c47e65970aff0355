"""A tool for `tests/gateway/test_worker_venv.py`, run by a `duragate worker` in a venv of its own:
it says which interpreter and environment ran it, and which `six` that environment has (a version
other than the gateway's)."""

from __future__ import annotations

import os
import sys

import six


def where() -> dict[str, str | int]:
    """Which Python environment ran this call."""
    return {
        "prefix": sys.prefix,
        "executable": sys.executable,
        "six": six.__version__,
        "pid": os.getpid(),
    }
