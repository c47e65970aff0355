"""Settings of the embedded sidecar."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

MiB = 1024 * 1024


def is_local_address(address: str) -> bool:
    """True for a unix socket or a loopback host: where no API token is required."""
    if address.startswith("unix:") or address.startswith("unix-abstract:"):
        return True
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class SidecarSettings(BaseModel):
    """Everything the sidecar needs to start. Addresses are `host:port` (port 0 picks a free one)
    or, for gRPC, `unix:///absolute/path`."""

    model_config = ConfigDict(extra="forbid")

    db_path: Path
    grpc_listen: str = "127.0.0.1:50001"
    http_listen: str | None = "127.0.0.1:3500"
    api_token: SecretStr | None = None
    app_id: str = "duragate"
    state_store_name: str = "statestore"
    max_payload_bytes: int = Field(default=4 * MiB, ge=1024)
    synchronous: Literal["FULL", "NORMAL"] = "FULL"
    # A workflow turn dispatched to a worker that neither completes it nor closes its stream
    # within this time goes back on the queue (its late completion is then ignored).
    turn_lock_seconds: float = Field(default=300.0, gt=0)
    # StartInstance answers once the first turn has committed (as daprd does), waiting at
    # most this long; 0 answers as soon as the instance is stored.
    start_wait_seconds: float = Field(default=5.0, ge=0)
    # Live (unfinished) instances held at once; a start beyond it is refused, not queued.
    max_live_instances: int = Field(default=200_000, ge=1)
    # Send workers only the history they have not cached, when they offer that capability.
    stateful_history: bool = True

    @field_validator("grpc_listen", "http_listen")
    @classmethod
    def _check_address(cls, value: str | None) -> str | None:
        if value is None or value.startswith("unix://"):
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{value!r} is not HOST:PORT (or unix:///path for gRPC)")
        return value

    def require_token(self) -> bool:
        """An API token is mandatory unless every listener is loopback or a unix socket."""
        listeners = [self.grpc_listen] + ([self.http_listen] if self.http_listen else [])
        return not all(is_local_address(a) for a in listeners)
