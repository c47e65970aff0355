"""Duragate: a durable gateway for AI agents and tools."""

__version__ = "0.1.0"
