"""A scripted model for the `agent` tool kind (see config/gateway.yaml, tool `analyst`).

`analyst(request)` stands in for a chat-completions API: it gets the request body the agent
would send (`messages`, the system prompt first, and the `tools` it is offered) and returns the
response body an API would (`choices[0].message`, `usage`). It needs no network and no key, and
what it answers depends only on the conversation, so the demo and the tests are repeatable.

It reads the last user message of the conversation:
- a sum ("what is 2 + 3 + 4?", "add 1.5 and 2"): it adds the numbers with the `add` tool, one
  call per step, each call's first argument the previous call's result, then answers with the
  total;
- any other text ("analyse: ..."): it calls `word_count` and `pipeline` (the LangGraph graph)
  on the text, both in one step, then answers with the counts and the graph's outline and draft.

It calls only the tools it is offered (the gateway offers those the policy lets the agent see
for its caller) and says so when one is missing; a tool call that fails (refused by the policy,
invalid arguments, a tool error) is reported in the answer with the gateway's reason. Token
usage is counted as one token per word, so budgets can be tried.
"""

from __future__ import annotations

import json
import re
from typing import Any

NUMBER = r"-?\d+(?:\.\d+)?"
# "what is 2 + 3 + 4?", "add 1.5 and 2", "sum 1, 2 and 3": two to eight numbers.
SUM_RE = re.compile(
    rf"\s*(?:what\s+is|add|sum|compute)?\s*(?P<numbers>{NUMBER}(?:\s*(?:\+|,|and)\s*{NUMBER}){{1,7}})"
    r"\s*\??\s*",
    re.IGNORECASE,
)
# "analyse: <text>" and the like: the text is what follows the colon.
TEXT_RE = re.compile(
    r"\s*(?:analy[sz]e|summari[sz]e|count|outline)\s*:\s*(?P<text>.+)", re.S | re.I
)
# The tools used on a text, with the result fields the answer is made of.
TEXT_TOOLS = {"word_count": ("words", "lines", "characters"), "pipeline": ("outline", "draft")}


def analyst(request: dict[str, Any]) -> dict[str, Any]:
    """The next assistant message for this conversation, as a chat-completions response."""
    messages: list[dict[str, Any]] = request.get("messages") or []
    offered = {
        str((tool.get("function") or {}).get("name"))
        for tool in request.get("tools") or []
        if isinstance(tool, dict)
    }
    start = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    question = str(messages[start].get("content") or "") if start >= 0 else ""
    turn = Turn(messages[start + 1 :])
    summing = SUM_RE.fullmatch(question)
    if summing is not None:
        numbers = [float(n) for n in re.findall(NUMBER, summing["numbers"])]
        message = _sum_step(numbers, offered, turn)
    else:
        text_match = TEXT_RE.fullmatch(question)
        text = text_match["text"].strip() if text_match else question.strip()
        message = _text_step(text, offered, turn)
    return _response(messages, message)


class Turn:
    """What happened since the user's last message: the tool calls made, with their results."""

    def __init__(self, messages: list[dict[str, Any]]) -> None:
        self.steps = sum(1 for m in messages if m.get("role") == "assistant")
        results = {
            m.get("tool_call_id"): m.get("content") for m in messages if m.get("role") == "tool"
        }
        # (tool name, arguments, result) in the order the calls were made.
        self.calls: list[tuple[str, dict[str, Any], Any]] = []
        for message in messages:
            for call in message.get("tool_calls") or []:
                function = call.get("function") or {}
                arguments = _json(function.get("arguments")) or {}
                result = _json(results.get(call.get("id")))
                self.calls.append((str(function.get("name")), arguments, result))

    def results(self, name: str) -> list[Any]:
        return [result for tool, _, result in self.calls if tool == name]


def _sum_step(numbers: list[float], offered: set[str], turn: Turn) -> dict[str, Any]:
    expression = " + ".join(_number(n) for n in numbers)
    if "add" not in offered:
        return {"content": f"I cannot work out {expression}: the add tool is not available to me."}
    done = turn.results("add")
    total = numbers[0]
    for result in done:
        failure = _failure(result)
        if failure is None and not (
            _readable(result, "result") and isinstance(result["result"], int | float)
        ):
            failure = f"an unexpected result: {result!r}"
        if failure is not None:
            return {"content": f"I could not work out {expression}: add failed ({failure})."}
        total = float(result["result"])
    if len(done) < len(numbers) - 1:
        arguments = {"a": total, "b": numbers[len(done) + 1]}
        return _calls(turn.steps, [("add", arguments)])
    calls = len(done)
    return {
        "content": f"{expression} = {_number(total)} "
        f"(added with {calls} call{'s' if calls != 1 else ''} of the add tool)."
    }


def _text_step(text: str, offered: set[str], turn: Turn) -> dict[str, Any]:
    if not text:
        return {"content": "Send me a sum (what is 2 + 3?) or a text to analyse (analyse: ...)."}
    usable = [name for name in TEXT_TOOLS if name in offered]
    if not turn.calls:
        if not usable:
            return {"content": "I have no tools to analyse a text with."}
        return _calls(turn.steps, [(name, {"text": text}) for name in usable])
    parts = []
    for name in TEXT_TOOLS:
        if name not in usable:
            parts.append(f"{name} is not available to me.")
            continue
        result = (turn.results(name) or [None])[-1]
        failure = _failure(result)
        if failure is None and not _readable(result, *TEXT_TOOLS[name]):
            failure = f"an unexpected result: {result!r}"
        if failure is not None:
            parts.append(f"{name} failed ({failure}).")
        elif name == "word_count":
            parts.append(
                f"{result['words']} words, {result['lines']} line(s), "
                f"{result['characters']} characters."
            )
        else:
            points = len(result["outline"] or [])
            parts.append(f"Outline: {points} point(s). Draft: {result['draft']}")
    return {"content": "Analysis: " + " ".join(parts)}


def _failure(result: Any) -> str | None:
    """The gateway's reason when a tool call did not give a result."""
    if isinstance(result, dict) and set(result) == {"error"}:
        return str(result["error"])
    if result is None:
        return "no result"
    return None


def _readable(result: Any, *fields: str) -> bool:
    return isinstance(result, dict) and all(f in result for f in fields)


def _calls(step: int, calls: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    return {
        "content": "",
        "tool_calls": [
            {
                "id": f"call_{step}_{index}",
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(arguments, sort_keys=True)},
            }
            for index, (name, arguments) in enumerate(calls)
        ],
    }


def _response(messages: list[dict[str, Any]], message: dict[str, Any]) -> dict[str, Any]:
    prompt = sum(len(str(m.get("content") or "").split()) for m in messages)
    completion = len(str(message.get("content") or "").split()) + sum(
        len(c["function"]["arguments"].split()) for c in message.get("tool_calls") or []
    )
    return {
        "choices": [{"index": 0, "message": {"role": "assistant", **message}}],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


def _json(text: Any) -> Any:
    try:
        return json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None


def _number(value: float) -> str:
    return f"{value:g}"
