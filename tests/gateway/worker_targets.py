"""Tools for the worker-app tests: served by `duragate worker`, never loaded by the gateway.

On import this module appends the importing process's pid to the file named by
DURAGATE_TEST_IMPORTS: the tests check that only worker processes ever imported it.
"""

from __future__ import annotations

import os
from typing import Any

from examples.graphs import build_pipeline

IMPORTS_ENV = "DURAGATE_TEST_IMPORTS"


def _record_import() -> None:
    path = os.environ.get(IMPORTS_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()}\n")


_record_import()


def whereami(text: str) -> dict[str, Any]:
    """Answers with the pid of the process that ran it."""
    return {"pid": os.getpid(), "text": text.upper()}


# The example pipeline (outline -> draft -> finish; DURAGATE_EXAMPLE_HOLD holds it in `draft`),
# built here so that loading it records the import.
pipeline = build_pipeline()
