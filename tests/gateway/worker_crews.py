"""A crew for the worker-app tests: served by `duragate worker`, never loaded by the gateway.

Like `tests.gateway.worker_targets`, it appends the importing process's pid to the file named by
DURAGATE_TEST_IMPORTS. A module of its own: CrewAI may be imported only once the crewai adapter
has set its environment, which happens when a crewai tool is loaded.
"""

from __future__ import annotations

import os

from examples.crews import research_crew

IMPORTS_ENV = "DURAGATE_TEST_IMPORTS"

_path = os.environ.get(IMPORTS_ENV)
if _path:
    with open(_path, "a", encoding="utf-8") as f:
        f.write(f"{os.getpid()}\n")

__all__ = ["research_crew"]
