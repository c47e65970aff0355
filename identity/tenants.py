"""Which tenant a caller belongs to: ordered rules over SPIFFE ID patterns, first match wins.

    rules = TenantRules.from_config(identity.tenants, require_rule=identity.require_tenant_rule)
    rules.tenant_of(SpiffeId.parse("spiffe://example.org/team-a/ci"))   # "team-a"

When no rule matches, the caller's trust domain names its tenant (`example.org`), so one trust
domain per tenant needs no rules at all. With `require_rule` a caller no rule names has no
tenant and is refused: the setting for gateways where a forgotten rule must not quietly put a
workload in a tenant of its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gateway.config import TENANT_NAME_RE, TenantRule
from identity.spiffe_id import SpiffeId, SpiffeIdPattern


class NoTenantError(LookupError):
    """The caller is authenticated but belongs to no tenant; the message says why."""


@dataclass(frozen=True)
class TenantRules:
    rules: tuple[tuple[SpiffeIdPattern, str], ...] = ()
    require_rule: bool = False

    @classmethod
    def from_config(cls, rules: Iterable[TenantRule], *, require_rule: bool) -> TenantRules:
        # The patterns were checked when the config loaded; parsed once here, not per request.
        parsed = tuple((SpiffeIdPattern.parse(r.match), r.tenant) for r in rules)
        return cls(parsed, require_rule)

    @classmethod
    def of(
        cls, rules: Sequence[tuple[str, str]] = (), *, require_rule: bool = False
    ) -> TenantRules:
        """From `(pattern, tenant)` pairs (tests, tools)."""
        return cls(tuple((SpiffeIdPattern.parse(p), t) for p, t in rules), require_rule)

    def tenant_of(self, spiffe_id: SpiffeId) -> str:
        """The tenant of `spiffe_id`, or `NoTenantError`."""
        for pattern, tenant in self.rules:
            if pattern.matches(spiffe_id):
                return tenant
        if self.require_rule:
            raise NoTenantError(
                f"{spiffe_id} belongs to no tenant: no identity.tenants rule matches it "
                "(identity.require_tenant_rule is true)"
            )
        domain = spiffe_id.trust_domain
        if not TENANT_NAME_RE.fullmatch(domain):
            # Legal trust domains such as `-x`, `x.` or `..` would make odd or unsafe tenant names.
            raise NoTenantError(
                f"{spiffe_id} belongs to no tenant: no identity.tenants rule matches it and its "
                f"trust domain {domain!r} cannot serve as a tenant name"
            )
        return domain
