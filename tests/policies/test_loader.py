"""policies.loader: errors that name file, line and key; the store's hot reload."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import pytest

from gateway.config import ConfigError
from policies.cel import CEL_EXPR_PYTHON, CelBackend
from policies.loader import PolicyStore, check_paths, load_policy_file

REPO = Path(__file__).resolve().parents[2]

GOOD = """\
tenant: acme
members:
  - spiffe://acme.test/**
groups:
  ops: [spiffe://acme.test/people/ops/*]
tools:
  add:
    call: [group:ops]
"""


def write(directory: Path, text: str, name: str = "acme.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def errors(
    tmp_path: Path, text: str, name: str = "acme.yaml", cel: CelBackend | None = None
) -> list[str]:
    path = write(tmp_path, text, name)
    with pytest.raises(ConfigError) as info:
        load_policy_file(path, cel)
    return [line.replace(f"{tmp_path}/", "") for line in str(info.value).splitlines()]


def test_the_example_policy_is_valid() -> None:
    assert check_paths([REPO / "config" / "policies"]) == []
    policy = load_policy_file(REPO / "config" / "policies" / "default.yaml")
    assert policy.tenant == "default"
    assert {r.key for r in policy.rules} >= {"add", "slow_echo", "flaky", "fail", "word_*"}


def test_a_good_file(tmp_path: Path) -> None:
    policy = load_policy_file(write(tmp_path, GOOD))
    assert policy.tenant == "acme" and policy.name == "acme.yaml"
    assert [r.where for r in policy.rules] == ["acme.yaml:tools[add]"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            GOOD + "    cal: [group:ops]\n",
            ["acme.yaml:9: tools[add].cal: unknown key (did you mean 'call'?)"],
        ),
        (
            GOOD + "    lst: []\n",
            ["acme.yaml:9: tools[add].lst: unknown key (did you mean 'list'?)"],
        ),
        (
            GOOD + "    obligations:\n      retry: {max_atempts: 3}\n",
            [
                "acme.yaml:10: tools[add].obligations.retry.max_atempts: unknown key "
                "(did you mean 'max_attempts'?)"
            ],
        ),
        (
            GOOD + "    deny:\n      - when: 'true'\n",
            ["acme.yaml:10: tools[add].deny[0].reason: required key is missing"],
        ),
        (
            GOOD + "    obligations: {redact: [password]}\n",
            [
                "acme.yaml:9: tools[add].obligations.redact: 'password' is not a field path: "
                "write args.<field>... or result.<field>..., with [N] or [*] for list items"
            ],
        ),
        (
            GOOD + "    obligations: {timeout_seconds: 0}\n",
            [
                "acme.yaml:9: tools[add].obligations.timeout_seconds: "
                "input should be greater than 0 (got 0)"
            ],
        ),
        (
            GOOD.replace("[spiffe://acme.test/people/ops/*]", "[spiffe://acme.test/ops-*]"),
            [
                "acme.yaml:5: groups.ops[0]: the path segment 'ops-*' may only contain "
                "letters, digits, '.', '-' and '_'"
            ],
        ),
        (
            GOOD.replace("call: [group:ops]", "call: [group:opps]"),
            ["acme.yaml:8: tools[add].call[0]: no group 'opps' in this file (did you mean 'ops'?)"],
        ),
        (
            GOOD.replace("call: [group:ops]", "call: [alice]"),
            [
                "acme.yaml:8: tools[add].call[0]: 'alice' is neither a SPIFFE ID pattern nor a "
                "`group:<name>` reference"
            ],
        ),
        (
            GOOD.replace("  ops:", "  members:"),
            [
                "acme.yaml:5: groups.members: 'members' is reserved: `group:members` means "
                "the tenant's members"
            ],
        ),
        (
            GOOD.replace("  add:", "  'add tool':"),
            [
                "acme.yaml:7: tools[add tool]: 'add tool' is neither a tool name nor a pattern "
                "of tool names (letters, digits, '_', '-', '.', and '*', '?', '[...]')"
            ],
        ),
        (
            GOOD.replace("tenant: acme", "tenant: other"),
            [
                "acme.yaml:1: tenant: the file of tenant 'other' must be named other.yaml, "
                "not acme.yaml"
            ],
        ),
        (
            GOOD.replace("members:\n  - spiffe://acme.test/**\n", "members: []\n"),
            ["acme.yaml:2: members: list should have at least 1 item after validation, not 0"],
        ),
        (
            GOOD.replace("tenant: acme\n", ""),
            ["acme.yaml:1: tenant: required key is missing"],
        ),
        (
            GOOD + "  add:\n    call: []\n",
            ["acme.yaml:9: tools.add: duplicate key (first at line 7)"],
        ),
        (
            GOOD + "    when: 'args.a >'\n",
            [
                "acme.yaml:9: tools[add].when: not valid CEL at line 1, column 8: unexpected end "
                "(in `args.a >`)"
            ],
        ),
        (
            GOOD
            + "    approval:\n      when: |\n        args.a > 1 &&\n          arg.b < 2\n"
            + "      approvers: [group:ops]\n",
            [
                "acme.yaml:10: tools[add].approval.when: unknown variable 'arg' (did you mean "
                "'args'?); a condition sees args, caller, now, tool (in `args.a > 1 && arg.b < 2`)"
            ],
        ),
        (
            GOOD + "    deny:\n      - reason: x\n      - when: '1 +'\n        reason: y\n",
            [
                "acme.yaml:11: tools[add].deny[1].when: not valid CEL at line 1, column 3: "
                "unexpected end (in `1 +`)"
            ],
        ),
        ("", ["acme.yaml:1: the file is empty: it must be a mapping"]),
        (
            "tenant: [acme\n",
            [
                "acme.yaml:2: not valid YAML: expected ',' or ']', but got '<stream end>' "
                "(while parsing a flow sequence at line 1)"
            ],
        ),
    ],
)
def test_errors_name_file_line_and_key(
    tmp_path: Path, cel: CelBackend, text: str, expected: list[str]
) -> None:
    if cel.name == CEL_EXPR_PYTHON:
        # An unexpected end: cel-python places it on the last character, the C++ parser just
        # after it.
        expected = [
            e.replace("column 8:", "column 9:").replace("column 3:", "column 4:") for e in expected
        ]
    assert errors(tmp_path, text, cel=cel) == expected


def test_several_errors_in_file_order(tmp_path: Path, cel: CelBackend) -> None:
    text = GOOD + "    when: 'nope.x'\n    deny:\n      - when: 'true'\n        reason: r\n"
    text = text.replace("call: [group:ops]", "call: [group:nobody]")
    assert errors(tmp_path, text, cel=cel) == [
        "acme.yaml:8: tools[add].call[0]: no group 'nobody' in this file",
        "acme.yaml:9: tools[add].when: unknown variable 'nope'; a condition sees args, caller, "
        "now, tool (in `nope.x`)",
    ]


def test_check_paths(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.mkdir()
    write(good, GOOD)
    assert check_paths([good, good / "acme.yaml"]) == []
    bad = tmp_path / "bad"
    bad.mkdir()
    write(bad, GOOD.replace("call:", "calls:"))
    write(bad, "tenant: b\nmembers: [spiffe://b.test/**]\n", "b.yaml")
    (bad / ".acme.yaml.swp").write_text("not: [yaml")  # an editor's file: not a policy
    (bad / "notes.txt").write_text("ignored")
    assert check_paths([bad, tmp_path / "missing", tmp_path / "empty"]) == [
        f"{bad}/acme.yaml:8: tools[add].calls: unknown key (did you mean 'call'?)",
        f"{tmp_path}/missing: no such file or directory",
        f"{tmp_path}/empty: no such file or directory",
    ]
    (tmp_path / "empty").mkdir()
    assert check_paths([tmp_path / "empty"]) == [
        f"{tmp_path}/empty: no *.yaml policy files in this directory"
    ]


# --- hot reload -------------------------------------------------------------------------------


def test_hot_reload_good_broken_fixed_deleted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, GOOD)
    store = PolicyStore.open(tmp_path)
    first = store.get("acme")
    assert first is not None and store.tenants() == ["acme"] and store.problems() == []
    generation = store.generation

    # Unchanged: nothing is re-read into a new policy.
    report = store.refresh()
    assert not report.changed and store.get("acme") is first and store.generation == generation

    # A good change replaces the policy.
    path.write_text(GOOD + "  word_count:\n    call: [group:members]\n")
    report = store.refresh()
    assert report.loaded == ["acme"] and store.generation == generation + 1
    second = store.get("acme")
    assert second is not None and second is not first
    assert [r.key for r in second.rules] == ["add", "word_count"]

    # A broken change keeps the last good policy in force and reports the error.
    path.write_text(GOOD + "  word_count:\n    call: [group:nobody]\n")
    with caplog.at_level(logging.ERROR, logger="policies.loader"):
        report = store.refresh()
    assert not report.changed and list(report.failed) == ["acme.yaml"]
    assert store.get("acme") is second
    assert store.problems() == [
        f"{path}:10: tools[word_count].call[0]: no group 'nobody' in this file"
    ]
    assert "the last good version stays in force" in caplog.text
    assert store.reload_failures == 1

    # Refreshing again does not re-report the same broken content.
    assert store.refresh().failed == {} and store.reload_failures == 1
    assert store.problems() != []

    # Fixed: loaded, error gone.
    path.write_text(GOOD)
    assert store.refresh().loaded == ["acme"]
    assert store.problems() == [] and store.get("acme") is not second

    # Deleted: the tenant is gone.
    path.unlink()
    report = store.refresh()
    assert report.removed == ["acme"] and store.get("acme") is None and store.tenants() == []


def test_a_broken_new_file_loads_nothing(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path)
    write(tmp_path, "tenant: acme\n")
    report = store.refresh()
    assert store.get("acme") is None and list(report.failed) == ["acme.yaml"]
    assert store.problems() == [f"{tmp_path}/acme.yaml:1: members: required key is missing"]
    with pytest.raises(ConfigError):
        PolicyStore.open(tmp_path)
    assert PolicyStore.open(tmp_path, strict=False).tenants() == []


def test_a_deleted_broken_file_clears_its_error(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    store = PolicyStore.open(tmp_path)
    path.write_text("tenant: [")
    store.refresh()
    assert store.problems() and store.get("acme") is not None
    path.unlink()
    assert store.refresh().removed == ["acme"]
    assert store.problems() == [] and store.get("acme") is None


def test_several_tenants_change_independently(tmp_path: Path) -> None:
    write(tmp_path, GOOD)
    write(tmp_path, "tenant: beta\nmembers: [spiffe://beta.test/**]\n", "beta.yaml")
    store = PolicyStore.open(tmp_path)
    acme = store.get("acme")
    assert store.tenants() == ["acme", "beta"]
    write(tmp_path, "tenant: beta\nmembers: [spiffe://beta.test/agents/**]\n", "beta.yaml")
    assert store.refresh().loaded == ["beta"]
    assert store.get("acme") is acme


def test_a_missing_directory_denies_everyone(tmp_path: Path) -> None:
    directory = tmp_path / "policies"
    directory.mkdir()
    write(directory, GOOD)
    store = PolicyStore.open(directory)
    write(directory, GOOD).unlink()
    directory.rmdir()
    report = store.refresh()
    assert report.removed == ["acme"] and store.tenants() == []
    assert store.problems() == [
        f"{directory}: cannot read: [Errno 2] No such file or directory: '{directory}'"
    ]
    with pytest.raises(ConfigError):
        PolicyStore.open(directory)


def test_a_tenant_named_after_its_trust_domain(tmp_path: Path) -> None:
    # Without a tenant rule, identity puts a caller in the tenant named by its trust domain.
    text = "tenant: example.org\nmembers: [spiffe://example.org/**]\n"
    write(tmp_path, text, "example.org.yaml")
    store = PolicyStore.open(tmp_path)
    assert store.tenants() == ["example.org"]
    (tmp_path / "example.org.yaml").unlink()
    assert store.refresh().removed == ["example.org"]
    assert errors(tmp_path, "tenant: Bad_\nmembers: [spiffe://x.test/**]\n", "Bad_.yaml") == [
        "Bad_.yaml:1: tenant: 'Bad_' is not a tenant name: 1 to 255 lowercase letters, digits, "
        "'.', '-' or '_', starting and ending with a letter or digit"
    ]
