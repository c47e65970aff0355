"""The agents the A2A front door exposes, and their agent cards.

Agents: the gateway itself (every tool, at `/a2a`), each group of tools in `a2a.agents`, and each
tool of an agent-like kind (or every tool, per `a2a.tools_as_agents`). A card is drawn for the
caller who asks: its skills are the tools that caller may call; its security schemes follow the
identity settings (JWT-SVID bearer tokens, mTLS client certificates).
"""

from __future__ import annotations

from typing import Protocol

from a2a.types import (
    AgentCapabilities,
    AgentCard,
    AgentExtension,
    AgentInterface,
    AgentProvider,
    AgentSkill,
    HTTPAuthSecurityScheme,
    MutualTlsSecurityScheme,
    OpenIdConnectSecurityScheme,
    SecurityRequirement,
    SecurityScheme,
    StringList,
)
from a2a.utils.constants import PROTOCOL_VERSION_CURRENT, TransportProtocol

from gateway import __version__
from gateway import a2a_render as render
from gateway.a2a_agents import AgentDef, agents_of
from gateway.config import GatewayConfig
from gateway.dispatch import Dispatcher
from identity.principal import Principal

DIRECTORY_EXTENSION = "https://duragate.dev/extensions/a2a-directory/v1"


class A2AHost(Protocol):
    """What the A2A front needs of the gateway, read per request (a reload shows)."""

    @property
    def config(self) -> GatewayConfig: ...

    @property
    def dispatcher(self) -> Dispatcher: ...


def _security(config: GatewayConfig) -> tuple[dict[str, SecurityScheme], list[SecurityRequirement]]:
    identity = config.identity
    schemes: dict[str, SecurityScheme] = {}
    audience = (
        identity.audience if isinstance(identity.audience, str) else ", ".join(identity.audience)
    )
    if identity.bundles:
        schemes["jwt_svid"] = SecurityScheme(
            http_auth_security_scheme=HTTPAuthSecurityScheme(
                scheme="Bearer",
                bearer_format="JWT",
                description=f"A JWT-SVID whose audience includes {audience}",
            )
        )
    for index, issuer in enumerate(identity.oauth):
        # Access tokens of an OAuth 2.1 authorization server (RFC 8414 metadata at the issuer).
        schemes[f"oauth{index}"] = SecurityScheme(
            open_id_connect_security_scheme=OpenIdConnectSecurityScheme(
                open_id_connect_url=(
                    issuer.issuer.rstrip("/") + "/.well-known/oauth-authorization-server"
                ),
                description=f"An access token of {issuer.issuer}",
            )
        )
    tls = config.listen.tls
    if tls is not None and tls.client_certs != "none":
        schemes["mtls"] = SecurityScheme(
            mtls_security_scheme=MutualTlsSecurityScheme(
                description="An X.509-SVID as the TLS client certificate"
            )
        )
    requirements = [SecurityRequirement(schemes={name: StringList()}) for name in schemes]
    return schemes, requirements


def build_card(
    host: A2AHost, agent: AgentDef, principal: Principal | None, base_url: str
) -> AgentCard:
    """The card of `agent` as `principal` sees it (None: a caller that proved nothing sees no
    skills, only how to authenticate)."""
    config = host.config
    base = base_url.rstrip("/")
    specs = host.dispatcher.tools_for(principal) if principal is not None else []
    skills = [
        AgentSkill(
            id=spec.name,
            name=spec.name,
            description=spec.description or spec.name,
            tags=[spec.kind],
            input_modes=["application/json", "text/plain"],
            output_modes=["application/json", "text/plain"],
        )
        for spec in specs
        if agent.offers(spec.name)
    ]
    schemes, requirements = _security(config)
    card = AgentCard(
        name=agent.name or "duragate",
        description=agent.description,
        version=__version__,
        provider=AgentProvider(organization="Duragate", url=base or "http://localhost"),
        supported_interfaces=[
            AgentInterface(
                url=f"{base}{agent.path}",
                protocol_binding=TransportProtocol.JSONRPC.value,
                protocol_version=PROTOCOL_VERSION_CURRENT,
            ),
            AgentInterface(
                url=f"{base}{agent.path}/rest",
                protocol_binding=TransportProtocol.HTTP_JSON.value,
                protocol_version=PROTOCOL_VERSION_CURRENT,
            ),
        ],
        capabilities=AgentCapabilities(
            streaming=True, push_notifications=True, extended_agent_card=True
        ),
        security_schemes=schemes,
        security_requirements=requirements,
        default_input_modes=["application/json", "text/plain"],
        default_output_modes=["application/json", "text/plain"],
        skills=skills,
    )
    if not agent.name and principal is not None:
        visible = {spec.name for spec in specs}
        listed = [
            {
                "name": a.name,
                "description": a.description,
                "card": f"{base}{a.path}/.well-known/agent-card.json",
            }
            for a in agents_of(config, host.dispatcher.registry).values()
            if a.name and any(a.offers(t) for t in visible)
        ]
        extension = AgentExtension(
            uri=DIRECTORY_EXTENSION,
            description="The agents of this gateway that offer you skills",
            required=False,
        )
        extension.params.CopyFrom(render.struct({"agents": listed}))
        card.capabilities.extensions.append(extension)
    return card
