"""The A2A agents a config exposes (no A2A library needed: start-up checks use it).

Agents: the gateway itself (every tool, at `/a2a`), each group of tools in `a2a.agents`, and
each tool of an agent-like kind (or every tool, per `a2a.tools_as_agents`).
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.config import AGENT_LIKE_KINDS, ConfigError, GatewayConfig

if TYPE_CHECKING:
    from gateway.dispatch import ToolRegistry as Registry


@dataclass(frozen=True)
class AgentDef:
    """An A2A agent of the gateway. `name` "" is the gateway's own agent (every tool)."""

    name: str
    description: str
    tools: tuple[str, ...] | None

    @property
    def path(self) -> str:
        return "/a2a" if not self.name else f"/a2a/agents/{self.name}"

    def offers(self, tool: str) -> bool:
        return self.tools is None or tool in self.tools


# The agents of the config and tools in force: asked on every A2A request, changed only by a
# reload (which brings a new config and registry).
_agents: tuple[GatewayConfig, Registry, dict[str, AgentDef]] | None = None


def agents_of(config: GatewayConfig, registry: Registry) -> dict[str, AgentDef]:
    """The agents `config` exposes with the tools `registry` loaded from it, by name ("" is the
    gateway itself). Do not change it."""
    global _agents
    if _agents is not None and _agents[0] is config and _agents[1] is registry:
        return _agents[2]
    agents = _build_agents(config, registry)
    _agents = (config, registry, agents)
    return agents


def _build_agents(config: GatewayConfig, registry: Registry) -> dict[str, AgentDef]:
    agents = {"": AgentDef("", "Every tool of this Duragate gateway that you may call.", None)}
    for agent in config.a2a.agents:
        description = agent.description or f"Tools: {', '.join(agent.tools)}."
        agents[agent.name] = AgentDef(agent.name, description, tuple(agent.tools))
    mode = config.a2a.tools_as_agents
    # The loaded tools, not the config's entries: one entry may make several tools (an `mcp`
    # import), each an agent of its own.
    for spec in registry.specs():
        if mode == "none" or (mode == "agent_like" and spec.kind not in AGENT_LIKE_KINDS):
            continue
        name = spec.name.lower().replace(".", "-")
        if name in agents or not name[:1].isalnum():
            continue
        agents[name] = AgentDef(name, spec.description or spec.name, (spec.name,))
    return agents


def check_agents(config: GatewayConfig, tools: Container[str] | None = None) -> None:
    """A ConfigError for agents that name tools the config does not have. `tools`: the names
    of the loaded tools (the registry), which include those an entry imports (`mcp` with
    `options.tools`); by default the config's entry names."""
    names = tools if tools is not None else {t.name for t in config.tools}
    problems = [
        config.problem(
            ("a2a", "agents", i, "tools", j), f"agent {agent.name!r}: no tool named {tool!r}"
        )
        for i, agent in enumerate(config.a2a.agents)
        for j, tool in enumerate(agent.tools)
        if tool not in names
    ]
    if problems:
        raise ConfigError(problems)
