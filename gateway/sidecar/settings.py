"""Settings of the embedded sidecar."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator

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


# A Dapr component name (a Kubernetes resource name: lower-case DNS subdomain).
COMPONENT_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")


def check_component_name(name: str) -> str:
    if not COMPONENT_NAME_RE.fullmatch(name):
        raise ValueError(
            f"{name!r} is not a Dapr component name: lower-case letters, digits, '-' and '.', "
            "starting and ending with a letter or digit"
        )
    return name


class SidecarSettings(BaseModel):
    """Everything the sidecar needs to start. Addresses are `host:port` (port 0 picks a free one)
    or, for gRPC, `unix:///absolute/path`."""

    model_config = ConfigDict(extra="forbid")

    db_path: Path
    grpc_listen: str = "127.0.0.1:50001"
    http_listen: str | None = "127.0.0.1:3500"
    api_token: SecretStr | None = None
    app_id: str = "duragate"
    # Further Dapr apps served over the same store, app id -> gRPC listen address. A worker
    # belongs to the app whose address it connects to (the Dapr SDK's worker does not say
    # which app it is): one address per app, as with one daprd per app.
    apps: dict[str, str] = Field(default_factory=dict)
    state_store_name: str = "statestore"
    # Further state store components, each a key space of its own in the same database (on
    # daprd: one component each), listed by the metadata API; only `state_store_name` holds
    # workflow (actor) state. For apps that look components up by name (Dapr Agents:
    # `agent-workflow`, `agent-memory`, `agent-registry`).
    state_stores: list[str] = Field(default_factory=list)
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

    @field_validator("state_stores")
    @classmethod
    def _check_state_stores(cls, names: list[str], info: ValidationInfo) -> list[str]:
        seen = {info.data.get("state_store_name")}
        for name in names:
            check_component_name(name)
            if name in seen:
                raise ValueError(f"state store {name!r} is declared twice")
            seen.add(name)
        return names

    @field_validator("apps")
    @classmethod
    def _check_apps(cls, apps: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        own_app, own_listen = info.data.get("app_id"), info.data.get("grpc_listen")
        seen = {own_listen: own_app}
        for app, listen in apps.items():
            if not app or any(c.isspace() or c == "=" for c in app):
                raise ValueError(f"app id {app!r} must be non-empty, without spaces or '='")
            if app == own_app:
                raise ValueError(f"app {app!r} is the sidecar's own app id (app_id)")
            cls._check_address(listen)
            if listen in seen and not listen.endswith(":0"):
                raise ValueError(f"apps {seen[listen]!r} and {app!r} both listen on {listen}")
            seen[listen] = app
        return apps

    def app_listeners(self) -> dict[str, str]:
        """Every app id served, with its gRPC listen address; the sidecar's own app first."""
        return {self.app_id: self.grpc_listen, **self.apps}

    def require_token(self) -> bool:
        """An API token is mandatory unless every listener is loopback or a unix socket."""
        listeners = [*self.app_listeners().values()]
        listeners += [self.http_listen] if self.http_listen else []
        return not all(is_local_address(a) for a in listeners)
