"""Every CEL and decision table runs against both CEL backends (`policies.cel.BACKENDS`)."""

from __future__ import annotations

import pytest

from policies.cel import BACKENDS, CelBackend, get_backend


@pytest.fixture(params=BACKENDS, scope="module")
def cel(request: pytest.FixtureRequest) -> CelBackend:
    return get_backend(request.param)
