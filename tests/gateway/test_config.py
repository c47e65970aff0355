"""gateway.config: the model, and errors that name file, line and key."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.config import (
    ConfigError,
    DaprEngineConfig,
    EmbeddedEngineConfig,
    GatewayConfig,
    ToolConfig,
    load_config,
    parse_config,
)

REPO = Path(__file__).resolve().parents[2]
BASE = Path("/srv/duragate")


def parse(text: str) -> GatewayConfig:
    return parse_config(textwrap.dedent(text), "gateway.yaml", BASE)


def error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return str(info.value)


TOOL = """\
    tools:
      - name: add
        kind: python
        target: examples.tools:add
"""


# ---------------------------------------------------------------------------------------------
# happy paths


def test_demo_config() -> None:
    config = load_config(REPO / "config" / "gateway.yaml")
    assert config.listen.host == "127.0.0.1"
    assert config.listen.port == 8770
    assert config.data_dir == REPO / ".duragate"
    assert isinstance(config.engine, EmbeddedEngineConfig)
    assert config.engine.synchronous == "FULL"
    assert config.identity.allow_anonymous is True
    names = ["add", "slow_echo", "flaky", "fail", "word_count", "pipeline", "review"]
    assert [t.name for t in config.tools] == [*names, "research", "analyst"]
    flaky = config.tools[2]
    assert flaky.retry.max_attempts == 3
    kinds = ["python"] * 5 + ["langgraph"] * 2 + ["crewai", "agent"]
    assert [t.kind for t in config.tools] == kinds
    assert config.tools[5].options == {"recursion_limit": 25}
    assert config.tools[7].options == {"lazy": True}
    assert config.source == str(REPO / "config" / "gateway.yaml")
    assert config.line_of(("tools", 2, "retry", "max_attempts")) is not None


def test_defaults() -> None:
    config = parse(TOOL)
    assert config.listen.host == "127.0.0.1" and config.listen.port == 8770
    assert config.data_dir is None
    assert config.engine == EmbeddedEngineConfig(kind="embedded", synchronous="FULL")
    # Secure by default: anonymous callers are refused unless the file says otherwise.
    assert config.identity.allow_anonymous is False
    assert config.limits.max_body_bytes == 1024 * 1024
    assert config.limits.max_wait_seconds == 60
    tool = config.tools[0]
    assert tool.timeout_seconds == 60
    assert tool.task_support == "optional"
    assert tool.retry.max_attempts == 1
    assert tool.retry.backoff_coefficient == 2.0
    assert tool.description is None and tool.input_schema is None


def test_empty_sections_mean_defaults() -> None:
    config = parse("identity:\npolicy:\ntools:\nengine:\n  synchronous: NORMAL\n")
    assert config.identity.allow_anonymous is False
    assert config.tools == []
    assert config.engine == EmbeddedEngineConfig(synchronous="NORMAL")


def test_relative_paths_are_taken_from_the_config_directory(tmp_path: Path) -> None:
    config = parse(
        """\
        data_dir: data
        identity:
          bundles:
            example.org: ../bundles/example.org.json
        policy:
          dir: /etc/duragate/policies
        """
    )
    assert config.data_dir == BASE / "data"
    assert config.identity.bundles == {"example.org": Path("/srv/bundles/example.org.json")}
    assert config.policy.dir == Path("/etc/duragate/policies")

    (tmp_path / "gateway.yaml").write_text("data_dir: state\n")
    assert load_config(tmp_path / "gateway.yaml").data_dir == tmp_path.resolve() / "state"


def test_dapr_engine() -> None:
    config = parse(
        """\
        engine:
          kind: dapr
          grpc_address: unix:///run/dapr/grpc.sock
          http_address: http://127.0.0.1:3500
        """
    )
    assert config.engine == DaprEngineConfig(
        kind="dapr",
        grpc_address="unix:///run/dapr/grpc.sock",
        http_address="http://127.0.0.1:3500",
        api_token_env="DAPR_API_TOKEN",
    )


def test_tool_settings_and_schema_overrides() -> None:
    config = parse(
        TOOL
        + """\
        description: Adds.
        timeout_seconds: 2.5
        task_support: required
        retry: {max_attempts: 4, first_interval_seconds: 0.5}
        input_schema:
          $schema: http://json-schema.org/draft-07/schema#
          type: object
          properties: {a: {type: number}}
        output_schema: {type: object}
    """
    )
    tool = config.tools[0]
    assert tool.description == "Adds."
    assert tool.timeout_seconds == 2.5
    assert tool.task_support == "required"
    assert tool.retry.max_attempts == 4 and tool.retry.first_interval_seconds == 0.5
    assert tool.input_schema is not None and tool.input_schema["properties"] == {
        "a": {"type": "number"}
    }


def test_tool_name_rules() -> None:
    ok = "a.B-c_9" * 18 + "ab"  # 128 characters
    assert len(ok) == 128
    assert ToolConfig(name=ok, kind="python", target="m:f").name == ok
    for bad in ["", "a b", "a/b", ok + "x", "é"]:
        with pytest.raises(ValidationError, match="not a valid tool name"):
            ToolConfig(name=bad, kind="python", target="m:f")


def test_duplicate_names_refused_when_built_in_code() -> None:
    tool = ToolConfig(name="add", kind="python", target="m:f")
    with pytest.raises(ValidationError, match=r"tools\[1\].name: 'add' is defined twice"):
        GatewayConfig(tools=[tool, tool])


def test_yaml_merge_keys_are_not_duplicates() -> None:
    config = parse(
        """\
        tools:
          - &base
            name: a
            kind: python
            target: m:f
          - <<: *base
            name: b
        """
    )
    assert [t.name for t in config.tools] == ["a", "b"]
    assert config.line_of(("tools", 1, "kind")) == 4  # found through the merge


# ---------------------------------------------------------------------------------------------
# errors: each names file, line and key


def test_unknown_key_with_suggestion() -> None:
    text = TOOL + "        retry:\n          max_atempts: 3\n"
    assert error(text) == (
        "gateway.yaml:6: tools[0].retry.max_atempts: unknown key (did you mean 'max_attempts'?)"
    )


def test_unknown_top_level_key() -> None:
    assert error("listen: {}\nlisne: 1\n") == (
        "gateway.yaml:2: lisne: unknown key (did you mean 'listen'?)"
    )
    assert error("frobnicate: 1\n") == "gateway.yaml:1: frobnicate: unknown key"


def test_bad_type() -> None:
    assert error("listen:\n  host: 0.0.0.0\n  port: many\n") == (
        "gateway.yaml:3: listen.port: input should be a valid integer, unable to parse string "
        "as an integer (got 'many')"
    )
    assert error(TOOL + "        timeout_seconds: 0\n") == (
        "gateway.yaml:5: tools[0].timeout_seconds: input should be greater than 0 (got 0)"
    )
    assert error(TOOL + "        task_support: sometimes\n") == (
        "gateway.yaml:5: tools[0].task_support: input should be 'forbidden', 'optional' or "
        "'required' (got 'sometimes')"
    )


def test_duplicate_tool_names() -> None:
    text = TOOL + "      - name: add\n        kind: python\n        target: examples.tools:add\n"
    assert error(text) == "gateway.yaml:5: tools[1].name: 'add' is defined twice (first at line 2)"


def test_duplicate_yaml_key() -> None:
    text = """\
        listen:
          host: 127.0.0.1
          port: 1
          port: 2
        """
    assert error(text) == "gateway.yaml:4: listen.port: duplicate key (first at line 3)"


def test_bad_engine_kind() -> None:
    assert error("engine:\n  kind: embeded\n") == (
        "gateway.yaml:2: engine.kind: unknown kind 'embeded'; known kinds: embedded, dapr "
        "(did you mean 'embedded'?)"
    )
    assert error("engine: embedded\n") == (
        "gateway.yaml:1: engine: must be a mapping with a `kind` key"
    )


def test_engine_settings_are_checked_for_their_kind() -> None:
    assert error("engine:\n  kind: dapr\n") == (
        "gateway.yaml:1: engine.grpc_address: required key is missing"
    )
    assert error("engine:\n  kind: embedded\n  grpc_address: localhost:50001\n") == (
        "gateway.yaml:3: engine.grpc_address: unknown key"
    )
    assert error("engine:\n  kind: dapr\n  grpc_address: nowhere\n") == (
        "gateway.yaml:3: engine.grpc_address: 'nowhere' is not HOST:PORT or unix:///path"
    )
    assert error("engine:\n  kind: dapr\n  grpc_address: h:1\n  api_token_env: A-B\n") == (
        "gateway.yaml:4: engine.api_token_env: 'A-B' is not an environment variable name"
    )


def test_bad_schema_override() -> None:
    text = TOOL + "        input_schema:\n          type: object\n          properties: 3\n"
    assert error(text) == (
        "gateway.yaml:5: tools[0].input_schema: not a valid JSON Schema: properties: "
        "3 is not of type 'object'"
    )
    text = TOOL + "        output_schema: {type: string}\n"
    assert error(text) == (
        "gateway.yaml:5: tools[0].output_schema: must be an object schema (`type: object`), "
        "as MCP requires"
    )
    text = TOOL + "        input_schema: {$schema: 'https://example.com/mine', type: object}\n"
    assert error(text) == (
        "gateway.yaml:5: tools[0].input_schema: unknown JSON Schema dialect "
        "'https://example.com/mine'"
    )


def test_missing_tool_key_points_at_the_tool() -> None:
    text = "tools:\n  - name: add\n    kind: python\n"
    assert error(text) == "gateway.yaml:2: tools[0].target: required key is missing"


def test_retry_intervals() -> None:
    text = TOOL + "        retry: {first_interval_seconds: 10, max_interval_seconds: 1}\n"
    assert error(text) == (
        "gateway.yaml:5: tools[0].retry: max_interval_seconds (1.0) is shorter than "
        "first_interval_seconds (10.0)"
    )


def test_several_errors_are_all_reported_in_file_order() -> None:
    message = error("listen:\n  port: -1\nlimits:\n  max_wait_seconds: 0\nbogus: 1\n")
    assert [line.split(":")[1] for line in message.splitlines()] == ["2", "4", "5"]


def test_yaml_syntax_error() -> None:
    assert error("listen:\n  host: [127.0.0.1\n  port: 1\n") == (
        "gateway.yaml:3: not valid YAML: expected ',' or ']', but got ':' "
        "(while parsing a flow sequence at line 2)"
    )
    assert error("listen:\n\tport: 1\n").startswith("gateway.yaml:2: not valid YAML: ")


def test_top_level_must_be_a_mapping() -> None:
    assert error("\n- a\n- b\n") == (
        "gateway.yaml:2: the top level must be a mapping of keys, not a list"
    )
    assert error("just words\n") == (
        "gateway.yaml:1: the top level must be a mapping of keys, not a single value"
    )


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("# only a comment\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}:1: the file is empty: it must be a mapping"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: no such config file"
    problem = info.value.problems[0]
    assert problem.source == str(path) and problem.line is None


def test_unsafe_yaml_tags_are_refused() -> None:
    message = error("listen: !!python/object/apply:os.system ['true']\n")
    assert message.startswith("gateway.yaml:1: not valid YAML: could not determine a constructor")


def test_recursive_yaml_does_not_hang() -> None:
    assert error("listen: &a [*a]\n").startswith("gateway.yaml:1: listen: ")
