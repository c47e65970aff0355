"""A tool for the tracing tests: asks an OpenAI-compatible chat endpoint (the test's own)."""

from __future__ import annotations

from typing import Annotated

import httpx
from pydantic import Field


async def ask_llm(
    prompt: Annotated[str, Field(description="What to ask.")],
    base_url: Annotated[str, Field(description="The API's base URL (…/v1).")],
    api_key: Annotated[str, Field(description="Sent as `?key=` (as some APIs take it).")] = "",
) -> str:
    """One chat completion; returns the answer's text."""
    async with httpx.AsyncClient(timeout=30) as client:
        answer = await client.post(
            f"{base_url}/chat/completions",
            json={"model": "tiny-test-model", "messages": [{"role": "user", "content": prompt}]},
            headers={"Authorization": "Bearer sk-test-secret"},
            params={"key": api_key} if api_key else None,
        )
        answer.raise_for_status()
        return str(answer.json()["choices"][0]["message"]["content"])
