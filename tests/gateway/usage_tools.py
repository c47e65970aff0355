"""A tool for the token budget tests: answers like a chat model and reports the tokens spent."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

# Imported at run time, not under TYPE_CHECKING: the adapter resolves the string annotations.
from adapters.base import ToolContext


def metered_echo(
    text: Annotated[str, Field(description="What to send back.")],
    tokens: Annotated[int, Field(ge=0, le=10**6, description="The tokens to report.")] = 40,
    *,
    context: ToolContext,
) -> str:
    """Return `text`, reporting `tokens` tokens of usage (a quarter of them the prompt)."""
    prompt = tokens // 4
    context.report_usage(
        total_tokens=tokens, prompt_tokens=prompt, completion_tokens=tokens - prompt
    )
    return text
