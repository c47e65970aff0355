"""Tool kinds: one module per kind, each exposing `ADAPTER` (see `adapters.base`).

Kind modules are imported only when a tool of that kind is configured: some wrap frameworks
that take seconds and hundreds of MiB to import (crewai, langgraph).
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any

from adapters.base import Adapter, ToolLoadError

# Modules of this package that are not tool kinds.
_NOT_KINDS = frozenset({"base", "checkpoints", "langgraph_saver"})

_data_dir: Path | None = None


def set_data_dir(path: Path) -> None:
    """Tell adapters the gateway's data directory (before tools are loaded): a kind that needs
    files of its own keeps them under it (crewai: `<data dir>/crewai`)."""
    global _data_dir
    _data_dir = path


_own_identity: Any = None


def set_own_identity(identity: Any) -> None:
    """Tell adapters the gateway's own identity (`identity.own`, an `identity.own.OwnIdentity`,
    started), for tools that present it on their outbound calls; None when there is none."""
    global _own_identity
    _own_identity = identity


def own_identity() -> Any:
    """The gateway's own identity, or None when the config names none."""
    return _own_identity


def data_dir() -> Path:
    """The gateway's data directory, or the default one when none was set."""
    from gateway.paths import resolve_data_dir

    return _data_dir if _data_dir is not None else resolve_data_dir()


def known_kinds() -> list[str]:
    """The tool kinds this installation has: the kind modules present in the package."""
    return sorted(
        info.name
        for info in pkgutil.iter_modules(__path__)
        if info.name not in _NOT_KINDS and not info.name.startswith("_")
    )


def adapter_for(kind: str) -> Adapter:
    """The adapter for `kind`, importing its module on first use."""
    kinds = known_kinds()
    if kind not in kinds:
        raise ToolLoadError(f"unknown tool kind {kind!r}; known kinds: {', '.join(kinds)}")
    try:
        module = importlib.import_module(f"{__name__}.{kind}")
    except ImportError as exc:
        # Most likely an optional dependency of that kind (`pip install duragate[crewai]`).
        raise ToolLoadError(f"the {kind!r} tool kind cannot be loaded: {exc}") from exc
    adapter: Adapter | None = getattr(module, "ADAPTER", None)
    if adapter is None or getattr(adapter, "kind", None) != kind:
        raise ToolLoadError(f"adapters.{kind} does not define ADAPTER for kind {kind!r}")
    return adapter
