"""Who may use the admin API and the dashboard, and over which tenants.

Two ways to be an admin:
- a **global admin**: the caller's SPIFFE ID matches a pattern of `admin.principals` in
  gateway.yaml; it sees every tenant;
- a **tenant admin**: the caller's tenant has a policy file whose `admins:` names it (and it is a
  member of that tenant); it sees that tenant only.

The anonymous principal (`identity.allow_anonymous`) counts only when the gateway listens on
loopback: the demo makes it an admin so the dashboard works without credentials, and the same
file served on a network address must not hand the admin role to everyone. A delegated caller
(an agent acting for someone, `Principal.chain`) is never an admin: the admin role is not
something one hands on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from gateway.config import GatewayConfig
from identity.authenticate import VIA_ANONYMOUS
from identity.principal import Principal
from identity.spiffe_id import SpiffeId, SpiffeIdError, SpiffeIdPattern
from policies.loader import LoadedPolicy


class PolicySource(Protocol):
    def get(self, tenant: str) -> LoadedPolicy | None: ...


class NotAdmin(Exception):
    """The caller is authenticated but is no admin; `reason` says why (for the 403 body)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class AdminScope:
    """An admin and the tenants it may see: all of them (`tenants is None`) or some."""

    principal: Principal
    tenants: frozenset[str] | None

    @property
    def is_global(self) -> bool:
        return self.tenants is None

    def sees(self, tenant: str) -> bool:
        return self.tenants is None or tenant in self.tenants

    def describe(self) -> str:
        if self.tenants is None:
            return "every tenant"
        return "tenant " + ", ".join(sorted(self.tenants))


def _parse(spiffe_id: str) -> SpiffeId | None:
    try:
        return SpiffeId.parse(spiffe_id)
    except SpiffeIdError:
        return None


def admin_scope(
    principal: Principal,
    config: GatewayConfig,
    policies: PolicySource | None,
    *,
    loopback: bool,
) -> AdminScope:
    """The scope of `principal` as an admin, or `NotAdmin` with the reason."""
    if principal.chain:
        raise NotAdmin(
            f"{principal.id} acts for {principal.chain[0]}: admin requests cannot be delegated"
        )
    if principal.via == VIA_ANONYMOUS and not loopback:
        raise NotAdmin(
            "anonymous callers are never admins on a non-loopback listener; "
            "authenticate (JWT-SVID bearer token or client certificate)"
        )
    sid = _parse(principal.id)
    if sid is None:
        raise NotAdmin(f"{principal.id!r} is not a SPIFFE ID")
    for text in config.admin.principals:
        if SpiffeIdPattern.parse(text).matches(sid):
            return AdminScope(principal, None)
    policy = policies.get(principal.tenant) if policies is not None else None
    if policy is not None and policy.members.admits(sid) and policy.admins.admits(sid):
        return AdminScope(principal, frozenset({principal.tenant}))
    where = "admin.principals in the gateway config"
    if policies is not None:
        where += f" nor `admins` in the policy of tenant {principal.tenant!r}"
    raise NotAdmin(f"{principal.id} is not an admin: neither {where} names it")
