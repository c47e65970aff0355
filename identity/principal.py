"""Who is calling: the identity every call carries from the front door into the workflow."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Principal:
    """A caller: its SPIFFE ID, the tenant it belongs to, how that was proved, and the chain of
    callers when an agent acts for someone else (outermost first)."""

    id: str
    tenant: str
    via: str
    chain: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "tenant": self.tenant, "via": self.via, "chain": list(self.chain)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Principal:
        return cls(
            id=str(data["id"]),
            tenant=str(data["tenant"]),
            via=str(data["via"]),
            chain=tuple(str(c) for c in data.get("chain", ())),
        )


# The caller when the configuration allows anonymous calls (`identity.allow_anonymous`).
ANONYMOUS = Principal(id="spiffe://duragate.local/anonymous", tenant="default", via="anonymous")
