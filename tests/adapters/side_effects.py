"""A tool with a visible side effect, for the Duragate-to-Duragate tests of the `mcp` kind:
every run appends a line to the file named by `SIDE_EFFECTS_FILE`."""

from __future__ import annotations

import os
from typing import Annotated

from pydantic import Field


def record(note: Annotated[str, Field(description="What to record.")]) -> dict[str, object]:
    """Append `note` to the side-effect file; return it with how many lines the file has."""
    path = os.environ["SIDE_EFFECTS_FILE"]
    with open(path, "a") as f:
        f.write(note + "\n")
    with open(path) as f:
        runs = sum(1 for _ in f)
    return {"note": note, "runs": runs}
