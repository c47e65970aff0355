"""gateway.registry: loading every tool, and argument validation with readable errors."""

from __future__ import annotations

import textwrap
import uuid
from pathlib import Path

import pytest

from adapters.base import ToolContext
from gateway.config import ConfigError, GatewayConfig, ToolConfig, load_config, parse_config
from gateway.registry import ArgumentProblem, ArgumentsError, Registry, UnknownToolError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo() -> Registry:
    return Registry.from_config(load_config(REPO / "config" / "gateway.yaml"))


def problems(registry: Registry, name: str, arguments: object) -> list[str]:
    with pytest.raises(ArgumentsError) as info:
        registry.validate_arguments(name, arguments)
    return [str(e) for e in info.value.errors]


def test_demo_registry(demo: Registry) -> None:
    names = ["add", "slow_echo", "flaky", "fail", "word_count", "pipeline", "review"]
    names += ["research", "analyst"]
    assert [s.name for s in demo.specs()] == names
    assert list(demo) == names and len(demo) == 9 and "add" in demo
    add = demo.get("add")
    assert add is not None and add.spec.timeout_seconds == 10
    assert demo.get("nope") is None
    flaky = demo.get("flaky")
    assert flaky is not None and flaky.spec.retry.max_attempts == 3
    word_count = demo.get("word_count")
    assert word_count is not None and word_count.spec.output_schema is not None
    assert word_count.spec.output_schema["required"] == ["words", "characters", "lines"]


def test_valid_arguments_pass(demo: Registry) -> None:
    demo.validate_arguments("add", {"a": 1, "b": 2.5})
    demo.validate_arguments("slow_echo", {"text": "hi"})


def test_argument_errors_name_the_field(demo: Registry) -> None:
    assert problems(demo, "add", {"a": 1, "b": "x"}) == ["b: 'x' is not of type 'number'"]
    assert problems(demo, "add", {"a": 1}) == ["(root): 'b' is a required property"]
    assert problems(demo, "add", {"a": 1, "b": 2, "c": 3}) == [
        "(root): Additional properties are not allowed ('c' was unexpected)"
    ]
    assert problems(demo, "add", []) == ["(root): [] is not of type 'object'"]
    assert problems(demo, "slow_echo", {"text": 1, "seconds": -1}) == [
        "seconds: -1 is less than the minimum of 0",
        "text: 1 is not of type 'string'",
    ]
    with pytest.raises(ArgumentsError) as info:
        demo.validate_arguments("add", {})
    assert info.value.errors == [
        ArgumentProblem("(root)", "'a' is a required property"),
        ArgumentProblem("(root)", "'b' is a required property"),
    ]
    assert str(info.value) == (
        "invalid arguments: (root): 'a' is a required property; (root): 'b' is a required property"
    )


def test_nested_paths_and_schema_overrides() -> None:
    schema = {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {"type": "object", "properties": {"name": {"type": "string"}}},
            }
        },
    }
    tool = ToolConfig(name="add", kind="python", target="examples.tools:add", input_schema=schema)
    registry = Registry.from_config(GatewayConfig(tools=[tool]))
    assert problems(registry, "add", {"items": [{"name": "ok"}, {"name": 2}]}) == [
        "items[1].name: 2 is not of type 'string'"
    ]


def test_schema_dialect_follows_dollar_schema() -> None:
    # Draft 7 reads `dependencies`; Draft 2020-12 (the default) ignores it.
    schema = {
        "type": "object",
        "dependencies": {"a": ["b"]},
    }
    draft7 = {"$schema": "http://json-schema.org/draft-07/schema#", **schema}
    tools = [
        ToolConfig(name="new", kind="python", target="examples.tools:add", input_schema=schema),
        ToolConfig(name="old", kind="python", target="examples.tools:add", input_schema=draft7),
    ]
    registry = Registry.from_config(GatewayConfig(tools=tools))
    registry.validate_arguments("new", {"a": 1})
    assert problems(registry, "old", {"a": 1}) == ["(root): 'b' is a dependency of 'a'"]


def test_unknown_tool(demo: Registry) -> None:
    with pytest.raises(UnknownToolError, match="unknown tool 'nope'"):
        demo.validate_arguments("nope", {})


def test_unknown_kind_names_the_config_line() -> None:
    text = textwrap.dedent(
        """\
        tools:
          - name: add
            kind: python
            target: examples.tools:add
          - name: old
            kind: cobol
            target: PAYROLL
        """
    )
    config = parse_config(text, "gateway.yaml", REPO)
    with pytest.raises(ConfigError) as info:
        Registry.from_config(config)
    assert str(info.value).startswith(
        "gateway.yaml:6: tools[1].kind: tool 'old': unknown tool kind 'cobol'; known kinds: "
    )


def test_every_tool_that_fails_to_load_is_reported() -> None:
    text = textwrap.dedent(
        """\
        tools:
          - name: one
            kind: python
            target: examples.tools:nope
          - name: two
            kind: python
            target: examples.tools:add
          - name: three
            kind: python
            target: examples.nothing:f
        """
    )
    config = parse_config(text, "gateway.yaml", REPO)
    with pytest.raises(ConfigError) as info:
        Registry.from_config(config)
    assert str(info.value).splitlines() == [
        "gateway.yaml:4: tools[0].target: tool 'one' cannot be loaded: target "
        "'examples.tools:nope': 'examples.tools' has no attribute 'nope'",
        "gateway.yaml:10: tools[2].target: tool 'three' cannot be loaded: target "
        "'examples.nothing:f': no module named 'examples.nothing'",
    ]


def test_config_built_in_code_has_no_lines() -> None:
    config = GatewayConfig(tools=[ToolConfig(name="x", kind="python", target="examples.tools:x")])
    with pytest.raises(ConfigError) as info:
        Registry.from_config(config)
    assert str(info.value) == (
        "<config>: tools[0].target: tool 'x' cannot be loaded: target 'examples.tools:x': "
        "'examples.tools' has no attribute 'x'"
    )


async def test_calls_through_the_registry(demo: Registry) -> None:
    ctx = ToolContext("i-1", "t-1")
    add = demo.get("add")
    assert add is not None
    assert await add.invoke({"a": 1, "b": 2}, ctx) == {"result": 3.0}

    flaky = demo.get("flaky")
    assert flaky is not None
    key = uuid.uuid4().hex  # the failure count is per key, per process
    for attempt in (1, 2):
        with pytest.raises(RuntimeError, match=f"failure {attempt} of 2"):
            await flaky.invoke({"key": key}, ctx)
    assert await flaky.invoke({"key": key}, ctx) == {"result": f"{key}: succeeded after 2 failures"}

    word_count = demo.get("word_count")
    assert word_count is not None
    assert await word_count.invoke({"text": "one two\nthree"}, ctx) == {
        "words": 3,
        "characters": 13,
        "lines": 2,
    }
